"""References as modules: each kind yields, inside `with reference.model(policy) as ref:`, the module the
reference energies (or generated candidates) come from, or None.

- `none`: reference-free objectives (MaPO, SFT).
- `lora_off`: the policy is base + LoRA; switching the adapters off gives the base model bit for bit, with
  no second copy. The switch is made on the inner module, but the forward runs through the prepared
  (wrapped) policy, so a distributed wrapper sees every call.
- `frozen_copy`: a frozen duplicate of the denoiser taken before training (full fine-tuning).
- `pool`: earlier checkpoints of this run, one drawn per optimizer step (SePPO's Random Checkpoint
  Replay). Draws are keyed on (seed, step) and membership is a function of the step, so resume and N
  processes replay them.
- `precomputed`: no module at all; the energies the base model gives each item at its stream position,
  computed ahead by `diffalign precompute` (diffalign/training/precompute.py) and read from
  `<cache dir>/reference/`. A table made for another seed, batch, data, model or noise mode is refused.

Every reference hears about each optimizer step (`on_step`) and each saved checkpoint (`on_checkpoint`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffalign.atomic import atomic_path
from diffalign.errors import UserError
from diffalign.training.experience import stream_seed


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """diffusers' disable_adapters / enable_adapters as a context (they are plain methods)."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


class Reference:
    name = "none"

    def to(self, device) -> Reference:
        return self

    @contextlib.contextmanager
    def model(self, policy: nn.Module) -> Iterator[nn.Module | None]:
        yield None

    def on_step(self, step: int) -> None:
        """Called after each optimizer step (and once with the starting step before training)."""

    def on_checkpoint(self, path, step: int) -> None:
        """Called after a checkpoint at `path` was completed."""

    def describe(self) -> str:
        return self.name

    def metrics(self) -> dict[str, float]:
        """Per-micro-batch values to log beside the objective's (the pool: which checkpoint was drawn)."""
        return {}

    def energies(self, exp, policy: nn.Module) -> torch.Tensor | None:
        """The reference energies of an experience [B, K] (call under no_grad), or None without a reference."""
        with self.model(policy) as module:
            return exp.energy(module) if module is not None else None


class AdapterOffReference(Reference):
    name = "lora_off"

    def __init__(self, unwrap: Callable[[nn.Module], nn.Module] = lambda m: m):
        self.unwrap = unwrap

    @contextlib.contextmanager
    def model(self, policy):
        with adapters_disabled(self.unwrap(policy)):
            yield policy


class FrozenCopyReference(Reference):
    name = "frozen_copy"

    def __init__(self, denoiser: nn.Module, dtype: torch.dtype | None = None):
        self.module = copy.deepcopy(denoiser).requires_grad_(False).eval()
        if dtype is not None and next(self.module.parameters()).dtype != dtype:  # diffusers warns on any cast
            self.module.to(dtype)

    def to(self, device) -> FrozenCopyReference:
        self.module.to(device)
        return self

    @contextlib.contextmanager
    def model(self, policy):
        yield self.module


@contextlib.contextmanager
def keep_trainability(model: nn.Module):
    """peft's set_adapter (and add / delete) makes the active adapter trainable and every other one
    frozen; inside this block adapters may be switched, and afterwards every parameter trains exactly as
    before it (new parameters, a pool adapter's, stay frozen)."""
    before = {id(p): p.requires_grad for p in model.parameters()}
    try:
        yield model
    finally:
        for p in model.parameters():
            p.requires_grad_(before.get(id(p), False))


@contextlib.contextmanager
def adapter_active(model: nn.Module, name: str):
    """Only the adapter `name` active inside the block; the previous ones (and trainability) after it."""
    previous = model.active_adapters()
    with keep_trainability(model):
        model.set_adapter(name)
        try:
            yield model
        finally:
            model.set_adapter(previous)


def pool_steps(step: int, every: int, cap: int) -> list[int]:
    """The pool's members after `step` optimizer steps: theta_0 (0) and the newest cap - 1 of the
    checkpoints at multiples of `every`. A function of the step only, so a resumed run rebuilds it."""
    later = list(range(every, step + 1, every))
    return [0, *(later[max(0, len(later) - (cap - 1)):] if cap > 1 else [])]


