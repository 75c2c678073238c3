"""Typed, validated training configs: YAML plus dotted command-line overrides.

An unknown or misspelt key is an error naming the closest valid key; a wrong type says which field.
Every section lives here except `data`, which lives beside the data code (diffalign/data/config.py).
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from diffalign.configio import ConfigError as ConfigError  # re-exported: one class for every config
from diffalign.configio import load
from diffalign.data.config import DataConfig
from diffalign.rewards.pickscore import PICKSCORE_MODEL, PICKSCORE_PROCESSOR


class _Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


class FlowConfig(_Section):
    """Training options of flow-matching models (SD3 / SD3.5, FLUX.1, the flow toy); refused for others."""

    #: how training draws u in (0, 1), t = the scheduler's table at floor(u * 1000) (diffusers'
    #: compute_density_for_timestep_sampling). None: the family's default (SD3 logit_normal, as diffusers'
    #: SD3 scripts; FLUX uniform, as its FLUX script's `--weighting_scheme none`; other flow models logit_normal)
    timestep_density: Literal["logit_normal", "uniform", "mode"] | None = None
    logit_mean: float = 0.0
    logit_std: float = pydantic.Field(1.0, gt=0)
    mode_scale: float = 1.29
    #: the loss compares x_t - sigma v with x0 (diffusers' SD3 scripts' --precondition_outputs 1): a
    #: sigma^2-weighted velocity MSE, which silently reweights a DPO's timesteps. Off: plain velocity MSE
    precondition_outputs: bool = False


class ModelConfig(_Section):
    #: hub id, local diffusers folder, or tiny:<family> (tiny random models built in code)
    pretrained: str
    #: auto: the family model_index.json's `_class_name` names (diffalign/backbones/registry.py; a test
    #: keeps this list equal to the registry's)
    family: Literal["auto", "sd", "sdxl", "pixel", "sd3", "flux"] = "auto"
    revision: str | None = None
    variant: str | None = None
    #: a separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL under fp16
    vae: str | None = None
    #: override the scheduler's prediction type (epsilon / v_prediction / sample)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None
    #: the VAE runs in fp32 by default even under mixed precision ("to avoid NaN losses", diffusers)
    vae_fp32: bool = True
    #: flow-matching training options (timestep density, output preconditioning); None: the family's defaults
    flow: FlowConfig | None = None
    #: SD3: false leaves T5-XXL out; its tokens are then zeros, as StableDiffusion3Pipeline(text_encoder_3=None)
    t5: bool = True
    #: SD3 / FLUX: T5 tokens per prompt; None: the pipeline's default (SD3 256, FLUX 512)
    max_sequence_length: int | None = pydantic.Field(None, ge=1)
    #: FLUX.1-dev: the guidance embedding's value in training; None: 3.5 (diffusers' FLUX LoRA script)
    guidance_embedding: float | None = None


class LoraConfig(_Section):
    rank: int = pydantic.Field(8, ge=1)
    alpha: float | None = None  # None: alpha = rank, as the diffusers DPO scripts set it
    #: None: the backbone's (the attention projections; for MMDiT also the context projections)
    target_modules: list[str] | None = None
    init: Literal["gaussian", "default"] = "gaussian"
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0)


class ObjectiveConfig(_Section):
    """`name` picks the objective; other keys are its hyper-parameters, validated against the objective's
    typed parameters (diffalign/objectives) when the config loads. After validation every parameter is
    present, defaults included, so the saved config.yaml says what ran."""

    model_config = pydantic.ConfigDict(extra="allow", validate_assignment=False)
    name: str

    @pydantic.model_validator(mode="after")
    def _typed(self) -> ObjectiveConfig:
        from diffalign.objectives import get_objective

        try:
            obj = get_objective(self.name)
        except KeyError as err:
            raise ValueError(str(err.args[0])) from None
        given = dict(self.model_extra or {})
        try:
            typed = obj.validate(given)
        except pydantic.ValidationError as err:
            raise ValueError(_objective_errors(obj, err)) from None
        self.__pydantic_extra__ = typed.model_dump()
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _objective_errors(obj, err: pydantic.ValidationError) -> str:
    valid = list(obj.params.model_fields)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"objective.{key}: objective {obj.name!r} has no parameter {key!r}.{hint} Valid: {valid}")
        else:
            hint = ""
            if e["type"] == "literal_error":
                choices = [str(c) for c in typing.get_args(obj.params.model_fields[key].annotation)]
                close = difflib.get_close_matches(str(e.get("input")), choices, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"objective.{key}: {e['msg']} (got {e.get('input')!r}).{hint}")
    return "; ".join(lines)


class OptimConfig(_Section):
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = "adamw"
    lr: float = pydantic.Field(1e-5, gt=0)
    #: multiply lr by the effective batch (per-GPU batch x accumulation x processes), as --scale_lr does
    scale_lr: bool = False
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    #: diffusers' schedules, or warmup_log_decay: DeepSpeed's WarmupDecayLR (its default log warm-up,
    #: lr x log(k + 1) / log(warmup_steps), then linear decay reaching 0 at decay_steps), the SPM trainer's
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "warmup_log_decay"] = "constant"
    warmup_steps: int = pydantic.Field(0, ge=0)
    #: warmup_log_decay: the step at which the decay reaches 0 (None: train.max_steps)
    decay_steps: int | None = pydantic.Field(None, ge=1)
    max_grad_norm: float | None = 1.0


class PoolConfig(_Section):
    """`train.reference: pool`: the reference of each optimizer step is drawn from earlier checkpoints of
    this run (SePPO's Random Checkpoint Replay, docs/seppo.md). The starting model theta_0 is always a
    member; a completed checkpoint joins when its step is a multiple of `every`; beyond `cap` members the
    oldest checkpoint leaves (theta_0 stays)."""

    #: uniform: each step draws a member uniformly (the paper); first: always theta_0 (DITTO); last: the
    #: newest checkpoint (SPIN-Diffusion). Draws are keyed on (train.seed, step).
    draw: Literal["uniform", "first", "last"] = "uniform"
    #: None: every checkpoint (checkpoint.every); otherwise a multiple of checkpoint.every
    every: int | None = pydantic.Field(None, ge=1)
    #: at most this many members, theta_0 included (LoRA: adapters of megabytes; full fine-tuning: one
    #: state dict each in CPU memory, in the training weight dtype)
    cap: int = pydantic.Field(8, ge=1)


class TrainSection(_Section):
    batch_size: int = pydantic.Field(1, ge=1)  # items (pairs / ranked lists) per process per micro-step
    grad_accum: int = pydantic.Field(1, ge=1)
    max_steps: int = pydantic.Field(100, ge=1)  # optimizer steps
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    seed: int = 0
    #: the reference model: auto = the objective's (SePPO: pool), else adapters off for LoRA and a frozen
    #: copy for full fine-tuning; pool = earlier checkpoints of this run (`train.pool`); precomputed = the
    #: base model's energies computed ahead by `diffalign precompute` (offline experience only; no module)
    reference: Literal["auto", "lora_off", "frozen_copy", "pool", "precomputed"] = "auto"
    pool: PoolConfig = PoolConfig()
    #: stop after this many consecutive steps skipped for a non-finite loss or gradient
    max_nonfinite_steps: int = pydantic.Field(5, ge=1)
    #: stop when an update leaves a trainable weight non-finite or larger in magnitude than this (the loss
    #: of that step was finite, so the loss guard cannot see it); such weights are never checkpointed.
    #: 65504 is float16's largest value: a weight beyond it cannot run in fp16. None: only non-finite
    max_weight_abs: float | None = pydantic.Field(65504.0, gt=0)
    num_workers: int = pydantic.Field(0, ge=0)
    #: also stop after this many passes over the data (None: max_steps decides alone). SPO's recipes train
    #: 10 epochs of prompts, whose number of optimizer steps depends on how many pairs the rollouts keep
    max_epochs: int | None = pydantic.Field(None, ge=1)
    #: exponential moving average of the trainable weights (diffusers' EMAModel: per-step decay
    #: min(ema_decay, (1 + n) / (10 + n))); validation images and the export use the EMA weights. 0 = off
    ema_decay: float = pydantic.Field(0.0, ge=0.0, lt=1.0)
    #: fused Triton kernels (GroupNorm+SiLU in the backbone's resnet blocks, the per-sample energy;
    #: diffalign/kernels). auto: on when a CUDA device and triton are there; on without them runs the
    #: plain-torch reference path and says so in the run summary
    kernels: Literal["auto", "on", "off"] = "auto"
    #: torch.compile the denoiser (nn.Module.compile: parameter names and checkpoints unchanged). The
    #: first steps compile; on a CPU inductor needs a C++ compiler and takes minutes even for tiny models
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    #: keep the denoiser's convolution weights (and so its activations) in channels-last memory format
    channels_last: bool = False


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


class HubConfig(_Section):
    """`--push-to-hub`: each checkpoint goes to the repo's last-checkpoint/ folder, the final export (with
    its model card) to the repo's root."""

    push: bool = False
    #: the repo, "name" (under your account) or "org/name"; None: the output folder's name
    model_id: str | None = None
    #: None: the hub's default visibility for your account
    private: bool | None = None


