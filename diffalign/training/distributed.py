"""The distributed strategy accelerate set up, and the few places training acts differently under it.

The strategy is accelerate's, never diffalign's: `accelerate launch --config_file
configs/accelerate/{ddp,fsdp,zero2,zero3}.yaml` (or `accelerate config`, or its environment variables) sets
it up, and the trainer reads what the Accelerator became. diffalign's config keeps only what it already
owned: train.batch_size, train.grad_accum, train.mixed_precision and optim.max_grad_norm, which are handed
to DeepSpeed; a DeepSpeed config that sets them differently is refused.

| strategy | policy | frozen reference (full fine-tuning) | accumulation | checkpoint |
|---|---|---|---|---|
| single / ddp | whole on every rank | a frozen copy on every rank | accelerate.accumulate (no_sync) | LoRA: `lora_0.safetensors`; full: accelerate's |
| fsdp (FSDP2) | sharded | sharded like the policy | accelerate.accumulate | accelerate's FSDP state (sharded) |
| zero1/2 | whole (grads and optimizer sharded) | a frozen copy on every rank | DeepSpeed's | DeepSpeed's; LoRA: trainable weights only |
| zero3 | sharded | its own ZeRO-3 engine, no optimizer | DeepSpeed's | DeepSpeed's; LoRA: trainable weights only |

Under a sharded strategy (fsdp, zero3) every forward is a collective: all ranks run validation sampling
and gather weights for export together, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from diffalign.configio import ConfigError
from diffalign.errors import require

SHARDED = ("fsdp", "zero3")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(cfg):
    """The Accelerator a config asks for: accelerate's strategy (from its launcher / config / env), the
    config's mixed precision and accumulation, trackers, and the run folder as project dir."""
    from pathlib import Path

    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

    out = Path(cfg.output_dir)
    log_with = [t for t, on in (("tensorboard", cfg.logging.tensorboard), ("wandb", cfg.logging.wandb)) if on]
    device = torch.cuda.is_available() or torch.backends.mps.is_available()
    deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    if deepspeed:
        require("deepspeed", "deepspeed", "accelerate's DeepSpeed config")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched and launched != cfg.train.mixed_precision and int(os.environ.get("RANK", "0")) == 0:
        print(f"diffalign train: accelerate's config says mixed_precision={launched}; train.mixed_precision="
              f"{cfg.train.mixed_precision} decides")  # fmt: skip
    return Accelerator(
        # without an accelerator, cpu=True lets torchrun-launched processes form a gloo DDP group; DeepSpeed
        # is never chosen with cpu=True, so it gets a gloo group of its own (DeepSpeed's CPU accelerator)
        cpu=not (device or deepspeed),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if deepspeed and not device else None,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.train.grad_accum,
                                                                sync_with_dataloader=False),  # fmt: skip
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def strategy(acc) -> str:
    """single | ddp | fsdp | zero1 | zero2 | zero3: what the Accelerator runs."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return f"zero{acc.state.deepspeed_plugin.zero_stage}"
    return "ddp" if acc.num_processes > 1 else "single"


def is_sharded(acc) -> bool:
    """Whether parameters are split over the ranks (a forward, or a whole state dict, is a collective)."""
    return strategy(acc) in SHARDED


def is_deepspeed(acc) -> bool:
    return strategy(acc).startswith("zero")


def describe(acc) -> str:
    s = strategy(acc)
    if s == "fsdp":
        p = acc.state.fsdp_plugin
        return f"FSDP{p.fsdp_version} ({p.state_dict_type.name.lower()}; reshard after forward {p.reshard_after_forward})"
    if s.startswith("zero"):
        return f"DeepSpeed ZeRO-{s[-1]}"
    return {"ddp": "DDP", "single": "one process"}[s]


def check(acc, cfg) -> None:
    """Refuse what accelerate's setup and the config cannot run together, naming both."""
    s = strategy(acc)
    if _env_flag("ACCELERATE_USE_FSDP") and s != "fsdp":
        raise ConfigError("accelerate was asked for FSDP (ACCELERATE_USE_FSDP) but runs "
                          f"{describe(acc)}: accelerate chooses FSDP only on GPU-type devices; launch on GPUs, or "
                          "without the FSDP config")  # fmt: skip
    if s in SHARDED and cfg.train.ema_decay:
        raise ConfigError(f"train.ema_decay is not supported under {describe(acc)} (the EMA copy would hold only "
                          "this rank's shards); use DDP or ZeRO-2, or set train.ema_decay=0")  # fmt: skip
    if s in SHARDED and cfg.experience_source() in ("generated", "rollout"):
        raise ConfigError(f"experience.source={cfg.experience_source()} is not supported under {describe(acc)} "
                          "(sampling through sharded weights needs every rank in step); use DDP or ZeRO-2")  # fmt: skip
    if s != "single" and s != "ddp" and cfg.reference_kind() == "pool":
        raise ConfigError(f"train.reference=pool is not supported under {describe(acc)} (the pool loads adapters "
                          "into the unsharded module); use DDP")  # fmt: skip
    if s in SHARDED and cfg.train.compile:
        raise ConfigError(f"train.compile is not supported under {describe(acc)} in diffalign; set "
                          "train.compile=false")  # fmt: skip
    if s.startswith("zero"):
        want = {"gradient_accumulation_steps": cfg.train.grad_accum,
                "train_micro_batch_size_per_gpu": cfg.train.batch_size}  # fmt: skip
        ds = acc.state.deepspeed_plugin.deepspeed_config
        for key, value in want.items():
            if ds.get(key, "auto") not in ("auto", value):
                raise ConfigError(f"the DeepSpeed config sets {key}={ds[key]} but diffalign's config gives "
                                  f"{value}; leave it out of the DeepSpeed config (or 'auto')")  # fmt: skip


