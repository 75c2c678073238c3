"""The training loop. It knows neither the model family (the backbone does) nor the loss (the objective
does) nor where candidates come from (the experience source does): per micro-batch it asks the source for
an experience, computes its energies under the policy and the reference module, and asks the objective
for a loss.

Determinism by construction: which items a micro-step reads is a function of (seed, micro-step index),
and each item's noise and timestep a function of (seed, its position in the data stream).
So a resumed run replays exactly the data and noise of an uninterrupted one, and N processes with batch
b see the same items and noise as one process with batch N*b.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffalign.backbones.registry import backbone_from_config
from diffalign.config import Config, ConfigError, dump_config, weight_dtype
from diffalign.errors import UserError
from diffalign.objectives import get_objective
from diffalign.training import checkpoint as ckpt
from diffalign.training import distributed, preflight
from diffalign.training.distributed import make_accelerator
from diffalign.training.experience import (
    GeneratedSource,
    OfflineSource,
    RolloutSource,
    candidate_noise,
    stream_seed,
)
from diffalign.training.reference import (
    FrozenCopyReference,
    energies_dir,
    energies_fingerprint,
    make_reference,
)


class NonFiniteLossError(UserError, RuntimeError):
    """Training diverged: non-finite losses or gradients, or weights that blew up."""


#: metrics.jsonl keys that are counters (trackers show them under counters/, the rest under train/)
_COUNTERS = ("skipped_items", "nonfinite_steps", "scaler_skipped_steps")


def _tracker_tag(key: str) -> str:
    """A metrics.jsonl key as a grouped tracker tag: train/loss, counters/skipped_items, time/elapsed_s."""
    return f"counters/{key}" if key in _COUNTERS else "time/elapsed_s" if key == "elapsed_s" else f"train/{key}"


class GlobalBatchSampler:
    """Yields this process's slice of global batches, from micro-step `start` on, forever (epochs loop).

    Global batch m is positions [p*G, (p+1)*G) of the permutation of epoch e, where (e, p) = divmod(m, P),
    P = floor(N / G) batches per epoch (the incomplete tail is dropped), G = batch_size * world_size."""

    def __init__(self, n_items: int, batch_size: int, world_size: int, rank: int, seed: int, start: int = 0,
                 order=None):
        self.n, self.b, self.world, self.rank, self.seed, self.start = n_items, batch_size, world_size, rank, seed, start
        #: epoch -> the permutation of that epoch (data.streaming: diffalign.data.stream); None: torch.randperm
        self.order = order
        self.global_batch = batch_size * world_size
        self.per_epoch = n_items // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"the dataset has {n_items} usable items, fewer than one global batch of {self.global_batch} "
                "(train.batch_size x processes); use more data or a smaller batch"
            )

    def epoch_of(self, micro: int) -> int:
        return micro // self.per_epoch

    def __iter__(self):
        micro = self.start
        perm, perm_epoch = None, -1
        while True:
            epoch, pos = divmod(micro, self.per_epoch)
            if epoch != perm_epoch:
                perm = self.order(epoch) if self.order is not None else \
                    torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1009 + epoch))
                perm_epoch = epoch
            glob = perm[pos * self.global_batch : (pos + 1) * self.global_batch]
            yield [(int(i), epoch) for i in glob[self.rank * self.b : (self.rank + 1) * self.b]]
            micro += 1


class _EpochIndexed(torch.utils.data.Dataset):
    """Lets the sampler carry the epoch with each index, so random crops/flips/dropout are a function of
    (seed, epoch, index) even inside DataLoader worker processes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def batch_sampler(cfg: Config, dataset, world: int, rank: int, start: int = 0) -> GlobalBatchSampler:
    """The sampler of process `rank` of `world` (following the parquet row groups when data.streaming)."""
    order = None
    if cfg.data.streaming:
        from diffalign.data.stream import stream_order

        order = stream_order(dataset, cfg.train.seed)
    return GlobalBatchSampler(len(dataset), cfg.train.batch_size, world, rank, cfg.train.seed, start=start, order=order)


def training_dataset(cfg: Config, backbone, data):
    """What a run reads: the latent cache (cache.enabled, image data), or `data` as the preflight built it."""
    if cfg.cache.enabled and cfg.data.format != "prompts":
        from diffalign.training.cache import CachedPreferenceDataset, cache_dir_for

        return CachedPreferenceDataset(cache_dir_for(cfg), backbone, cfg, data=data)
    return data