class CacheConfig(_Section):
    #: read VAE latents and text conditioning from a `diffalign cache` directory instead of encoding each step
    enabled: bool = False
    dir: str | None = None  # None: <output_dir>/cache
    #: storage precision of the latent posteriors (text conditioning is stored in the training precision it
    #: is computed in); fp32 keeps cached == uncached exactly
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"


class SamplerConfig(_Section):
    """How candidates are sampled during training (generated / rollout experience)."""

    steps: int = pydantic.Field(20, ge=1)
    guidance: float = pydantic.Field(5.0, ge=0)
    #: 0: deterministic DDIM / Euler; > 0: DDIM's eta, or the flow SDE's noise level
    eta: float = pydantic.Field(0.0, ge=0)
    #: images per sampling batch. 1 makes each sample independent of the batch it is in, so accumulation
    #: and N processes replay a run bit for bit; larger is faster and equal only up to float rounding
    batch_size: int = pydantic.Field(1, ge=1)


class RolloutConfig(_Section):
    """SPO's step-wise resampler (diffalign/sampling/resample.py, docs/spo.md). Defaults: the reference's SD1.5
    recipe (RockeyCoss/SPO configs/basic_config.py and spo_sd-v1-5_4k-prompts_num-sam-4_10ep_bs10.py)."""

    #: the step scorer, a scorer registry name: spm (the step-aware preference model, which reads x0-hat's
    #: timestep) or any other scorer (it scores x0-hat and ignores the timestep)
    scorer: str = "spm"
    #: keyword arguments of the scorer's factory, e.g. {checkpoint: sd15} (the released SD1.5 SPM)
    scorer_args: dict[str, Any] = {}
    #: K candidates drawn at each branch step (sample.num_sample_each_step: 4 for SD1.5, 2 for SDXL)
    candidates: int = pydantic.Field(4, ge=2)
    #: sampling steps taken as one trajectory before the first branch (train.divert_start_step)
    divert_start_step: int = pydantic.Field(4, ge=0)
    #: single-sample steps of every candidate after each branch (sample.num_inner_step: 0 SD1.5, 3 SDXL)
    inner_steps: int = pydantic.Field(0, ge=0)
    #: a pair is kept when softmax(best, worst score) differs by more than this (compare_func_cfg: 0.3 / 0.4)
    threshold: float = pydantic.Field(0.3, ge=0, lt=1)
    #: kept pairs per process per micro-step (train.train_batch_size); each rollout of train.batch_size
    #: prompts per process feeds as many micro-steps as its pairs fill
    pairs_per_step: int = pydantic.Field(10, ge=1)


