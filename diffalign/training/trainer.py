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
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffalign.backbones.registry import backbone_from_config
from diffalign.config import Config, dump_config, weight_dtype
from diffalign.objectives import get_objective
from diffalign.training import checkpoint as ckpt
from diffalign.training.experience import GeneratedSource, OfflineSource
from diffalign.training.reference import make_reference


class NonFiniteLossError(RuntimeError):
    pass


class GlobalBatchSampler:
    """Yields this process's slice of global batches, from micro-step `start` on, forever (epochs loop).

    Global batch m is positions [p*G, (p+1)*G) of the permutation of epoch e, where (e, p) = divmod(m, P),
    P = floor(N / G) batches per epoch (the incomplete tail is dropped), G = batch_size * world_size."""

    def __init__(self, n_items: int, batch_size: int, world_size: int, rank: int, seed: int, start: int = 0):
        self.n, self.b, self.world, self.rank, self.seed, self.start = n_items, batch_size, world_size, rank, seed, start
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
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1009 + epoch))
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


def make_accelerator(cfg: Config):
    """The Accelerator a config asks for (mixed precision, trackers, the run folder as project dir)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    log_with = [t for t, on in (("tensorboard", cfg.logging.tensorboard), ("wandb", cfg.logging.wandb)) if on]
    return Accelerator(
        # without an accelerator, cpu=True lets torchrun-launched processes form a gloo DDP group
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=cfg.train.mixed_precision,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


class Trainer:
    """`Trainer(cfg).train()`. Pass `accelerator` to run inside one you built (its mixed precision must
    match train.mixed_precision); by default one is made from the config."""

    def __init__(self, cfg: Config, resume: str | None = None, accelerator=None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.acc = accelerator if accelerator is not None else make_accelerator(cfg)
        if self.acc.mixed_precision != cfg.train.mixed_precision:
            raise ValueError(f"the accelerator runs mixed_precision={self.acc.mixed_precision!r} but the config "
                             f"asks for {cfg.train.mixed_precision!r}")  # fmt: skip
        self.weight_dtype = weight_dtype(cfg.train.mixed_precision)
        self.objective = get_objective(cfg.objective.name)
        self.objective_params = cfg.objective.params()
        self.step = 0  # optimizer steps taken
        self.micro = 0  # micro-batches consumed (the data position)
        self.counters = {"skipped_items": 0, "nonfinite_steps": 0, "consecutive_nonfinite": 0}
        self.resume = resume
        self._build()

    # ---- setup ------------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, acc = self.cfg, self.acc
        mc = cfg.model
        self.backbone = bb = backbone_from_config(mc)
        unet = bb.denoiser
        unet.requires_grad_(False)
        bb.place(acc.device, self.weight_dtype, mc.vae_fp32)
        self.speed = self._kernels_and_layout(unet)
        if cfg.train.attention == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError as err:
                raise ImportError("train.attention=xformers needs xformers: pip install 'diffalign[xformers]'") from err
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
        needs_ref = self.objective.needs_reference
        self.reference = make_reference(cfg.train.reference, needs_ref, cfg.lora is not None, unet,
                                        self.weight_dtype, unwrap=acc.unwrap_model).to(acc.device)  # fmt: skip
        self.params = [p for p in unet.parameters() if p.requires_grad]
        if cfg.train.compile:
            self._compile(unet)

        self.dataset = self._dataset()
        self.global_batch = cfg.train.batch_size * acc.num_processes
        self.lr = cfg.optim.lr * (self.global_batch * cfg.train.grad_accum if cfg.optim.scale_lr else 1)
        optimizer = self._optimizer()
        from diffusers.optimization import get_scheduler

        # accelerate steps a prepared scheduler once per process for each optimizer step (it assumes the
        # schedule counts per-process batches), so its lengths are given in those units, as the diffusers
        # scripts do: the lr after n steps is then the same for any number of processes.
        scheduler = get_scheduler(cfg.optim.scheduler, optimizer,
                                  num_warmup_steps=cfg.optim.warmup_steps * acc.num_processes,
                                  num_training_steps=cfg.train.max_steps * acc.num_processes)  # fmt: skip
        self.unet, self.optimizer, self.scheduler = acc.prepare(unet, optimizer, scheduler)
        # the parameters the optimizer, clipping and EMA see, taken from the prepared model
        self.params = [p for p in acc.unwrap_model(self.unet).parameters() if p.requires_grad]
        self.source = self._source()
        self._register_checkpoint_hooks()
        self.ema = None
        if cfg.train.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=cfg.train.ema_decay)
            acc.register_for_checkpointing(self.ema)  # saved and resumed with the checkpoint

    def _kernels_and_layout(self, unet) -> str:
        """train.kernels (the backbone fuses its blocks; energies use the fused kernel) and
        train.channels_last; returns the summary's line."""
        from diffalign import kernels

        t, device = self.cfg.train, self.acc.device
        reason = kernels.fallback_reason(device) or (None if device.type == "cuda" else "no CUDA device")
        self.kernels_on = t.kernels == "on" or (t.kernels == "auto" and reason is None)
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
                      global_batch=self.global_batch, local_batch=cfg.train.batch_size, rank=acc.process_index,
                      per_candidate_noise=getattr(params, "noise", "shared") == "per_image",
                      fused_energy=self.kernels_on)  # fmt: skip
        if cfg.experience_source() == "generated":
            s = cfg.experience.sampler
            return GeneratedSource(self.backbone, steps=s.steps, guidance=s.guidance, eta=s.eta,
                                   generator=cfg.experience.generator, sample_batch=s.batch_size, **common)  # fmt: skip
        return OfflineSource(self.backbone, candidates=self.objective.candidates, **common)

    def _dataset(self):
        if self.cfg.cache.enabled:
            from diffalign.training.cache import CachedPreferenceDataset, cache_dir_for

            return CachedPreferenceDataset(cache_dir_for(self.cfg), self.backbone, self.cfg)
        from diffalign.data import build_preference_dataset

        return build_preference_dataset(self.cfg.data, seed=self.cfg.train.seed)

    def _optimizer(self):
        o = self.cfg.optim
        if o.optimizer == "adamw":
            return torch.optim.AdamW(self.params, lr=self.lr, betas=o.adam_betas, weight_decay=o.weight_decay, eps=o.adam_eps)
        if o.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError("optim.optimizer=adamw8bit needs bitsandbytes: pip install 'diffalign[bnb]'") from err
            return bnb.optim.AdamW8bit(self.params, lr=self.lr, betas=o.adam_betas, weight_decay=o.weight_decay, eps=o.adam_eps)
        from transformers.optimization import Adafactor

        # the Salesforce SDXL recipe: relative_step and parameter scaling off, update clipping at 1.0
        return Adafactor(self.params, lr=self.lr, weight_decay=o.weight_decay, scale_parameter=False,
                         relative_step=False, clip_threshold=1.0)

    def _register_checkpoint_hooks(self) -> None:
        """LoRA checkpoints hold only the adapter weights (megabytes, not the whole UNet)."""
        if self.cfg.lora is None:
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
        with self.acc.autocast():
            energy = exp.energy(self.unet)
            with torch.no_grad(), self.reference.model(self.unet) as ref_model:
                ref = exp.energy(ref_model) if ref_model is not None else None
        phi = exp.phi.to(energy.device, energy.dtype)
        loss, metrics = self.objective(energy, ref, phi, **self.objective_params)
        return loss, {**metrics, **exp.metrics}

    # ---- the loop -----------------------------------------------------------------------------------
    def _loader(self):
        sampler = GlobalBatchSampler(len(self.dataset), self.cfg.train.batch_size, self.acc.num_processes,
                                     self.acc.process_index, self.cfg.train.seed, start=self.micro)
        from diffalign.data import collate_preference

        self.sampler = sampler
        collate = getattr(self.dataset, "collate", collate_preference)
        return DataLoader(_EpochIndexed(self.dataset), batch_sampler=sampler, collate_fn=collate,
                          num_workers=self.cfg.train.num_workers)

    def _zero_loss(self) -> torch.Tensor:
        # touches every trainable parameter, so DDP's gradient sync runs on every process alike
        return sum((p * 0).sum() for p in self.params)

    def summary(self) -> str:
        cfg, acc = self.cfg, self.acc
        eff = self.global_batch * cfg.train.grad_accum
        n = len(self.dataset)
        trainable = sum(p.numel() for p in self.params)
        total = sum(p.numel() for p in self.backbone.denoiser.parameters())
        params = ", ".join(f"{k}={v}" for k, v in self.objective_params.items())
        lines = [
            f"diffalign train: {cfg.model.pretrained} ({self.backbone.family}, {self.backbone.prediction_type})",
            f"  objective   {self.objective.name} ({params}); reference: {self.reference.describe()}; "
            f"experience: {self.source.kind}",
            f"  tuning      {f'LoRA rank {cfg.lora.rank}' if cfg.lora else 'full'}: {trainable:,} of {total:,} parameters trainable",
            f"  data        {self._describe_data()}",
            f"  batch       {cfg.train.batch_size} per process x {acc.num_processes} processes x {cfg.train.grad_accum} accumulation = {eff} items per step",
            f"  schedule    {cfg.train.max_steps} steps = {cfg.train.max_steps * eff / max(n, 1):.2f} epochs; lr {self.lr:g} ({cfg.optim.optimizer}, {cfg.optim.scheduler}, warmup {cfg.optim.warmup_steps})",
            f"  precision   {cfg.train.mixed_precision}; device {acc.device}; output {self.out}",
            f"  speed       {self.speed}",
        ]
        return "\n".join(lines)

    def _describe_data(self) -> str:
        d = self.dataset
        return d.describe() if hasattr(d, "describe") else f"{len(d)} items"

    def train(self) -> dict:
        cfg, acc = self.cfg, self.acc
        if self.resume:
            path = ckpt.resolve(self.out, self.resume)
            if path is not None:
                acc.load_state(str(path))
                state = ckpt.read_state(path)
                self.step, self.micro = state["step"], state["micro"]
                self.counters.update(state["counters"])
                acc.print(f"resumed from {path} at step {self.step}")
        self.reference.on_step(self.step)
        if acc.is_main_process:
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(cfg))
        acc.init_trackers("diffalign")
        acc.print(self.summary())

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (acc.is_local_main_process and cfg.logging.progress))
        batches = iter(self._loader())
        window: dict[str, list[float]] = {}
        last: dict[str, float] = {}
        t0 = time.time()
        while self.step < cfg.train.max_steps:
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
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.max_steps:
                self.save_checkpoint()
        bar.close()
        self.export(last)
        acc.end_training()
        return last

    def _optimizer_step(self, batches) -> tuple[dict[str, float], bool]:
        cfg, acc = self.cfg, self.acc
        accum = cfg.train.grad_accum
        sums: dict[str, float] = {}
        nonfinite = False
        for i in range(accum):
            batch = next(batches)
            micro = self.micro
            self.micro += 1
            if batch is None or batch.get("skipped"):
                self.counters["skipped_items"] += (batch or {}).get("skipped", cfg.train.batch_size)
            sync = acc.no_sync(self.unet) if i < accum - 1 and acc.num_processes > 1 else nullcontext()
            with sync:
                if batch is not None:
                    loss, metrics = self.compute_loss(self._to_device(batch), micro)
                    ok = torch.isfinite(loss.detach()).float()
                else:
                    loss, metrics, ok = None, {}, torch.ones((), device=acc.device)
                all_ok = acc.gather(ok.reshape(1).to(acc.device)).min().item() > 0
                if not all_ok:
                    nonfinite = True
                if loss is None or not all_ok:
                    loss = self._zero_loss()
                acc.backward(loss / accum)
            for k, v in ({"loss": loss.detach()} | metrics).items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        grad_norm = acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm or math.inf)
        grad_ok = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)).item())
        if nonfinite or (not grad_ok and cfg.train.mixed_precision != "fp16"):
            self.optimizer.zero_grad(set_to_none=True)
            return sums, True
        self.optimizer.step()  # under fp16 the grad scaler skips an overflowing step and lowers its scale
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

    def _log(self, window: dict[str, list[float]], t0: float) -> dict[str, float]:
        acc = self.acc
        local = torch.tensor([sum(v) / len(v) for v in window.values()], device=acc.device, dtype=torch.float64)
        mean = acc.reduce(local, reduction="mean") if acc.num_processes > 1 else local
        metrics = dict(zip(window, mean.tolist()))
        metrics |= {"step": self.step, "elapsed_s": round(time.time() - t0, 2)}
        metrics |= {k: v for k, v in self.counters.items() if k != "consecutive_nonfinite"}
        acc.log(metrics, step=self.step)
        if acc.is_main_process:
            with open(self.out / "logs" / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        return metrics

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

    def save_checkpoint(self) -> Path:
        root = ckpt.checkpoint_root(self.out)
        final = root / f"step-{self.step:07d}"
        tmp = root / f"step-{self.step:07d}.tmp"
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()  # every rank has written its files (RNG states) before the rename
        if self.acc.is_main_process:
            state = {"step": self.step, "micro": self.micro, "counters": self.counters}
            ckpt.finalize(tmp, final, state, self.cfg.checkpoint.keep)
        self.acc.wait_for_everyone()
        self.reference.on_checkpoint(final, self.step)
        return final

    def validate(self) -> Path | None:
        from diffalign.training.export import validation_grid

        if not self.acc.is_main_process:
            return None
        with self.ema_weights():
            return validation_grid(self, self.step)

    def export(self, metrics: dict) -> Path | None:
        from diffalign.training.export import export_final

        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return None
        with self.ema_weights():
            return export_final(self, metrics)
