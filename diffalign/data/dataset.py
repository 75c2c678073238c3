"""PreferenceDataset: items of K candidates, best first, for every offline preference objective.

Build time reads only the light columns (labels, phi / scores / rank) to decide which rows are usable and
in which order their candidates go; images are decoded in __getitem__. Everything random (flip, caption
dropout, random crop) is drawn from numpy's Generator seeded with (seed, epoch, index), so a resumed run
sees exactly the same data. docs/data.md documents the formats, the counters and the conventions.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from diffalign.data import schema
from diffalign.data.config import DataConfig
from diffalign.data.phi import phi_from_rank, soft_preference
from diffalign.data.sources import (
    DataFormatError,
    ListSource,
    RowSource,
    _short_hash,
    open_source,
    read_json_rows,
)
from diffalign.data.transforms import UnusableImage, check_size, decode_image, transform_item

logger = logging.getLogger(__name__)

PAIR_FORMATS = ("pickapic", "double_caption")


# ------------------------------------------------------------------------------------------ type checks


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_image(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_text(t):  # bytes or a path
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0  # datasets Image {bytes, path}


def _is_list_of(t: pa.DataType, pred) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and pred(
        t.value_type
    )


def _is_scores(t: pa.DataType) -> bool:
    if _is_list_of(t, _is_number):
        return True
    return pa.types.is_struct(t) and all(
        _is_list_of(t.field(i).type, _is_number) for i in range(t.num_fields)
    )


def _check_columns(src: RowSource, wanted: dict[str, tuple[str, Any, str]], fmt: str) -> None:
    """wanted: role -> (column, type predicate, expected description). Missing first, then types."""
    found = src.column_names
    missing = [col for col, _, _ in wanted.values() if col not in found]
    if missing:
        raise DataFormatError(
            f"{fmt} source {src.description}: missing column(s) {missing}; found columns {found}. "
            "Rename through data.columns (role -> column) if they are called differently."
        )
    for col, pred, expected in wanted.values():
        t = src.schema.field(col).type
        if not pred(t):
            raise DataFormatError(
                f"{fmt} source {src.description}: column {col!r} has type {t}, expected {expected}"
            )


# ------------------------------------------------------------------------------------- preference maths


def _phi_of_scores(scores: Any) -> list[float] | None:
    """The Syn-Pic phi of a row's `scores` ({scorer: [k]} or [k]; diffalign.data.phi), or None when they
    cannot give one: no scorer, k < 2, lengths that differ, or a non-finite score (the row is skipped
    rather than ranked around a NaN)."""
    per_scorer = [s for s in (scores.values() if isinstance(scores, dict) else [scores]) if s is not None]
    if not per_scorer or len(per_scorer[0]) < 2 or any(len(s) != len(per_scorer[0]) for s in per_scorer):
        return None
    arr = np.asarray(per_scorer, dtype=np.float64)
    return soft_preference(arr).tolist() if np.isfinite(arr).all() else None


def _phi_of_rank(rank: Any) -> list[float] | None:
    """phi of a row's `rank` (0 = best), or None when it has fewer than 2 entries or a null."""
    if rank is None or len(rank) < 2 or any(r is None for r in rank):
        return None
    return phi_from_rank(rank).tolist()


# ------------------------------------------------------------------------------------------- the dataset


def item_draws(cfg: DataConfig, seed: int, epoch: int, index: int) -> tuple[np.random.Generator, bool, bool]:
    """The random decisions of one item: (rng for the crop, flip, caption dropout). The one place they are
    drawn, so the latent cache and the trainer make the same ones. Both numbers are always drawn, so the
    streams do not depend on the settings."""
    rng = np.random.default_rng([seed, epoch, index])
    flip = bool(rng.random() < 0.5) and cfg.random_flip
    drop = bool(rng.random() < cfg.caption_dropout)
    return rng, flip, drop