class ExperienceConfig(_Section):
    """Where each step's candidates come from (diffalign/training/experience.py). auto: the objective's
    default (offline: the data's; rollout for SPO)."""

    source: Literal["auto", "offline", "generated", "rollout"] = "auto"
    #: generated: which model samples the candidate that is not from the data
    generator: Literal["reference", "policy"] = "reference"
    sampler: SamplerConfig = SamplerConfig()
    #: rollout: SPO's step-wise resampler
    rollout: RolloutConfig = RolloutConfig()


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
    hub: HubConfig = HubConfig()
    experience: ExperienceConfig = ExperienceConfig()
    output_dir: str = "runs/default"

    def experience_source(self) -> str:
        """The experience source this run uses (the objective's default when `experience.source` is auto)."""
        from diffalign.objectives import get_objective

        obj = get_objective(self.objective.name)
        return obj.experience[0] if self.experience.source == "auto" else self.experience.source

    def reference_kind(self) -> str:
        """The reference this run uses: `train.reference`, or for auto the objective's default (SePPO: pool),
        else adapters off for LoRA and a frozen copy for full fine-tuning."""
        from diffalign.objectives import get_objective

        if self.train.reference != "auto":
            return self.train.reference
        obj = get_objective(self.objective.name)
        if obj.reference != "auto":
            return obj.reference
        return "lora_off" if self.lora is not None else "frozen_copy"

    def pool_every(self) -> int:
        """Steps between pool members (`train.pool.every`, default checkpoint.every)."""
        return self.train.pool.every or self.checkpoint.every

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Config:
        from diffalign.objectives import get_objective

        obj = get_objective(self.objective.name)
        source = self.experience_source()
        if source not in obj.experience:
            raise ValueError(f"objective {obj.name!r} learns from {list(obj.experience)} experience, not "
                             f"experience.source={source!r}")  # fmt: skip
        if source == "generated" and self.experience.generator == "reference" and not obj.needs_reference:
            raise ValueError(f"experience.generator=reference: objective {obj.name!r} has no reference model; "
                             "use experience.generator=policy")  # fmt: skip
        if source == "rollout":
            self._check_rollout()
        elif self.data.format == "prompts":
            raise ValueError(f"data.format=prompts holds prompts only; objective {obj.name!r} learns from "
                             f"{source} experience, which needs images (pairs or ranked lists)")  # fmt: skip
        if obj.formats is not None and self.data.format not in obj.formats:
            raise ValueError(f"objective {obj.name!r} needs data.format in {list(obj.formats)}, got {self.data.format!r}")
        if self.train.reference == "lora_off" and self.lora is None:
            raise ValueError("train.reference=lora_off needs a lora section (or use frozen_copy / auto)")
        if obj.needs_reference and self.reference_kind() == "precomputed" and source != "offline":
            raise ValueError(f"train.reference=precomputed: {source} experience is sampled during training, so its "
                             "reference energies cannot be computed ahead; use train.reference=auto")  # fmt: skip
        if self.data.streaming and (self.cache.enabled or source == "rollout"):
            raise ValueError("data.streaming reads images from parquet row groups; it applies neither to the latent "
                             "cache (set cache.enabled: false) nor to prompt data")  # fmt: skip
        if obj.needs_reference and self.reference_kind() == "pool" and self.pool_every() % self.checkpoint.every:
            raise ValueError(f"train.pool.every={self.pool_every()} must be a multiple of checkpoint.every="
                             f"{self.checkpoint.every}: pool members are read from saved checkpoints")  # fmt: skip
        return self


    def _check_rollout(self) -> None:
        if self.data.format != "prompts":
            raise ValueError(f"experience.source=rollout (SPO) learns online from prompts, not from "
                             f"data.format={self.data.format!r} images: its candidates are sampled during training. "
                             "Give data.format: prompts with a prompt file (.txt, .json, .jsonl) or a dataset's "
                             "caption column (docs/spo.md)")  # fmt: skip
        s, r = self.experience.sampler, self.experience.rollout
        if s.eta <= 0:
            raise ValueError("experience.source=rollout needs a stochastic sampler: set experience.sampler.eta > 0 "
                             "(SPO's DDIM eta 1.0; for flow matching the SDE noise level)")  # fmt: skip
        if r.divert_start_step >= s.steps:
            raise ValueError(f"experience.rollout.divert_start_step ({r.divert_start_step}) must be below "
                             f"experience.sampler.steps ({s.steps})")  # fmt: skip
        if self.cache.enabled:
            raise ValueError("cache.enabled: the latent cache holds data images; rollout experience has none")