class CheckpointPoolReference(Reference):
    """SePPO's Random Checkpoint Replay: each optimizer step's reference is a member of a pool of this run's
    own checkpoints, drawn `uniform`ly (or the `first` = theta_0, or the `last` = the newest), keyed on
    (seed, step). The same drawn member generates the step's candidates and gives the reference energies.

    Members: theta_0 (the model before training) and the checkpoints at multiples of `every`, at most `cap`
    (the oldest checkpoint leaves; theta_0 stays). A completed checkpoint joins in `on_checkpoint`, read from
    the checkpoint's own weight file, which is also linked (or copied) to `<output>/checkpoints/pool/` so
    that pruning old checkpoints cannot lose a member; on the first `on_step` (start or resume) the pool is
    rebuilt from those files for the step it starts at.

    LoRA: theta_0 is the policy with its adapters off; every other member is an extra peft adapter on the
    policy's own denoiser, never trainable (peft's set_adapter toggles trainability; it is restored), never
    in the optimizer, the export or the checkpoints (those read the "default" adapter only). Full fine-tuning:
    one frozen module, into which the drawn member's state dict (kept on CPU) is loaded.
    """

    name = "pool"

    def __init__(self, denoiser: nn.Module, *, lora: bool, seed: int, every: int, cap: int = 8,
                 draw: str = "uniform", output_dir: str | Path, is_main: bool = True, dtype=None,
                 unwrap: Callable[[nn.Module], nn.Module] = lambda m: m):  # fmt: skip
        if draw not in POOL_DRAWS:
            raise ValueError(f"pool draw must be one of {POOL_DRAWS}, got {draw!r}")
        self.lora, self.seed, self.every, self.cap, self.draw = lora, int(seed), int(every), int(cap), draw
        self.unwrap, self.is_main = unwrap, is_main
        self.output_dir = Path(output_dir)
        self.files = self.output_dir / "checkpoints" / "pool"
        self.step: int | None = None  # optimizer steps taken; None until the first on_step
        self.members: dict[int, object] = {0: None}  # step -> adapter name (LoRA) or CPU state dict
        self._logged: int | None = None
        if lora:
            self.denoiser = denoiser
        else:
            self.module = copy.deepcopy(denoiser).requires_grad_(False).eval()
            if dtype is not None and next(self.module.parameters()).dtype != dtype:
                self.module.to(dtype)
            self.members[0] = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
            self._loaded = 0

    def to(self, device) -> CheckpointPoolReference:
        if not self.lora:
            self.module.to(device)
        return self

    def describe(self) -> str:
        return (f"pool ({self.draw} draw over theta_0 and the checkpoints every {self.every} steps, at most "
                f"{self.cap} members)")  # fmt: skip

    # ---- membership ----------------------------------------------------------------------------------
    @staticmethod
    def weight_file(lora: bool) -> str:
        return "lora_0.safetensors" if lora else "model.safetensors"

    def _pool_file(self, step: int) -> Path:
        return self.files / f"step-{step:07d}.safetensors"

    def _add(self, step: int, path: Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(path))
        if self.lora:
            from peft.utils import set_peft_model_state_dict

            inner, name = self.denoiser, f"pool{step}"
            config = copy.deepcopy(inner.peft_config["default"])
            dtype = next(p.dtype for n, p in inner.named_parameters() if ".default." in n)
            # a new adapter's random init must not move the global RNG (LoRA dropout reads it)
            with keep_trainability(inner), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # we mean it
                previous = inner.active_adapters()
                inner.add_adapter(config, adapter_name=name)
                set_peft_model_state_dict(inner, weights, adapter_name=name)
                inner.set_adapter(previous)
            for n, p in inner.named_parameters():
                if f".{name}." in n:  # the same fp32 values the policy had at that checkpoint
                    p.data = p.data.to(dtype)
            self.members[step] = name
        else:
            strip = "module."  # accelerate saves a DDP-wrapped model's state dict with its prefix
            dtype = next(self.module.parameters()).dtype
            self.members[step] = {(k[len(strip):] if k.startswith(strip) else k): v.to(dtype) for k, v in weights.items()}

    def _drop(self, step: int) -> None:
        member = self.members.pop(step)
        if self.lora:
            with keep_trainability(self.denoiser):
                self.denoiser.delete_adapters(member)
        if self.is_main:
            self._pool_file(step).unlink(missing_ok=True)

    def _keep_only(self, steps: list[int]) -> None:
        for s in [s for s in self.members if s not in steps]:
            self._drop(s)

    def on_step(self, step: int) -> None:
        if self.step is None:  # start or resume: rebuild the members of `step` from the files on disk
            for s in pool_steps(step, self.every, self.cap):
                if s not in self.members:
                    self._add(s, self._source_file(s))
            self._keep_only(pool_steps(step, self.every, self.cap))
        self.step = step

    def _source_file(self, step: int) -> Path:
        ckpt = self.output_dir / "checkpoints" / f"step-{step:07d}" / self.weight_file(self.lora)
        for path in (ckpt, self._pool_file(step)):
            if path.is_file():
                return path
        raise FileNotFoundError(f"the checkpoint pool needs the weights of step {step} ({ckpt} or "
                                f"{self._pool_file(step)}), and neither exists; resume from the run's own "
                                "output_dir, or start a new run")  # fmt: skip

    def on_checkpoint(self, path, step: int) -> None:
        if step == 0 or step % self.every:
            return
        src = Path(path) / self.weight_file(self.lora)
        if self.is_main:
            self.files.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._pool_file(step)) as tmp:
                try:
                    os.link(src, tmp)  # no copy: the checkpoint's own file, kept when the folder is pruned
                except OSError:
                    shutil.copyfile(src, tmp)
        if step not in self.members:
            self._add(step, src)
        self._keep_only(pool_steps(step, self.every, self.cap))

    # ---- the draw ------------------------------------------------------------------------------------
    def drawn(self) -> int:
        """The member (its step) of the current optimizer step: a function of (seed, step, members)."""
        steps = sorted(self.members)
        if self.draw == "first":
            return steps[0]
        if self.draw == "last":
            return steps[-1]
        rng = np.random.default_rng(stream_seed(self.seed, "pool", self.step or 0))
        return steps[int(rng.integers(len(steps)))]

    def metrics(self) -> dict[str, float]:
        return {"ref_step": float(self.drawn()), "pool_size": float(len(self.members))}

    def _log_draw(self, drawn: int) -> None:
        """logs/pool_draws.jsonl: one line per optimizer step, the update it serves and the member drawn."""
        if not self.is_main or self._logged == self.step:
            return
        self._logged = self.step
        log = self.output_dir / "logs" / "pool_draws.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(json.dumps({"step": (self.step or 0) + 1, "ref_step": drawn, "members": sorted(self.members)}) + "\n")

    @contextlib.contextmanager
    def model(self, policy):
        drawn = self.drawn()
        self._log_draw(drawn)
        if not self.lora:
            if self._loaded != drawn:
                self.module.load_state_dict(self.members[drawn])
                self._loaded = drawn
            yield self.module
            return
        inner = self.unwrap(policy)
        if drawn == 0:
            with keep_trainability(inner), adapters_disabled(inner):
                yield policy
        else:
            with adapter_active(inner, self.members[drawn]):
                yield policy