def kernels_wanted(train, device) -> tuple[bool, str | None]:
    """Whether train.kernels turns the fused kernels on here, and why auto would not (None: it would)."""
    from diffalign import kernels

    reason = kernels.fallback_reason(device) or (None if device.type == "cuda" else "no CUDA device")
    return train.kernels == "on" or (train.kernels == "auto" and reason is None), reason


def warmup_log_decay(optimizer, warmup: int, decay_end: int, processes: int = 1):
    """DeepSpeed's WarmupDecayLR (min lr 0) with its default log warm-up, as a LambdaLR stepped `processes`
    times per optimizer step. Optimizer step k (from 1) runs at DeepSpeed's iteration i = k - 2 (its first step
    runs before the scheduler's first step(), at lr 0): lr x log(i + 1) / log(W) while i < W = max(2, warmup),
    then lr x max(0, (decay_end - i) / max(1, decay_end - W))."""
    warm = max(2, warmup)

    def factor(calls: int) -> float:
        i = calls // processes - 1
        if i < 0:
            return 0.0
        if i < warm:
            return math.log(i + 1) / math.log(warm)
        return max(0.0, (decay_end - i) / max(1.0, decay_end - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """`Trainer(cfg).train()`. Pass `accelerator` to run inside one you built (its mixed precision must
    match train.mixed_precision); by default one is made from the config."""

    def __init__(self, cfg: Config, resume: str | None = None, accelerator=None, overwrite: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.acc = accelerator if accelerator is not None else make_accelerator(cfg)
        self.acc.gradient_accumulation_steps = cfg.train.grad_accum  # accelerate.accumulate syncs on the last
        distributed.check(self.acc, cfg)
        if self.acc.mixed_precision != cfg.train.mixed_precision:
            raise ValueError(f"the accelerator runs mixed_precision={self.acc.mixed_precision!r} but the config "
                             f"asks for {cfg.train.mixed_precision!r}")  # fmt: skip
        self.weight_dtype = weight_dtype(cfg.train.mixed_precision)
        self.step = 0  # optimizer steps taken
        self.micro = 0  # micro-batches consumed (the data position)
        self.counters = {"skipped_items": 0, "nonfinite_steps": 0, "consecutive_nonfinite": 0}
        self.resume = resume
        self._init_objective()
        self._preflight(overwrite)
        self._build()

    def _init_objective(self) -> None:
        self.objective = get_objective(self.cfg.objective.name)
        self.objective_params = self.cfg.objective.params()

    def _preflight(self, overwrite: bool) -> None:
        """What can be checked before any model is loaded."""
        cfg = self.cfg
        for path in ckpt.check_new_run(self.out, self.resume, overwrite, delete=self.acc.is_main_process):
            self.acc.print(f"--overwrite: deleted {path}")
        self.acc.wait_for_everyone()
        self.resume_path = ckpt.find_resume(self.out, self.resume, self._objective_state(), log=self.acc.print)
        preflight.check_extras(cfg)
        preflight.check_model(cfg.model)
        if cfg.data.format == "prompts":  # online training (SPO): no usable prompt is an error here
            from diffalign.data.prompts import build_prompt_dataset

            self.data = build_prompt_dataset(cfg.data)
        else:
            from diffalign.data import build_preference_dataset

            self.data = build_preference_dataset(cfg.data, seed=cfg.train.seed)
            if cfg.cache.enabled:  # a cache's items were screened when it was built
                from diffalign.training.cache import cache_dir_for, verify_cache

                verify_cache(cache_dir_for(cfg))
            else:
                preflight.probe_data(self.data, cfg.data.max_skip_fraction)
        if self.pushes_to_hub and self.acc.is_main_process:  # login and repo problems surface now, not after training
            from diffalign.training.export import hub_repo

            hub_repo(self)

    @property
    def pushes_to_hub(self) -> bool:
        return self.cfg.hub.push

    def _objective_state(self) -> dict:
        """What a resumed run must share with its checkpoint (another objective only warns)."""
        return {"name": self.objective.name, **self.objective_params}

    # ---- setup ------------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, acc = self.cfg, self.acc
        mc = cfg.model
        self.backbone = bb = backbone_from_config(mc)
        unet = bb.denoiser
        needs_ref = self.objective.needs_reference
        precomputed = None
        if needs_ref and cfg.reference_kind() == "precomputed":  # fingerprinted before adapters change the denoiser
            precomputed = dict(folder=energies_dir(cfg), fingerprint=energies_fingerprint(cfg, bb, acc.num_processes),
                               needed_micro=cfg.train.max_steps * cfg.train.grad_accum)  # fmt: skip
        unet.requires_grad_(False)
        bb.place(acc.device, self.weight_dtype, mc.vae_fp32)
        self.speed = self._kernels_and_layout(unet)
        if cfg.train.attention == "xformers":  # installed: checked by preflight.check_extras
            unet.enable_xformers_memory_efficient_attention()
        if cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

        if cfg.lora is not None:
            from peft import LoraConfig

            lc = cfg.lora
            unet.to(acc.device)
            if self.weight_dtype != torch.float32:
                unet.to(self.weight_dtype)
            # the adapters' random init is a function of train.seed, not of whatever ran before in the process
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(cfg.train.seed)
                unet.add_adapter(LoraConfig(r=lc.rank, lora_alpha=lc.alpha or lc.rank, lora_dropout=lc.dropout,
                                            init_lora_weights=True if lc.init == "default" else lc.init,
                                            target_modules=lc.target_modules or bb.lora_target_modules))
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # trainable LoRA weights stay fp32 under mixed precision
        else:
            unet.to(acc.device).requires_grad_(True)
        pool = dict(seed=cfg.train.seed, every=cfg.pool_every(), cap=cfg.train.pool.cap, draw=cfg.train.pool.draw,
                    output_dir=self.out, is_main=acc.is_main_process)  # fmt: skip
        self.reference = make_reference(cfg.reference_kind(), needs_ref, cfg.lora is not None, unet,
                                        self.weight_dtype, unwrap=acc.unwrap_model, pool=pool,
                                        precomputed=precomputed).to(acc.device)  # fmt: skip
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.params)
        if cfg.train.compile:
            self._compile(unet)

        self.dataset = self._dataset()
        self.global_batch = cfg.train.batch_size * acc.num_processes
        self.lr = cfg.optim.lr * (self.global_batch * cfg.train.grad_accum if cfg.optim.scale_lr else 1)
        optimizer = self._optimizer()
        scheduler = self._lr_scheduler(optimizer)
        distributed.configure_deepspeed(acc, cfg)
        distributed.prepare_fsdp(acc, unet)
        self.unet, self.optimizer, self.scheduler = acc.prepare(unet, optimizer, scheduler)
        if acc.gradient_accumulation_steps != cfg.train.grad_accum:
            raise ConfigError(f"accelerate accumulates {acc.gradient_accumulation_steps} micro-batches but "
                              f"train.grad_accum={cfg.train.grad_accum}; leave accumulation out of accelerate's config")  # fmt: skip
        # the parameters the optimizer, clipping and EMA see, taken from the prepared model
        self.params = [p for p in acc.unwrap_model(self.unet).parameters() if p.requires_grad]
        if isinstance(self.reference, FrozenCopyReference):  # sharded like the policy where it is sharded
            self.reference.module = distributed.prepare_reference(acc, self.reference.module)
        self._save_kwargs, self._load_kwargs = distributed.checkpoint_kwargs(acc, cfg.lora is not None)
        self.source = self._source()
        self._register_checkpoint_hooks()
        self.ema = None
        if cfg.train.ema_decay:
            from diffusers.training_utils import EMAModel

            # saved and resumed by diffalign as safetensors + JSON (checkpoint.save_ema), not through
            # accelerate's register_for_checkpointing, which unpickles its files with weights_only=False
            self.ema = EMAModel(self.params, decay=cfg.train.ema_decay)

    def _kernels_and_layout(self, unet) -> str:
        """train.kernels (the backbone fuses its blocks; energies use the fused kernel) and
        train.channels_last; returns the summary's line."""
        from diffalign import kernels

        t, device = self.cfg.train, self.acc.device
        self.kernels_on, reason = kernels_wanted(t, device)
        if self.kernels_on:
            fused = ", ".join(f"{n} {k}" for n, k in self.backbone.apply_kernels().items()) or "none in this family"
            line = f"kernels on ({kernels.describe(device)}): fused energy; GroupNorm+SiLU in resnet blocks: {fused}"
        else:
            line = "kernels off" + (f" (auto: {reason}; plain torch)" if t.kernels == "auto" else "")
        if t.channels_last:
            unet.to(memory_format=torch.channels_last)
        compiled = f"torch.compile ({t.compile_backend})" if t.compile else "no compile"
        return f"{line}; {compiled}; {'channels-last' if t.channels_last else 'NCHW'}"

    def _compile(self, unet) -> None:
        """torch.compile the denoiser in place (its parameter names, and so checkpoints, do not change)."""
        import shutil

        from diffalign.config import ConfigError

        if self.cfg.train.compile_backend == "inductor" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
            raise ConfigError("train.compile: torch.compile's inductor backend needs a C++ compiler (g++ or clang++) "
                              "and none is on PATH; install one, or set train.compile_backend=aot_eager, or "
                              "train.compile=false")  # fmt: skip
        unet.compile(backend=self.cfg.train.compile_backend)

    def _source(self):
        cfg, acc = self.cfg, self.acc
        params = self.objective.validate(self.objective_params)
        common = dict(seed=cfg.train.seed, resolution=cfg.data.resolution, device=acc.device, dtype=self.weight_dtype,
                      global_batch=self.global_batch, local_batch=cfg.train.batch_size, rank=acc.process_index)  # fmt: skip
        s = cfg.experience.sampler
        if cfg.experience_source() == "rollout":
            from diffalign.rewards import create_scorer
            from diffalign.rewards.spm import as_step_scorer

            r = cfg.experience.rollout
            scorer = as_step_scorer(create_scorer(r.scorer, **({"device": acc.device} | r.scorer_args)))
            return RolloutSource(self.backbone, world=acc.num_processes, scorer=scorer, steps=s.steps,
                                 guidance=s.guidance, eta=s.eta, sample_batch=s.batch_size, candidates=r.candidates,
                                 divert_start_step=r.divert_start_step, inner_steps=r.inner_steps,
                                 threshold=r.threshold, pairs_per_step=r.pairs_per_step, unwrap=acc.unwrap_model,
                                 autocast=acc.autocast, **common)  # fmt: skip
        common |= dict(per_candidate_noise=candidate_noise(params), fused_energy=self.kernels_on)
        if cfg.experience_source() == "generated":
            return GeneratedSource(self.backbone, steps=s.steps, guidance=s.guidance, eta=s.eta,
                                   generator=cfg.experience.generator, sample_batch=s.batch_size, **common)  # fmt: skip
        return OfflineSource(self.backbone, candidates=self.objective.candidates, **common)

    def _lr_scheduler(self, optimizer):
        """accelerate steps a prepared scheduler once per process for each optimizer step (it assumes the
        schedule counts per-process batches), so its lengths are given in those units, as the diffusers
        scripts do: the lr after n steps is then the same for any number of processes."""
        o, n = self.cfg.optim, distributed.schedule_units(self.acc)  # DeepSpeed's engine steps it once
        if o.scheduler == "warmup_log_decay":
            return warmup_log_decay(optimizer, o.warmup_steps, o.decay_steps or self.cfg.train.max_steps, n)
        from diffusers.optimization import get_scheduler

        return get_scheduler(o.scheduler, optimizer, num_warmup_steps=o.warmup_steps * n,
                             num_training_steps=self.cfg.train.max_steps * n)  # fmt: skip

    def _dataset(self):
        return training_dataset(self.cfg, self.backbone, self.data)

    def _optimizer(self):
        o = self.cfg.optim
        if o.optimizer == "adamw":
            return torch.optim.AdamW(self.params, lr=self.lr, betas=o.adam_betas, weight_decay=o.weight_decay, eps=o.adam_eps)
        if o.optimizer == "adamw8bit":
            from diffalign.errors import require

            bnb = require("bitsandbytes", "bnb", "optim.optimizer=adamw8bit")
            return bnb.optim.AdamW8bit(self.params, lr=self.lr, betas=o.adam_betas, weight_decay=o.weight_decay, eps=o.adam_eps)
        from transformers.optimization import Adafactor

        # the Salesforce SDXL recipe: relative_step and parameter scaling off, update clipping at 1.0
        return Adafactor(self.params, lr=self.lr, weight_decay=o.weight_decay, scale_parameter=False,
                         relative_step=False, clip_threshold=1.0)

    def _register_checkpoint_hooks(self) -> None:
        """LoRA checkpoints hold only the adapter weights (megabytes, not the whole UNet). Under FSDP and
        DeepSpeed accelerate saves the model in the strategy's own format instead (distributed.py)."""
        if self.cfg.lora is None or not distributed.lora_hooks_apply(self.acc):
            return
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        def save_hook(models, weights, output_dir):
            if not self.acc.is_main_process:  # one writer; the others only drop the full weights
                weights.clear()
                return
            for i, m in enumerate(models):
                sd = {k: v.contiguous() for k, v in get_peft_model_state_dict(self.acc.unwrap_model(m)).items()}
                save_file(sd, str(Path(output_dir) / f"lora_{i}.safetensors"))
            weights.clear()

        def load_hook(models, input_dir):
            while models:
                i = len(models) - 1
                weights = load_file(str(Path(input_dir) / f"lora_{i}.safetensors"))
                set_peft_model_state_dict(self.acc.unwrap_model(models.pop()), weights)

        self.acc.register_save_state_pre_hook(save_hook)
        self.acc.register_load_state_pre_hook(load_hook)

    # ---- one micro-batch ------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.acc.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def compute_loss(self, batch: dict, micro: int):
        """One micro-batch: the source's experience, its energies under the policy and the reference module,
        and the objective's (loss, metrics)."""
        exp = self.source.next(batch, micro, self.unet, self.reference)
        if exp is None:  # nothing to learn in this batch on any process (SPO: no pair kept)
            return None
        return self._loss(exp)

    def autocast(self):
        """The mixed-precision context of a forward (distributed.autocast)."""
        return distributed.autocast(self.acc, self.weight_dtype)

    def _loss(self, exp):
        with self.autocast():
            energy = exp.energy(self.unet)
            with torch.no_grad():
                ref = self.reference.energies(exp, self.unet)
        phi = exp.phi.to(energy.device, energy.dtype)
        loss, metrics = self.objective(energy, ref, phi, **self.objective_params)
        if exp.weight != 1.0:
            loss = loss * exp.weight
        return loss, {**metrics, **exp.metrics, **self.reference.metrics()}

    # ---- the loop -----------------------------------------------------------------------------------
    def _loader(self):
        sampler = batch_sampler(self.cfg, self.dataset, self.acc.num_processes, self.acc.process_index, self.micro)
        from diffalign.data import collate_preference

        self.sampler = sampler
        collate = getattr(self.dataset, "collate", collate_preference)
        return DataLoader(_EpochIndexed(self.dataset), batch_sampler=sampler, collate_fn=collate,
                          num_workers=self.cfg.train.num_workers)

    def _source_pending(self) -> bool:
        """True while the source holds experience from an earlier batch (SPO's rollout buffer)."""
        pending = getattr(self.source, "pending", None)
        return bool(pending and pending())

    def _data_done(self) -> bool:
        """train.max_epochs passes over the data are read and the source holds nothing more."""
        epochs = self.cfg.train.max_epochs
        return epochs is not None and self.micro >= epochs * self.sampler.per_epoch and not self._source_pending()

    def _nothing_learned(self) -> None:
        """Count a batch the source found nothing to learn in; a whole epoch of them is an error (it would
        read data forever)."""
        self.counters["empty_batches"] = self.counters.get("empty_batches", 0) + 1
        self.counters["consecutive_empty"] = self.counters.get("consecutive_empty", 0) + 1
        if self.counters["consecutive_empty"] >= self.sampler.per_epoch:
            raise RuntimeError(f"no experience in {self.counters['consecutive_empty']} batches in a row (a whole epoch "
                               "of data): for SPO no rollout kept a pair; lower experience.rollout.threshold or "
                               "check the step scorer")  # fmt: skip

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss through the same forward passes as a real one (policy and reference, on a placeholder
        item), so every rank runs the same collectives: DDP's gradient sync, FSDP's gathers and
        reduce-scatters, ZeRO-3's parameter gathers. A source without a placeholder (SPO's rollouts, which
        run under DDP only) touches every trainable parameter instead, which is all DDP needs."""
        if hasattr(self.source, "placeholder"):
            return self._loss(self.source.placeholder())[0] * 0
        return sum((p * 0).sum() for p in self.params)

    def summary(self) -> str:
        cfg, acc = self.cfg, self.acc
        eff = self.global_batch * cfg.train.grad_accum
        n = len(self.dataset)
        trainable = self.n_trainable
        total = sum(p.numel() for p in self.backbone.denoiser.parameters())
        params = ", ".join(f"{k}={v}" for k, v in self.objective_params.items())
        lines = [
            f"diffalign train: {cfg.model.pretrained} ({self.backbone.family}, {self.backbone.prediction_type})",
            f"  objective   {self.objective.name} ({params}); reference: {self.reference.describe()}; "
            f"experience: {self.source.kind}",
            f"  tuning      {f'LoRA rank {cfg.lora.rank}' if cfg.lora else 'full'}: {trainable:,} of {total:,} parameters trainable",
            f"  data        {self._describe_data()}",
            f"  batch       {cfg.train.batch_size} per process x {acc.num_processes} processes x {cfg.train.grad_accum} accumulation = {eff} items per step"
            if self.source.kind != "rollout" else
            f"  batch       {cfg.train.batch_size} prompts per process per rollout; {cfg.experience.rollout.pairs_per_step} kept "
            f"pairs per process x {acc.num_processes} processes x {cfg.train.grad_accum} accumulation per step",
            f"  schedule    {cfg.train.max_steps} steps"
            + (" (epochs: as many as the kept pairs need)" if self.source.kind == "rollout"
               else f" = {cfg.train.max_steps * eff / max(n, 1):.2f} epochs")
            + f"; lr {self.lr:g} ({cfg.optim.optimizer}, {cfg.optim.scheduler}, warmup {cfg.optim.warmup_steps})",
            f"  precision   {cfg.train.mixed_precision}; device {acc.device}; output {self.out}",
            f"  parallel    {distributed.describe(acc)} over {acc.num_processes} processes",
            f"  speed       {self.speed}",
        ]
        return "\n".join(lines)

    def _describe_data(self) -> str:
        d = self.dataset
        return d.describe() if hasattr(d, "describe") else f"{len(d)} items"

    def train(self) -> dict:
        cfg, acc = self.cfg, self.acc
        path = self.resume_path
        if path is not None:
            acc.load_state(str(path), **self._load_kwargs)
            if self.ema is not None:
                ckpt.load_ema(self.ema, path)
            if hasattr(self.source, "load_state"):
                self.source.load_state(path)
            state = ckpt.read_state(path)
            self.step, self.micro = state["step"], state["micro"]
            self.counters.update(state["counters"])
            acc.print(f"resumed from {path} at step {self.step}")
        if acc.is_main_process:
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(cfg))
        acc.init_trackers("diffalign", config=self._tracker_config())
        acc.print(self.summary())  # before the reference loads a checkpoint pool: its adapters are no parameters of ours
        self.reference.on_step(self.step)

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (acc.is_local_main_process and cfg.logging.progress))
        batches = iter(self._loader())
        window: dict[str, list[float]] = {}
        last: dict[str, float] = {}
        t0 = time.time()
        try:
            while self.step < cfg.train.max_steps and not self._data_done():
                step_metrics, nonfinite = self._optimizer_step(batches)
                if nonfinite:
                    self.counters["nonfinite_steps"] += 1
                    self.counters["consecutive_nonfinite"] += 1
                    if self.counters["consecutive_nonfinite"] >= cfg.train.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{self.counters['consecutive_nonfinite']} consecutive steps had a non-finite loss or "
                            f"gradient (at step {self.step}); lower the learning rate or beta, or check the data"
                        )
                    continue
                self.counters["consecutive_nonfinite"] = 0
                self.step += 1
                self.reference.on_step(self.step)
                for k, v in step_metrics.items():
                    window.setdefault(k, []).append(v)
                bar.update(1)
                if self.step % cfg.logging.every == 0 or self.step == cfg.train.max_steps:
                    last = self._log(window, t0)
                    window = {}
                    bar.set_postfix({"loss": f"{last.get('loss', float('nan')):.4f}"}
                                    | ({"acc": f"{last['implicit_acc']:.2f}"} if "implicit_acc" in last else {}))
                if cfg.validation.every and self.step % cfg.validation.every == 0:
                    self.validate()
                if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.max_steps or self._data_done():
                    self.save_checkpoint()
            if window:  # stopped by train.max_epochs between logging steps
                last = self._log(window, t0)
        finally:
            bar.close()  # an error message starts on its own line, not after the bar
        self.export(last)
        acc.end_training()
        return last

    def _optimizer_step(self, batches) -> tuple[dict[str, float], bool]:
        cfg, acc = self.cfg, self.acc
        accum = cfg.train.grad_accum
        sums: dict[str, float] = {}
        nonfinite = False
        i = 0
        while i < accum:
            if self._source_pending():  # experience left from an earlier batch (SPO's kept pairs): no data read
                batch, micro = {}, None
            else:
                batch = next(batches)
                micro = self.micro
                self.micro += 1
                if batch is None or batch.get("skipped"):
                    self.counters["skipped_items"] += (batch or {}).get("skipped", cfg.train.batch_size)
            # gradients sync on the last micro-batch only (DDP no_sync, FSDP2 without reduce-scatter; under
            # DeepSpeed the engine accumulates, clips and steps inside acc.backward). accelerate counts the
            # micro-batches it has entered; a batch with nothing to learn is read again, so the count is set
            # to this micro-step's place in the step rather than left to run on.
            acc.step = i
            # a micro-step on pending experience reads no data: its draws are keyed on the optimizer step instead
            key = ("torchrng", micro) if micro is not None else ("pending", self.step * accum + i)
            with acc.accumulate(self.unet), self._keyed_global_rng(*key):
                if batch is not None:
                    out = self.compute_loss(self._to_device(batch), micro)
                    if out is None:  # read the next batch for this micro-step (the same on every process)
                        self._nothing_learned()
                        continue
                    self.counters.pop("consecutive_empty", None)
                    loss, metrics = out
                    ok = torch.isfinite(loss.detach()).float()
                else:
                    loss, metrics, ok = None, {}, torch.ones((), device=acc.device)
                all_ok = acc.gather(ok.reshape(1).to(acc.device)).min().item() > 0
                if not all_ok:
                    nonfinite = True
                if loss is None:  # nothing usable on this rank: the same passes, on a placeholder
                    loss = self._zero_loss()
                elif not all_ok:  # the step is skipped; the backward still runs, so every rank syncs alike
                    # (DeepSpeed steps inside backward: there the micro-batch adds a zero gradient instead)
                    loss = self._zero_loss() if distributed.is_deepspeed(acc) else loss.nan_to_num() * 0
                acc.backward(loss)  # divided by train.grad_accum (accelerate's, or DeepSpeed's)
            for k, v in ({"loss": loss.detach()} | metrics).items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
            i += 1
        grad_norm = acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_ok = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)).item())
        if nonfinite or (not grad_ok and cfg.train.mixed_precision != "fp16"):
            self.optimizer.zero_grad(set_to_none=True)
            return sums, True
        # under fp16 the grad scaler skips an overflowing step and lowers its scale; under DeepSpeed the engine
        # has stepped in acc.backward and this is a no-op
        self.optimizer.step()
        self._check_weights(f"the update of step {self.step + 1}")
        self.scheduler.step()
        if self.ema is not None:
            self.ema.step(self.params)
        self.optimizer.zero_grad(set_to_none=True)
        if self.acc.optimizer_step_was_skipped:
            self.counters["scaler_skipped_steps"] = self.counters.get("scaler_skipped_steps", 0) + 1
        elif grad_norm is not None:
            sums["grad_norm"] = float(grad_norm)
        sums["lr"] = self.scheduler.get_last_lr()[0]
        return sums, False

    @contextmanager
    def _keyed_global_rng(self, stream: str, position: int):
        """Inside a micro-batch, torch's global RNG (LoRA dropout draws from it) is seeded from (seed, stream,
        micro-step, process) and restored after. Left to run on, it would not survive a resume: the RNG
        states accelerate restores are those of the checkpoint, but starting a DataLoader iterator draws
        its base seed from the global stream, one draw a resumed run makes at another point."""
        acc = self.acc
        devices = [acc.device] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(stream_seed(self.cfg.train.seed, stream, position * acc.num_processes + acc.process_index))
            yield

    def _log(self, window: dict[str, list[float]], t0: float) -> dict[str, float]:
        acc = self.acc
        local = torch.tensor([sum(v) / len(v) for v in window.values()], device=acc.device, dtype=torch.float64)
        mean = acc.reduce(local, reduction="mean") if acc.num_processes > 1 else local
        metrics = dict(zip(window, mean.tolist()))
        metrics |= {"step": self.step, "elapsed_s": round(time.time() - t0, 2)}
        metrics |= {k: v for k, v in self.counters.items() if not k.startswith("consecutive_")}
        self._check_skip_share()
        acc.log({_tracker_tag(k): v for k, v in metrics.items() if k != "step"}, step=self.step)
        if acc.is_main_process:
            with open(self.out / "logs" / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        return metrics

    def _tracker_config(self) -> dict:
        """The resolved config (defaults included) flattened to `section.key` scalars, plus what the run
        derived from it, for the trackers' hyper-parameter views."""
        import diffalign

        flat: dict = {}

        def walk(prefix: str, node) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}{k}.", v)
            else:
                flat[prefix[:-1]] = node if isinstance(node, (bool, int, float, str)) else json.dumps(node)

        walk("", self.cfg.model_dump(mode="json"))
        flat |= {"run.processes": self.acc.num_processes, "run.effective_batch": self.global_batch * self.cfg.train.grad_accum,
                 "run.lr": self.lr, "run.trainable_parameters": sum(p.numel() for p in self.params),
                 "run.diffalign_version": diffalign.__version__}  # fmt: skip
        return flat

    def _check_skip_share(self) -> None:
        """Stop when the share of skipped items read so far (all processes) passes data.max_skip_fraction;
        from the moment the run has read as many items as the pre-flight probe decoded."""
        acc = self.acc
        counts = torch.tensor([self.counters["skipped_items"], self.micro * self.cfg.train.batch_size],
                              device=acc.device, dtype=torch.float64)  # fmt: skip
        if acc.num_processes > 1:
            counts = acc.reduce(counts, reduction="sum")
        skipped, read = (int(x) for x in counts.tolist())
        if read >= min(preflight.PROBE_ITEMS, len(self.dataset)):
            preflight.check_skip_share(self.dataset, skipped, read, self.cfg.data.max_skip_fraction,
                                       f"read by step {self.step}", none_usable_is_error=False)  # fmt: skip

    # ---- checkpoints, validation, export -------------------------------------------------------------
    @contextmanager
    def ema_weights(self):
        """The trainable weights hold their EMA inside the block (no-op without EMA), raw ones after."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def _check_weights(self, what: str) -> None:
        """Raise NonFiniteLossError if a trainable weight is non-finite or above train.max_weight_abs."""
        limit = self.cfg.train.max_weight_abs
        peaks = torch.stack(torch._foreach_norm([p.detach() for p in self.params], math.inf))
        peak = peaks.max().item()
        if math.isfinite(peak) and (limit is None or peak <= limit):
            return
        bad = int(torch.nan_to_num(peaks, nan=math.inf).argmax())
        name = [n for n, p in self.acc.unwrap_model(self.unet).named_parameters() if p.requires_grad][bad]
        pointer = ckpt.checkpoint_root(self.out) / ckpt.LATEST
        last = pointer.read_text().strip() if pointer.is_file() else "none"
        raise NonFiniteLossError(
            f"{what} left weight {name} at |w| = {peak:.3g} (train.max_weight_abs={limit}); the run stops "
            f"without saving it. The last checkpoint ({last}) holds the weights from before: lower optim.lr or "
            "the objective's beta, or clip harder (optim.max_grad_norm)"
        )

    def save_checkpoint(self) -> Path:
        self._check_weights(f"step {self.step}")  # never checkpoint weights that blew up
        root = ckpt.checkpoint_root(self.out)
        final = root / f"step-{self.step:07d}"
        tmp = root / f"step-{self.step:07d}.tmp"
        if self.acc.is_main_process:  # what a save killed at this step left behind
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp), **self._save_kwargs)  # each rank its files (RNG state; its shards)
        if self.ema is not None and self.acc.is_main_process:
            ckpt.save_ema(self.ema, tmp)
        self.acc.wait_for_everyone()  # every rank has written before rank 0 renames and points `latest`
        if self.acc.is_main_process:
            if hasattr(self.source, "save_state"):  # experience not yet trained on (SPO's kept pairs)
                self.source.save_state(tmp)
            state = {"step": self.step, "micro": self.micro, "counters": self.counters,
                     "objective": self._objective_state()}  # fmt: skip
            ckpt.finalize(tmp, final, state, self.cfg.checkpoint.keep)
            if self.pushes_to_hub:
                from diffalign.training.export import push_folder

                push_folder(self, final, "last-checkpoint", f"checkpoint at step {self.step}")
        self.acc.wait_for_everyone()
        self.reference.on_checkpoint(final, self.step)
        return final

    def validate(self) -> Path | None:
        from diffalign.training.export import validation_grid

        # sharded weights: every rank samples (each forward is a collective); rank 0 writes the grid
        if not (self.acc.is_main_process or distributed.is_sharded(self.acc)):
            return None
        with self.ema_weights():
            return validation_grid(self, self.step)

    def export(self, metrics: dict) -> Path | None:
        from diffalign.training.export import export_final

        acc = self.acc
        acc.wait_for_everyone()
        with self.ema_weights():  # whole weights gathered by every rank (a collective when sharded)
            if self.cfg.lora is not None:
                weights = distributed.gather_trainable(acc, self.unet)
            else:
                weights = distributed.full_state_dict(acc, self.unet) if distributed.is_sharded(acc) else None
            if not acc.is_main_process:
                return None
            return export_final(self, metrics, weights)