class SPMSection(_Section):
    """The step-aware preference model `diffalign train-spm` trains (docs/spo.md). Defaults: RockeyCoss/SPO's
    SPM trainer (step_aware_preference_model/trainer/tasks/spm_task.py)."""

    #: the CLIP it starts from (PickScore) and the processor of its init checkpoint
    clip: str = PICKSCORE_MODEL
    processor: str | None = PICKSCORE_PROCESSOR
    #: start from these SPM weights instead of PickScore: sd15 / sdxl (the released SPMs), a file, an export
    init: str | None = None
    #: a tiny random CLIP instead (tests, the toy world)
    tiny: bool = False
    #: classifier-free guidance of the frozen diffusion model's one step that gives x0-hat (task.cfg_scale)
    guidance: float = pydantic.Field(5.0, ge=0)
    #: relabel every pair with PickScore on its two images (the SDXL SPM's use_pickscore_label): a tie when the
    #: softmax gap is at most tie_threshold (pickscore_threshold)
    relabel: Literal["none", "pickscore"] = "none"
    tie_threshold: float = pydantic.Field(0.1, ge=0, lt=1)


class SPMConfig(_Section):
    """`diffalign train-spm`: the same sections as a training config, with `model` the frozen diffusion model
    whose one-step x0-hat the SPM learns to score and `spm` the model trained (all of it)."""

    model: ModelConfig
    data: DataConfig
    spm: SPMSection = SPMSection()
    optim: OptimConfig = OptimConfig()
    train: TrainSection = TrainSection()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    validation: ValidationConfig = ValidationConfig()
    cache: CacheConfig = CacheConfig()
    output_dir: str = "runs/spm"

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> SPMConfig:
        from diffalign.data.schema import PAIR_FORMATS

        if self.data.format not in (*PAIR_FORMATS, "jsonl", "hpdv2") and not self.data.ranked_as_pairs:
            raise ValueError(f"train-spm learns from preference pairs; data.format={self.data.format!r} gives none "
                             "(use pickapic, jsonl pairs, hpdv2, or ranked with ranked_as_pairs)")  # fmt: skip
        if self.spm.relabel == "pickscore" and self.cache.enabled:
            raise ValueError("spm.relabel=pickscore scores the pairs' images, which the latent cache does not hold")
        if self.validation.every:
            raise ValueError("validation.every: train-spm has no validation images; set it to 0")
        return self


# ---- loading -------------------------------------------------------------------------------------


def load_spm_config(source: str | Path | dict, overrides: list[str] | None = None) -> SPMConfig:
    return load(SPMConfig, source, overrides)


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or a dict), apply `key.path=value` overrides, validate (diffalign.configio)."""
    return load(Config, source, overrides)


def weight_dtype(mixed_precision: str):
    """The dtype frozen modules and the LoRA base weights take under train.mixed_precision."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
