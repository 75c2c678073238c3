"""PreferenceDataset: items of K candidates, best first, for every offline preference objective.

Build time reads only the light columns (labels, phi / scores / rank) to decide which rows are usable and
in which order their candidates go (diffalign.data.plan, with the column checks of diffalign.data.columns);
images are decoded in __getitem__. Everything random (flip, caption dropout, random crop) is drawn from
numpy's Generator seeded with (seed, epoch, index), so a resumed run sees exactly the same data. docs/data.md documents the formats, the counters and the conventions.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffalign.data import schema
from diffalign.data.config import DataConfig
from diffalign.data.plan import open_data_source, plan_rows
from diffalign.data.sources import DataFormatError, RowSource
from diffalign.data.transforms import UnusableImage, check_size, decode_image, transform_item

logger = logging.getLogger(__name__)


def item_draws(cfg: DataConfig, seed: int, epoch: int, index: int) -> tuple[np.random.Generator, bool, bool]:
    """The random decisions of one item: (rng for the crop, flip, caption dropout). The one place they are
    drawn, so the latent cache and the trainer make the same ones. Both numbers are always drawn, so the
    streams do not depend on the settings."""
    rng = np.random.default_rng([seed, epoch, index])
    flip = bool(rng.random() < 0.5) and cfg.random_flip
    drop = bool(rng.random() < cfg.caption_dropout)
    return rng, flip, drop


def candidate_flips(cfg: DataConfig, rng: np.random.Generator, first: bool, k: int) -> list[bool]:
    """The flip of each of k candidates: all `first` under a joint geometry; under `independent`, candidate
    0 keeps `first` and the others draw their own from `rng` (after item_draws' draws, so the joint
    geometries' streams are unchanged)."""
    if cfg.pair_geometry != "independent":
        return [first] * k
    return [first] + [bool(rng.random() < 0.5) and cfg.random_flip for _ in range(k - 1)]


def geometry_frame(cfg: DataConfig, order: list[int]) -> int | None:
    """The candidate whose size the others take (transform_item's `frame`): the winner (position 0), the
    first stored image (wherever the ordering put it), or None (each image on its own)."""
    if cfg.pair_geometry == "independent":
        return None
    return order.index(0) if cfg.pair_geometry == "joint_first" else 0


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
        #: the first message of each skip reason (what a "too many skipped" error quotes)
        self.skip_examples: dict[str, str] = {}
        self._min_side = cfg.effective_min_side()
        self._pair = cfg.format in schema.PAIR_FORMATS
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
            self.skip_examples.setdefault(reason, f"item {index}: {message}")
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
        flips = candidate_flips(cfg, rng, flip, len(images))
        if self.force_flip is not None:
            flips = [self.force_flip] * len(images)
        out = transform_item(images, cfg.resolution, cfg.random_crop, flips, rng, frame=geometry_frame(cfg, order))
        out["captions"] = [""] * len(captions) if drop else list(captions)
        out["phi"] = torch.from_numpy(self.phi[index].astype(np.float32))
        out["key"] = self.key(index)
        return out


def build_preference_dataset(cfg: DataConfig, seed: int = 0) -> PreferenceDataset:
    """Open `cfg.source`, validate its columns, choose the usable rows and order, and return the dataset."""
    src = open_data_source(cfg)
    stats: Counter = Counter(rows_read=src.num_rows)
    rows, orders, phis, n_images = plan_rows(cfg, src, stats)
    if cfg.max_items is not None and len(rows) > cfg.max_items:
        stats["over_max_items"] += len(rows) - cfg.max_items
        rows, orders, phis, n_images = (
            rows[: cfg.max_items],
            orders[: cfg.max_items],
            phis[: cfg.max_items],
            n_images[: cfg.max_items],
        )
    k = len(orders[0]) if orders else (2 if cfg.format in schema.PAIR_FORMATS or cfg.ranked_as_pairs else 0)
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