class PreferenceDataset(Dataset):
    """Item i: None (unusable, counted in `stats`) or a dict (see docs/data.md):
    pixel_values float32 [K,3,R,R] in [-1,1] best first; captions list[str] (K); phi float32 [K];
    original_size int64 [K,2] (winner's (H, W)); crop_top_left int64 [K,2]; key str."""

    def __init__(
        self,
        cfg: DataConfig,
        src: RowSource,
        rows: np.ndarray,
        order: np.ndarray,
        phi: np.ndarray,
        n_images: np.ndarray,
        build_stats: Counter,
        seed: int = 0,
    ):
        self.cfg = cfg
        self.src = src
        self.rows, self.order, self.phi, self.n_images = rows, order, phi, n_images
        self.seed = int(seed)
        self.epoch = 0
        #: the latent cache sets this to encode both orientations; None: the seeded draw decides
        self.force_flip: bool | None = None
        self._build_stats = build_stats
        self._skipped: dict[str, set[int]] = {}
        self._min_side = cfg.effective_min_side()
        self._pair = cfg.format in PAIR_FORMATS
        if self._pair:
            caps = ["caption_0", "caption_1"] if cfg.format == "double_caption" else ["caption"]
            self._columns = [cfg.column(c) for c in (*caps, "jpg_0", "jpg_1")]
        else:
            self._columns = [cfg.column("prompt"), cfg.column("images")]

    # -- bookkeeping
    @property
    def num_candidates(self) -> int:
        return int(self.order.shape[1])

    @property
    def stats(self) -> dict[str, int]:
        """Counters. Build-time ones are exact; __getitem__ ones count distinct items seen by THIS process
        (DataLoader workers keep their own copy; collate_preference's `skipped` reaches the main process)."""
        out = dict(self._build_stats)
        for reason, idx in self._skipped.items():
            out[reason] = len(idx)
        out["items"] = len(self)
        return out

    def describe(self) -> str:
        st = self.stats
        skipped = ", ".join(
            f"{k} {v}" for k, v in sorted(st.items()) if k not in ("rows_read", "items") and v
        )
        return (
            f"{self.cfg.format} data from {self.src.description} (split {self.cfg.split}): "
            f"{st.get('rows_read', 0)} rows -> {len(self)} items of K={self.num_candidates}; "
            f"skipped/flagged: {skipped or 'none'}"
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def captions(self, index: int) -> list[str]:
        """The K captions of an item, best first, without decoding its images (for the latent cache)."""
        cfg = self.cfg
        order = [int(j) for j in self.order[index]]
        if self._pair and cfg.format == "double_caption":
            row = self.src.row(int(self.rows[index]), [cfg.column("caption_0"), cfg.column("caption_1")])
            caps = [row[cfg.column("caption_0")], row[cfg.column("caption_1")]]
            caps = [caps[j] for j in order]
        else:
            col = cfg.column("caption") if self._pair else cfg.column("prompt")
            caps = [self.src.row(int(self.rows[index]), [col])[col]] * len(order)
        return ["" if c is None else c for c in caps]

    def key(self, index: int) -> str:
        return f"{self.cfg.format}:{self.src.fingerprint}:{int(self.rows[index])}"

    def _skip(self, reason: str, index: int, message: str) -> None:
        if index not in self._skipped.setdefault(reason, set()):
            logger.warning("skipping item %d (%s): %s", index, self.key(index), message)
        self._skipped[reason].add(index)

    # -- items
    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        cfg = self.cfg
        row = self.src.row(int(self.rows[index]), self._columns)
        order = [int(j) for j in self.order[index]]
        if self._pair:
            stored = [row[cfg.column("jpg_0")], row[cfg.column("jpg_1")]]
            if cfg.format == "double_caption":
                caps = [row[cfg.column("caption_0")], row[cfg.column("caption_1")]]
                captions = [caps[j] for j in order]
            else:
                captions = [row[cfg.column("caption")]] * len(order)
        else:
            stored = row[cfg.column("images")]
            if stored is None or len(stored) != int(self.n_images[index]):
                got = "null" if stored is None else len(stored)
                self._skip(
                    "length_mismatch", index, f"{got} images but {int(self.n_images[index])} preferences"
                )
                return None
            captions = [row[cfg.column("prompt")]] * len(order)
        if any(c is None for c in captions):
            self._skipped.setdefault("missing_caption", set()).add(index)
            captions = ["" if c is None else c for c in captions]
        if any(not isinstance(c, str) for c in captions):
            self._skip("bad_caption", index, f"caption is not text: {captions!r}")
            return None
        if any(c.strip() == "" for c in captions):  # kept: an empty caption is a valid unconditional prompt
            self._skipped.setdefault("empty_caption", set()).add(index)
        images = []
        try:
            for j in order:
                img = decode_image(stored[j], self.src.base_dir)
                check_size(img, self._min_side)
                images.append(img)
        except UnusableImage as err:
            self._skip(err.reason, index, str(err))
            return None
        rng, flip, drop = item_draws(cfg, self.seed, self.epoch, index)
        if self.force_flip is not None:
            flip = self.force_flip
        out = transform_item(images, cfg.resolution, cfg.random_crop, flip, rng)
        out["captions"] = [""] * len(captions) if drop else list(captions)
        out["phi"] = torch.from_numpy(self.phi[index].astype(np.float32))
        out["key"] = self.key(index)
        return out


# ---------------------------------------------------------------------------------------------- builders


def _pair_plan(cfg: DataConfig, src: RowSource, stats: Counter):
    fmt = cfg.format
    img_t = "encoded image bytes (binary), an {bytes, path} struct or a path string"
    wanted = {r: (cfg.column(r), _is_image, img_t) for r in ("jpg_0", "jpg_1")}
    wanted["label_0"] = (cfg.column("label_0"), _is_number, "a number (float or int)")
    for r in ("caption_0", "caption_1") if fmt == "double_caption" else ("caption",):
        wanted[r] = (cfg.column(r), _is_text, "text (string)")
    _check_columns(src, wanted, fmt)
    label0 = src.column(cfg.column("label_0"))
    lab1_col = cfg.column("label_1")
    label1 = (
        src.column(lab1_col)
        if lab1_col in src.column_names and _is_number(src.schema.field(lab1_col).type)
        else None
    )
    rows, orders, phis = [], [], []
    for i, l0 in enumerate(label0):
        if l0 is None or (isinstance(l0, float) and math.isnan(l0)):
            stats["nan_label"] += 1
            continue
        l0 = float(l0)
        if not 0.0 <= l0 <= 1.0:
            stats["label_out_of_range"] += 1
            continue
        if label1 is not None and label1[i] is not None and abs(l0 + float(label1[i]) - 1.0) > 1e-6:
            stats["label_mismatch"] += 1  # kept: label_0 decides
        if l0 == 0.5:
            stats["ties"] += 1
            if cfg.drop_ties:
                continue
            rows.append(i), orders.append((0, 1)), phis.append((0.5, 0.5))
            continue
        if l0 not in (0.0, 1.0):
            stats["soft_label"] += 1  # kept: the side above 0.5 wins
        rows.append(i)
        orders.append((0, 1) if l0 > 0.5 else (1, 0))
        phis.append((1.0, 0.0))
    n_images = np.full(len(rows), 2, dtype=np.int64)
    return rows, orders, phis, n_images


def _row_phi(cfg: DataConfig, src: RowSource, stats: Counter) -> list[list[float] | None]:
    names = src.column_names
    have = {r: cfg.column(r) in names for r in schema.RANKED_PREFERENCE_SOURCES}
    if not any(have.values()):
        cols = [cfg.column(r) for r in schema.RANKED_PREFERENCE_SOURCES]
        raise DataFormatError(
            f"{cfg.format} source {src.description}: missing a preference column, one of {cols}; "
            f"found columns {names}"
        )
    checks = {
        "phi": (_is_list_of, "a list of numbers"),
        "scores": (None, "{scorer: list of numbers} or a list of numbers"),
        "rank": (_is_list_of, "a list of integers"),
    }
    for role, ok in have.items():
        if ok:
            t = src.schema.field(cfg.column(role)).type
            good = _is_scores(t) if role == "scores" else checks[role][0](t, _is_number)
            if not good:
                raise DataFormatError(
                    f"{cfg.format} source {src.description}: column {cfg.column(role)!r} has type {t}, "
                    f"expected {checks[role][1]}"
                )
    cols = {r: src.column(cfg.column(r)) for r, ok in have.items() if ok}
    out: list[list[float] | None] = []
    for i in range(src.num_rows):
        phi = cols["phi"][i] if "phi" in cols else None
        if phi is not None:
            if any(p is None or not math.isfinite(float(p)) for p in phi):
                stats["nan_phi"] += 1
                out.append(None)
                continue
            out.append([float(p) for p in phi])
            continue
        derived = None
        if "scores" in cols and cols["scores"][i] is not None:
            derived = _phi_of_scores(cols["scores"][i])
            stats["phi_from_scores"] += derived is not None
        if derived is None and "rank" in cols:
            derived = _phi_of_rank(cols["rank"][i])
            stats["phi_from_rank"] += derived is not None
        if derived is None:
            stats["missing_phi"] += 1
        out.append(derived)
    return out


def _ranked_plan(cfg: DataConfig, src: RowSource, stats: Counter):
    wanted = {
        "prompt": (cfg.column("prompt"), _is_text, "text (string)"),
        "images": (
            cfg.column("images"),
            lambda t: _is_list_of(t, _is_image),
            "a list of images (bytes/paths)",
        ),
    }
    _check_columns(src, wanted, cfg.format)
    all_phi = _row_phi(cfg, src, stats)
    ks = sorted({len(p) for p in all_phi if p is not None and len(p) >= 2})
    if len(ks) > 1 and not cfg.ranked_as_pairs:
        raise DataFormatError(
            f"{cfg.format} source {src.description}: rows hold different numbers of candidates K={ks}; a batch "
            "needs one K. Filter the rows to one K, or set ranked_as_pairs: true to train on (best, worst) pairs."
        )
    rows, orders, phis, n_images = [], [], [], []
    for i, phi in enumerate(all_phi):
        if phi is None:
            continue
        if len(phi) < 2:
            stats["too_few_candidates"] += 1
            continue
        p = np.asarray(phi, dtype=np.float64)
        gap = float(p.max() - p.min())
        if cfg.ranked_as_pairs:
            best = int(np.argmax(p))  # first of the best
            worst = len(p) - 1 - int(np.argmin(p[::-1]))  # last of the worst
            if gap == 0.0:
                stats["equal_phi"] += 1
                continue
            order = (best, worst)
        else:
            if gap == 0.0:
                stats["ties"] += 1
                if cfg.drop_ties:
                    continue
            order = tuple(int(j) for j in np.argsort(-p, kind="stable"))
        if gap < cfg.min_phi_gap:
            stats["below_min_phi_gap"] += 1
            continue
        rows.append(i), orders.append(order), phis.append(tuple(p[list(order)]))
        n_images.append(len(phi))
    return rows, orders, phis, np.asarray(n_images, dtype=np.int64)


def _json_source(cfg: DataConfig) -> RowSource:
    """jsonl (pairs or ranked lists) or HPDv2 train.json, normalised to the ranked layout in memory."""
    path = cfg.source
    if not os.path.isfile(path):
        raise DataFormatError(f"{cfg.format} source {path!r} is not a file")
    raw = read_json_rows(path)
    base = os.path.dirname(os.path.abspath(path))
    rows: list[dict[str, Any]] = []
    kind = None
    for n, obj in enumerate(raw, start=1):
        where = f"{path} {'line' if path.endswith('.jsonl') else 'entry'} {n}"
        if cfg.format == "hpdv2":
            need, this = schema.HPDV2_KEYS, "hpdv2"
        else:
            this = "pair" if "chosen" in obj or "rejected" in obj else "ranked"
            need = schema.JSONL_PAIR_KEYS if this == "pair" else schema.JSONL_RANKED_KEYS
        kind = kind or this
        if this != kind:
            raise DataFormatError(f"{where}: mixes a {this} line into a file of {kind} lines")
        missing = [k for k in need if k not in obj]
        if this == "ranked" and not any(k in obj for k in schema.RANKED_PREFERENCE_SOURCES):
            missing.append("phi|scores|rank")
        if missing:
            raise DataFormatError(f"{where}: missing key(s) {missing}; found keys {sorted(obj)}")
        prompt = obj["prompt"]
        if prompt is not None and not isinstance(prompt, str):
            raise DataFormatError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
        if this == "pair":
            images, pref = [obj["chosen"], obj["rejected"]], {"phi": [1.0, 0.0]}
        elif this == "hpdv2":
            images, pref = obj["file_path"], {"phi": obj["human_preference"]}
        else:
            images = obj["images"]
            pref = {k: obj[k] for k in schema.RANKED_PREFERENCE_SOURCES if k in obj}
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise DataFormatError(f"{where}: images must be a list of path strings, got {images!r}")
        for k, v in pref.items():
            vals = list(v.values()) if (k == "scores" and isinstance(v, dict)) else [v]
            for vv in vals:
                if not isinstance(vv, list) or not all(isinstance(x, (int, float)) or x is None for x in vv):
                    raise DataFormatError(f"{where}: {k!r} must be a list of numbers, got {v!r}")
        rows.append({"prompt": prompt, "images": images, **pref})
    if cfg.format == "hpdv2" and rows and rows[0]["images"]:  # HPDv2 keeps images under <root>/<split>/
        first = rows[0]["images"][0]
        if not os.path.exists(os.path.join(base, first)) and os.path.exists(
            os.path.join(base, cfg.split, first)
        ):
            base = os.path.join(base, cfg.split)
    fields = [("prompt", pa.string()), ("images", pa.list_(pa.string()))]
    fields += [(k, pa.list_(pa.float64())) for k in ("phi", "rank") if any(k in r for r in rows)]
    if any("scores" in r for r in rows):
        fields.append(("scores", pa.list_(pa.float64())))  # a dict of lists is accepted row by row
    st = os.stat(path)
    fp = _short_hash("json", os.path.abspath(path), st.st_size, len(rows))
    return ListSource(rows, pa.schema(fields), os.path.abspath(path), base, fp)


def build_preference_dataset(cfg: DataConfig, seed: int = 0) -> PreferenceDataset:
    """Open `cfg.source`, validate its columns, choose the usable rows and order, and return the dataset."""
    if cfg.source.startswith("builtin:"):
        from diffalign.data.synthetic import builtin_source

        src = open_source(builtin_source(cfg.format, rows=cfg.builtin_rows, seed=cfg.builtin_seed), cfg.split)
    elif cfg.format in ("jsonl", "hpdv2") or cfg.source.endswith((".jsonl",)):
        if cfg.format in PAIR_FORMATS:
            raise DataFormatError(f"a .jsonl source is read with format 'jsonl', not {cfg.format!r}")
        src = _json_source(cfg)
        if cfg.columns or cfg.caption_column:
            raise DataFormatError("column renames do not apply to jsonl / hpdv2 sources (keys are fixed)")
    else:
        src = open_source(cfg.source, cfg.split)
    stats: Counter = Counter(rows_read=src.num_rows)
    plan = _pair_plan if cfg.format in PAIR_FORMATS else _ranked_plan
    rows, orders, phis, n_images = plan(cfg, src, stats)
    if cfg.max_items is not None and len(rows) > cfg.max_items:
        stats["over_max_items"] += len(rows) - cfg.max_items
        rows, orders, phis, n_images = (
            rows[: cfg.max_items],
            orders[: cfg.max_items],
            phis[: cfg.max_items],
            n_images[: cfg.max_items],
        )
    k = len(orders[0]) if orders else (2 if cfg.format in PAIR_FORMATS or cfg.ranked_as_pairs else 0)
    ds = PreferenceDataset(
        cfg,
        src,
        rows=np.asarray(rows, dtype=np.int64),
        order=np.asarray(orders, dtype=np.int64).reshape(len(rows), k),
        phi=np.asarray(phis, dtype=np.float32).reshape(len(rows), k),
        n_images=np.asarray(n_images, dtype=np.int64),
        build_stats=stats,
        seed=seed,
    )
    if len(ds) == 0:
        raise DataFormatError(f"no usable items: {ds.describe()}")
    logger.info(ds.describe())
    return ds


def collate_preference(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack items into a batch; None items are dropped and counted in batch["skipped"]. All None -> None."""
    kept = [it for it in items if it is not None]
    if not kept:
        return None
    ks = {it["pixel_values"].shape[0] for it in kept}
    if len(ks) > 1:
        raise ValueError(f"items in one batch have different numbers of candidates K={sorted(ks)}")
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in kept]),
        "phi": torch.stack([it["phi"] for it in kept]),
        "original_size": torch.stack([it["original_size"] for it in kept]),
        "crop_top_left": torch.stack([it["crop_top_left"] for it in kept]),
        "captions": [list(it["captions"]) for it in kept],
        "keys": [it["key"] for it in kept],
        "skipped": len(items) - len(kept),
    }
