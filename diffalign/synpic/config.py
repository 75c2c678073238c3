"""The Syn-Pic run configuration: YAML + dotted `key=value` overrides, validated by pydantic.

Every section forbids unknown keys; a misspelt key fails with the closest valid key named, e.g.
`unknown key 'generators.0.stpes'. Did you mean 'generators.0.steps'?`. See docs/synpic.md for every field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffalign.configio import ConfigError as ConfigError  # re-exported: one class for every config
from diffalign.configio import load


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptsConfig(_Strict):
    #: toy: the toy world's 18 prompts (diffalign.synpic.run.PROMPT_FUNCTIONS); list: `items`; file: `path`
    #: (.txt one per line, or .jsonl/.json/.csv/.parquet with `column`); hf: a datasets name or folder `path`
    #: (`split`, `column`).
    source: Literal["toy", "list", "file", "hf"] = "toy"
    items: list[str] | None = None
    path: str | None = None
    column: str = "prompt"
    split: str = "train"
    #: first `limit` prompts (after de-duplication), None = all
    limit: int | None = Field(default=None, ge=1)
    #: each prompt appears `repeats` times (block-wise: all prompts once, then again), each with new seeds
    repeats: int = Field(default=1, ge=1)
    dedupe: bool = True

    @model_validator(mode="after")
    def _needs(self):
        if self.source == "list" and not self.items:
            raise ValueError("prompts.source 'list' needs prompts.items")
        if self.source in ("file", "hf") and not self.path:
            raise ValueError(f"prompts.source {self.source!r} needs prompts.path")
        return self


class _GeneratorBase(_Strict):
    name: str | None = None
    images_per_prompt: int = Field(default=1, ge=1)


class ToyRenderConfig(_GeneratorBase):
    type: Literal["toy_render"]
    size: int = 16
    corrupt_p: float = Field(default=0.0, ge=0.0, le=1.0)


class ToySamplerConfig(_GeneratorBase):
    type: Literal["toy_sampler"]
    unet: str | None = None
    width: int = 32
    size: int = 16
    init_seed: int = 0
    text_encoder_seed: int = 0
    steps: int = Field(default=20, ge=1)
    guidance: float = 5.0
    batch_size: int = Field(default=256, ge=1)
    device: str | None = None


class DiffusersConfig(_GeneratorBase):
    type: Literal["diffusers"]
    model: str
    revision: str | None = None
    variant: str | None = None
    steps: int = Field(default=30, ge=1)
    guidance: float = 7.5
    resolution: int | None = Field(default=None, ge=8)
    scheduler: str | None = None
    scheduler_kwargs: dict[str, Any] = Field(default_factory=dict)
    negative_prompt: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str | None = None
    batch_size: int = Field(default=8, ge=1)
    pipeline_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: a LoRA folder (e.g. a diffalign run's final/) loaded with the pipeline's load_lora_weights
    lora: str | None = None


GeneratorConfig = Annotated[ToyRenderConfig | ToySamplerConfig | DiffusersConfig, Field(discriminator="type")]


class ScorerConfig(_Strict):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class SynPicConfig(_Strict):
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generators: list[GeneratorConfig] = Field(min_length=1)
    #: registry names ("toy", "pickscore") or {name, kwargs}
    scorers: list[ScorerConfig] = Field(min_length=1)
    #: optional check: the total images per prompt (sum of images_per_prompt) must equal k
    k: int | None = Field(default=None, ge=2)
    #: image j of row i gets seed `seed + i * k + j`
    seed: int = Field(default=0, ge=0)
    shard_size: int = Field(default=64, ge=1)
    output_dir: str = "synpic_out"
    image_format: Literal["png"] = "png"

    @field_validator("scorers", mode="before")
    @classmethod
    def _names(cls, v):
        return [{"name": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _check(self):
        for g in self.generators:
            if g.name is None:
                g.name = g.model if isinstance(g, DiffusersConfig) else g.type.replace("_", "-")
        names = [g.name for g in self.generators]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"generator names must be unique (set `name`); repeated: {dup}")
        snames = [s.name for s in self.scorers]
        if len(set(snames)) != len(snames):
            raise ValueError(f"scorer names must be unique; got {snames}")
        total = self.images_per_prompt
        if total < 2:
            raise ValueError("Syn-Pic needs at least 2 images per prompt (k = sum of images_per_prompt)")
        if self.k is not None and self.k != total:
            raise ValueError(f"k = {self.k} but the generators make {total} images per prompt")
        return self

    @property
    def images_per_prompt(self) -> int:
        return sum(g.images_per_prompt for g in self.generators)


# --- loading ---------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None
) -> SynPicConfig:
    """Read YAML (or take `raw`), apply dotted overrides, validate (diffalign.configio). Raises ConfigError
    with a readable message."""
    if raw is None and path is None:
        raise ConfigError("no config given")
    return load(SynPicConfig, raw if raw is not None else path, overrides, what="synpic config")
