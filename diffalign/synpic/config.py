"""The Syn-Pic run configuration: YAML + dotted `key=value` overrides, validated by pydantic.

Every section forbids unknown keys; a misspelt key fails with the closest valid key named, e.g.
`unknown key 'generators.0.stpes' (did you mean 'steps'?)`. See docs/synpic.md for every field.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message meant for the person who wrote it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptsConfig(_Strict):
    #: toy: the toy world's 18 prompts; list: `items`; file: `path` (.txt one per line, or
    #: .jsonl/.json/.csv/.parquet with `column`); hf: a datasets name or folder `path` (`split`, `column`).
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


# --- loading, overrides and readable errors ---------------------------------------------------------


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set `a.b.0.c=value` entries (value parsed as YAML) in a nested dict/list, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = _parse_value(value)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = _parse_value(value)
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])!r} is not a section")
    return raw


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the section at `loc` (a pydantic error location without the bad key)."""
    models: list[type[BaseModel]] = [SynPicConfig]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt = [
            m
            for model in models
            if part in model.model_fields
            for m in _models_in(model.model_fields[part].annotation)
        ]
        if nxt:
            models = nxt
            continue
        # a discriminator tag ('diffusers') in the location selects that member of the union
        tagged = [
            m
            for m in models
            if "type" in m.model_fields and part in typing.get_args(m.model_fields["type"].annotation)
        ]
        models = tagged or models
    return sorted({f for m in models for f in m.model_fields})


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        shown = ".".join(
            str(p)
            for p in loc
            if not (isinstance(p, str) and p in ("toy_render", "toy_sampler", "diffusers"))
        )
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"unknown key {shown!r}{hint}; valid keys here: {', '.join(valid)}")
        else:
            lines.append(f"{shown or '<config>'}: {e['msg']}")
    return "invalid synpic config:\n  " + "\n  ".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None
) -> SynPicConfig:
    """Read YAML (or take `raw`), apply dotted overrides, validate. Raises ConfigError with a readable message."""
    if raw is None:
        if path is None:
            raise ConfigError("no config given")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return SynPicConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