def configure_deepspeed(acc, cfg) -> None:
    """Hand DeepSpeed what diffalign's config decides: micro-batch, accumulation, clipping, global batch."""
    if not is_deepspeed(acc):
        return
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
    if cfg.optim.max_grad_norm:
        ds["gradient_clipping"] = cfg.optim.max_grad_norm
    else:
        ds.pop("gradient_clipping", None)


def schedule_units(acc) -> int:
    """How many times the prepared LR scheduler steps per optimizer step: accelerate steps it once per
    process (so lengths are given in those units); DeepSpeed's engine steps it once."""
    return 1 if is_deepspeed(acc) else acc.num_processes


def autocast(acc, dtype: torch.dtype):
    """The mixed-precision context of a forward. accelerate's, except under DeepSpeed, which casts the
    model itself and leaves inputs as they come: there torch.autocast brings them to the model's dtype."""
    if is_deepspeed(acc) and dtype != torch.float32:
        return torch.autocast(acc.device.type, dtype=dtype)
    return acc.autocast()


def prepare_fsdp(acc, model: nn.Module) -> None:
    """Before accelerate's FSDP2 wrap: the wrap classes default to the model's `_no_split_modules`, which
    accelerate looks up by class name; blocks diffalign swapped for a subclass (fused kernels) are named
    by their new class so they stay units of their own."""
    if strategy(acc) != "fsdp":
        return
    plugin = acc.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is not None:
        return
    wanted = set(getattr(model, "_no_split_modules", None) or [])
    present = {type(m) for m in model.modules()}
    names = sorted({c.__name__ for c in present if any(b.__name__ in wanted for b in c.__mro__)})
    plugin.transformer_cls_names_to_wrap = names


def prepare_reference(acc, module: nn.Module) -> nn.Module:
    """The frozen reference under the strategy: sharded like the policy under FSDP, its own ZeRO-3 engine
    (no optimizer) under ZeRO-3, else as is (a whole copy per rank)."""
    s = strategy(acc)
    if s == "fsdp":
        from accelerate.utils import fsdp2_prepare_model

        prepare_fsdp(acc, module)
        return fsdp2_prepare_model(acc, module)
    if s == "zero3":
        import deepspeed

        ds = acc.state.deepspeed_plugin.deepspeed_config
        config = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "bf16": ds.get("bf16", {"enabled": False}), "fp16": ds.get("fp16", {"enabled": False})}  # fmt: skip
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.eval()
        return engine
    return module


def gather_trainable(acc, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable weight whole, on every rank, as float32 CPU tensors, by parameter name. A collective
    under FSDP and ZeRO-3: every rank must call it."""
    model = acc.unwrap_model(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gathered = contextlib.nullcontext()
    if strategy(acc) == "zero3":
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    out = {}
    with gathered:
        for name, p in named:
            t = p.detach()
            if hasattr(t, "full_tensor"):  # an FSDP2 DTensor shard
                t = t.full_tensor()
            out[name] = t.float().cpu().clone()
    return out


def full_state_dict(acc, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 (None elsewhere; on every rank under DDP). A collective
    under FSDP and ZeRO-3: every rank must call it. ZeRO-3 gathers its 16-bit weights
    (zero3_save_16bit_model: true in the accelerate config)."""
    if not is_sharded(acc):
        return acc.unwrap_model(model).state_dict()
    sd = acc.get_state_dict(model)
    return sd if acc.is_main_process else None


def module_with(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded, CPU) copy of a diffusers model holding `state`, for saving with save_pretrained."""
    # FSDP2 swaps the model's class for FSDP<Name>(FSDPModule, <Name>): the model's own class is the first
    # diffusers class in the MRO
    cls = next(c for c in type(model).__mro__ if hasattr(c, "from_config") and not c.__name__.startswith("FSDP"))
    plain = cls.from_config(model.config)
    plain.load_state_dict({k: v.float().cpu() for k, v in state.items()}, strict=True)
    return plain


def checkpoint_kwargs(acc, lora: bool) -> tuple[dict, dict]:
    """Extra arguments of accelerate's save_state / load_state: under DeepSpeed a LoRA checkpoint leaves the
    frozen base weights out (DeepSpeed saves the engine itself, so diffalign's LoRA hooks never see it)."""
    if is_deepspeed(acc) and lora:
        return {"exclude_frozen_parameters": True}, {"load_module_strict": False}
    return {}, {}


def lora_hooks_apply(acc) -> bool:
    """Whether diffalign's LoRA-only save/load hooks run: under FSDP and DeepSpeed accelerate saves the
    model with the strategy's own (sharded) format and the hooks would see shards."""
    return strategy(acc) in ("single", "ddp")
