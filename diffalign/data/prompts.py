"""Prompt-only data (`data.format: prompts`) for online methods, which sample their own candidates (SPO).

Sources:
- a `.txt` file: one prompt per line (blank lines skipped);
- a `.json` file: a list of strings, or a list of objects whose caption column holds the prompt (SPO's
  `assets/prompts/4k_training_prompts.json`: `{"caption": ..., "trainset_idx": ...}`);
- a `.jsonl` file: one string or object per line, likewise;
- any table source the preference formats read (hub id, parquet, save_to_disk folder): its caption column
  (`caption` unless `data.caption_column` / `data.columns.caption` renames it);
- `builtin:prompts`: the captions of the builtin synthetic Pick-a-Pic table (tests, tiny recipes).

A prompt that is not text is an error naming where it is; an empty one is skipped and counted
(`empty_caption`); a source with no prompt is an error.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import torch

from diffalign.data.config import DataConfig
from diffalign.data.sources import DataFormatError, open_source, read_json_rows, read_utf8_text


class PromptDataset(torch.utils.data.Dataset):
    """Item i: {"prompt": str, "key": "prompts:<source>:<i>"}."""

    def __init__(self, prompts: list[str], description: str, stats: Counter):
        self.prompts, self.description, self.stats = prompts, description, stats

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"prompt": self.prompts[index], "key": f"prompts:{self.description}:{index}"}

    def set_epoch(self, epoch: int) -> None:  # no per-epoch draws
        pass

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"prompts": [it["prompt"] for it in items], "keys": [it["key"] for it in items], "skipped": 0}

    def describe(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items()) if k not in ("rows_read", "items"))
        return (f"prompts from {self.description}: {self.stats['rows_read']} rows -> {len(self)} prompts"
                + (f"; skipped: {extra}" if extra else ""))  # fmt: skip


def _prompt_of(value: Any, key: str, where: str) -> str:
    if isinstance(value, dict):
        if key not in value:
            raise DataFormatError(f"{where}: no {key!r} key (keys: {sorted(value)}); set data.caption_column")
        value = value[key]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: a prompt must be text, got {type(value).__name__}")
    return value


def read_prompts(cfg: DataConfig) -> tuple[list[str], str]:
    """(prompts in source order, a description of the source)."""
    source, key = cfg.source, cfg.column("caption")
    if source.startswith("builtin:"):
        from diffalign.data.synthetic import builtin_source

        path = builtin_source("pickapic", rows=cfg.builtin_rows, seed=cfg.builtin_seed)
        return [str(c) for c in open_source(path).column("caption")], source
    if source.endswith(".txt"):
        return [line.strip() for line in read_utf8_text(source).splitlines()], source
    if source.endswith(".json"):
        try:
            rows = json.loads(read_utf8_text(source))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{source}: not valid JSON: {err}") from err
        if not isinstance(rows, list):
            raise DataFormatError(f"{source}: expected a JSON list of prompts or of objects")
        return [_prompt_of(r, key, f"{source} item {i}") for i, r in enumerate(rows)], source
    if source.endswith(".jsonl"):
        text = read_utf8_text(source)
        if all(line.strip().startswith("{") for line in text.splitlines() if line.strip()):
            rows = read_json_rows(source)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [_prompt_of(r, key, f"{source} line {i + 1}") for i, r in enumerate(rows)], source
    table = open_source(source, cfg.split)
    if key not in table.column_names:
        raise DataFormatError(f"{table.description or source}: no column {key!r} (columns: {table.column_names}); "
                              "set data.caption_column")  # fmt: skip
    values = table.column(key)
    return [_prompt_of(v, key, f"{table.description} row {i}") if v is not None else "" for i, v in enumerate(values)], (
        table.description or source
    )


def build_prompt_dataset(cfg: DataConfig) -> PromptDataset:
    prompts, description = read_prompts(cfg)
    stats = Counter(rows_read=len(prompts))
    kept = [p for p in prompts if p.strip()]
    stats["empty_caption"] = len(prompts) - len(kept)
    if cfg.max_items is not None and len(kept) > cfg.max_items:
        stats["over_max_items"] = len(kept) - cfg.max_items
        kept = kept[: cfg.max_items]
    stats = Counter({k: v for k, v in stats.items() if v or k == "rows_read"})
    ds = PromptDataset(kept, description, stats)
    if not kept:
        raise DataFormatError(f"no usable prompts: {ds.describe()}")
    return ds
