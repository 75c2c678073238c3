"""Typed, validated training configs: YAML plus dotted command-line overrides.

An unknown or misspelt key is an error naming the closest valid key; a wrong type says which field.
Every section lives here except `data`, which lives beside the data code (diffalign/data/config.py).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from diffalign.configio import ConfigError as ConfigError  # re-exported: one class for every config
from diffalign.configio import load
from diffalign.data.config import DataConfig


class _Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    #: hub id, local diffusers folder, or tiny:sd / tiny:sdxl (tiny random models built in code)
    pretrained: str
    family: Literal["auto", "sd", "sdxl", "pixel"] = "auto"
    revision: str | None = None
    variant: str | None = None
    #: a separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL under fp16
    vae: str | None = None
    #: override the scheduler's prediction type (epsilon / v_prediction / sample)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None
    #: the VAE runs in fp32 by default even under mixed precision ("to avoid NaN losses", diffusers)
    vae_fp32: bool = True


class LoraConfig(_Section):
    rank: int = pydantic.Field(8, ge=1)
    alpha: float | None = None  # None: alpha = rank, as the diffusers DPO scripts set it
    target_modules: list[str] = ["to_k", "to_q", "to_v", "to_out.0"]
    init: Literal["gaussian", "default"] = "gaussian"
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0)


class ObjectiveConfig(_Section):
    """`name` picks the objective; other keys are its hyper-parameters (see diffalign/objectives)."""

    model_config = pydantic.ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(_Section):
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = "adamw"
    lr: float = pydantic.Field(1e-5, gt=0)
    #: multiply lr by the effective batch (per-GPU batch x accumulation x processes), as --scale_lr does
    scale_lr: bool = False
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = pydantic.Field(0, ge=0)
    max_grad_norm: float | None = 1.0


class TrainSection(_Section):
    batch_size: int = pydantic.Field(1, ge=1)  # items (pairs / ranked lists) per process per micro-step
    grad_accum: int = pydantic.Field(1, ge=1)
    max_steps: int = pydantic.Field(100, ge=1)  # optimizer steps
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    seed: int = 0
    #: where ref energies come from: auto = adapters off for LoRA, a frozen copy for full fine-tuning
    reference: Literal["auto", "lora_off", "frozen_copy"] = "auto"
    #: stop after this many consecutive steps skipped for a non-finite loss or gradient
    max_nonfinite_steps: int = pydantic.Field(5, ge=1)
    num_workers: int = pydantic.Field(0, ge=0)
    #: exponential moving average of the trainable weights (diffusers' EMAModel: per-step decay
    #: min(ema_decay, (1 + n) / (10 + n))); validation images and the export use the EMA weights. 0 = off
    ema_decay: float = pydantic.Field(0.0, ge=0.0, lt=1.0)


class LoggingConfig(_Section):
    every: int = pydantic.Field(10, ge=1)
    progress: bool = True  # the training progress bar (main process only)
    tensorboard: bool = True
    wandb: bool = False


class CheckpointConfig(_Section):
    every: int = pydantic.Field(500, ge=1)
    keep: int = pydantic.Field(3, ge=1)


class ValidationConfig(_Section):
    every: int = pydantic.Field(0, ge=0)  # 0: off
    prompts: list[str] = []
    seeds: list[int] = [0]
    steps: int = 25
    guidance: float = 7.5
    resolution: int | None = None  # None: data.resolution


class CacheConfig(_Section):
    #: read VAE latents and text conditioning from a `diffalign cache` directory instead of encoding each step
    enabled: bool = False
    dir: str | None = None  # None: <output_dir>/cache
    #: storage precision of latent posteriors and text conditioning; fp32 keeps cached == uncached exactly
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"


class Config(_Section):
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig
    lora: LoraConfig | None = None  # None: full fine-tuning
    optim: OptimConfig = OptimConfig()
    train: TrainSection = TrainSection()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    validation: ValidationConfig = ValidationConfig()
    cache: CacheConfig = CacheConfig()
    output_dir: str = "runs/default"

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Config:
        from diffalign.objectives import get_objective

        try:
            obj = get_objective(self.objective.name)
        except KeyError as err:
            raise ValueError(str(err.args[0])) from None
        unknown = set(self.objective.params()) - {k for k, _ in obj.defaults}
        if unknown:
            valid = [k for k, _ in obj.defaults]
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"objective {obj.name!r} has no parameter {key!r}.{hint} Valid: {valid}")
        if obj.formats is not None and self.data.format not in obj.formats:
            raise ValueError(f"objective {obj.name!r} needs data.format in {list(obj.formats)}, got {self.data.format!r}")
        if self.train.reference == "lora_off" and self.lora is None:
            raise ValueError("train.reference=lora_off needs a lora section (or use frozen_copy / auto)")
        return self


# ---- loading -------------------------------------------------------------------------------------


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or a dict), apply `key.path=value` overrides, validate (diffalign.configio)."""
    return load(Config, source, overrides)


def weight_dtype(mixed_precision: str):
    """The dtype frozen modules and the LoRA base weights take under train.mixed_precision."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