class ReferenceEnergiesMismatch(UserError, ValueError):
    pass


ENERGIES_FILE, MANIFEST_FILE, ENERGIES_VERSION = "energies.safetensors", "manifest.json", 1


def energies_dir(cfg) -> Path:
    """Where `diffalign precompute` writes a config's reference energies: beside its latent cache."""
    from diffalign.training.cache import cache_dir_for

    return cache_dir_for(cfg) / "reference"


def energies_fingerprint(cfg, backbone, processes: int) -> dict:
    """Everything the reference energy of a stream position depends on: which item it is (data, seed,
    global batch = batch_size x processes), its noise and timestep (seed, the objective's candidates and
    noise mode), how its latents and conditioning are made (model, cache, precision). Take it before
    adapters are added: the denoiser's digest reads its parameter names."""
    from diffalign.backbones.sd import module_digest
    from diffalign.objectives import get_objective
    from diffalign.training.experience import candidate_noise

    obj = get_objective(cfg.objective.name)
    params = obj.validate(cfg.objective.params())
    return {"version": ENERGIES_VERSION, "model": backbone.fingerprint(), "denoiser": module_digest(backbone.denoiser),
            "data": cfg.data.model_dump(mode="json"), "seed": cfg.train.seed, "batch_size": cfg.train.batch_size,
            "processes": int(processes), "candidates": obj.candidates,
            "noise": "per_image" if candidate_noise(params) else "shared",
            "mixed_precision": cfg.train.mixed_precision,
            "cache": {"enabled": cfg.cache.enabled, "dtype": cfg.cache.dtype if cfg.cache.enabled else None}}  # fmt: skip


