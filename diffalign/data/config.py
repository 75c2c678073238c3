"""The `data` section of a training config. docs/data.md explains every field."""

from __future__ import annotations

from typing import Literal

import pydantic

#: Column roles a user may rename through `DataConfig.columns` (role -> column name in the source).
COLUMN_ROLES = (
    "caption", "jpg_0", "jpg_1", "label_0", "label_1", "caption_0", "caption_1",  # pickapic / double_caption
    "prompt", "images", "phi", "scores", "rank",  # ranked
)  # fmt: skip


class DataConfig(pydantic.BaseModel, extra="forbid"):
    """Where the preference data comes from and how each item is turned into tensors."""

    #: prompts: prompt-only data for online methods (SPO), diffalign/data/prompts.py
    format: Literal["pickapic", "double_caption", "ranked", "jsonl", "hpdv2", "prompts"]
    #: hub id | local parquet file / dir / glob | save_to_disk folder | .jsonl file | HPDv2 train.json |
    #: "builtin:pickapic" / "builtin:double_caption" / "builtin:ranked" (synthetic, written on first use)
    source: str
    split: str = "train"
    resolution: int = pydantic.Field(512, ge=8)
    random_crop: bool = False  # Salesforce / diffusers default: center crop
    random_flip: bool = True  # one flip for all candidates of an item (its own for each when independent)
    #: how an item's candidates are resized, flipped and cropped (docs/data.md): joint_winner = all take the
    #: winner's size, one flip and crop window (diffalign's default); joint_first = all take the first stored
    #: image's size (jpg_0), one flip and crop (the diffusers SDXL DPO script, MaPO); independent = each image
    #: on its own, with its own flip and original size (Salesforce train.py, the diffusers SD1.5 script)
    pair_geometry: Literal["joint_winner", "joint_first", "independent"] = "joint_winner"
    caption_dropout: float = pydantic.Field(
        0.0, ge=0.0, le=1.0
    )  # Salesforce recipe: 0.2; all K captions -> ""
    drop_ties: bool = True
    max_items: int | None = pydantic.Field(None, ge=1)
    ranked_as_pairs: bool = False  # ranked rows -> (best, worst) by phi
    min_phi_gap: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    #: An image whose shorter side is below this is skipped (counted as "too_small"). None: max(8, resolution // 8),
    #: i.e. refuse to upscale more than 8x. 1x1 images are always skipped.
    min_image_side: int | None = pydantic.Field(None, ge=1)
    #: A run stops (naming the counts) when more than this share of the items it reads are skipped
    #: (undecodable, missing or too small images...): checked on the first items before any model loads,
    #: then on everything read so far at each log step; `diffalign cache` checks it over the whole data.
    max_skip_fraction: float = pydantic.Field(0.2, ge=0.0, le=1.0)
    #: Column renames, role -> name in the source, e.g. {"caption": "text"}. Roles: COLUMN_ROLES.
    columns: dict[str, str] = {}
    caption_column: str | None = None  # shorthand for columns={"caption": ...} (or "prompt" for ranked)
    #: read parquet data (local, or at an hf:// / s3:// / https:// URL) as a stream of row groups: each epoch
    #: visits the groups in a seeded random order and a group's items together, so each group is read once
    #: per epoch and nothing is downloaded up front (diffalign/data/stream.py, docs/scaling.md)
    streaming: bool = False
    builtin_rows: int = pydantic.Field(64, ge=1)
    builtin_seed: int = 0

    @pydantic.field_validator("columns")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(COLUMN_ROLES))
        if unknown:
            raise ValueError(f"unknown column role(s) {unknown}; known roles: {list(COLUMN_ROLES)}")
        return value

    @pydantic.model_validator(mode="after")
    def _source_matches_format(self) -> DataConfig:
        if self.source.startswith("builtin:"):
            kind = self.source.split(":", 1)[1]
            if kind not in ("pickapic", "double_caption", "ranked", "prompts"):
                raise ValueError(
                    f"unknown builtin source {self.source!r}; use builtin:pickapic, builtin:double_caption, "
                    "builtin:ranked or builtin:prompts"
                )
            if kind != self.format:
                raise ValueError(f"source {self.source!r} holds {kind} data but format is {self.format!r}")
        return self

    def column(self, role: str) -> str:
        """The source column that plays `role` (after the user's renames)."""
        if self.caption_column is not None and role == ("prompt" if self.format == "ranked" else "caption"):
            return self.caption_column
        return self.columns.get(role, role)

    def effective_min_side(self) -> int:
        return self.min_image_side if self.min_image_side is not None else max(8, self.resolution // 8)