class PrecomputedReference(Reference):
    """Energies read from a table [stream positions, K] computed ahead (`diffalign precompute`): training
    runs only the policy and holds no reference module. Each lookup checks that the item at that position
    is the one the table was computed for."""

    name = "precomputed"

    def __init__(self, folder: str | Path, fingerprint: dict, needed_micro: int):
        from safetensors.torch import load_file

        from diffalign.errors import MissingFile, check_safetensors
        from diffalign.training.cache import _diff

        self.folder = Path(folder)
        manifest_path, table = self.folder / MANIFEST_FILE, self.folder / ENERGIES_FILE
        fix = "run `diffalign precompute <config>` with this run's config and overrides"
        if not manifest_path.is_file():
            raise MissingFile(f"train.reference=precomputed: no reference energies at {self.folder}; {fix} first")
        try:
            manifest = json.loads(manifest_path.read_text())
            made, self.keys, self.n_micro = manifest["fingerprint"], manifest["keys"], int(manifest["micro_batches"])
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{manifest_path} is unreadable ({err}); {fix}") from None
        diffs = [d.replace("cache has", "computed with") for d in _diff(made, fingerprint)]
        if diffs:
            raise ReferenceEnergiesMismatch(f"{manifest_path} was computed for another run ({'; '.join(diffs[:4])}"
                                            f"{'; ...' if len(diffs) > 4 else ''}); {fix}")  # fmt: skip
        if self.n_micro < needed_micro:
            raise ReferenceEnergiesMismatch(f"{manifest_path} covers {self.n_micro} micro-batches and this run takes "
                                            f"{needed_micro} (train.max_steps x grad_accum); {fix}")  # fmt: skip
        check_safetensors(table, fix)
        self.table = load_file(str(table))["energies"]
        self.fix = fix

    def describe(self) -> str:
        return f"precomputed ({self.folder}, {self.n_micro} micro-batches)"

    def energies(self, exp, policy) -> torch.Tensor:
        where = self.folder / MANIFEST_FILE
        if exp.positions is None:  # the placeholder item of a rank with nothing usable: its loss is zeroed
            return torch.zeros_like(exp.phi)
        if max(exp.positions) >= len(self.table):
            raise ReferenceEnergiesMismatch(f"{where} covers stream positions below {len(self.table)} and this run reached "
                                            f"{max(exp.positions)} (skipped steps read extra batches); recompute with "
                                            "`diffalign precompute <config> --extra-micro-batches N`")  # fmt: skip
        for pos, key in zip(exp.positions, exp.keys or [None] * len(exp.positions), strict=True):
            if key is not None and self.keys[pos] != key:
                raise ReferenceEnergiesMismatch(f"{where} holds item {self.keys[pos]!r} at stream position {pos} and "
                                                f"this run reads {key!r} there (the data changed); {self.fix}")  # fmt: skip
        out = self.table[torch.as_tensor(exp.positions)]
        return out.to(exp.phi.device)


REFERENCE_KINDS = ("auto", "lora_off", "frozen_copy", "pool", "precomputed")
POOL_DRAWS = ("uniform", "first", "last")


def make_reference(kind: str, needs_reference: bool, has_lora: bool, denoiser: nn.Module, dtype=None,
                   unwrap: Callable[[nn.Module], nn.Module] = lambda m: m, pool: dict | None = None,
                   precomputed: dict | None = None) -> Reference:  # fmt: skip
    """`pool`: CheckpointPoolReference's keyword arguments (seed, every, cap, draw, output_dir, is_main);
    `precomputed`: PrecomputedReference's (folder, fingerprint, needed_micro)."""
    if not needs_reference:
        return Reference()
    if kind == "auto":
        kind = "lora_off" if has_lora else "frozen_copy"
    if kind == "lora_off":
        return AdapterOffReference(unwrap)
    if kind == "frozen_copy":
        return FrozenCopyReference(denoiser, dtype)
    if kind == "pool":
        return CheckpointPoolReference(denoiser, lora=has_lora, dtype=dtype, unwrap=unwrap, **(pool or {}))
    if kind == "precomputed":
        return PrecomputedReference(**(precomputed or {}))
    raise ValueError(f"unknown reference kind {kind!r}; choose one of {REFERENCE_KINDS}")
