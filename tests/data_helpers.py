"""Fixtures of the real preference schemas, built in the tests (no network, no downloads)."""

from __future__ import annotations

import datetime as dt
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign.data import schema


def solid(colour, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, colour)


def half(size=(64, 48), left=(0, 0, 0), right=(255, 255, 255)) -> Image.Image:
    """Left half one colour, right half another: a horizontal flip is visible."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2 :] = right
    return Image.fromarray(arr)


def jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pickapic_table(rows: list[dict], double_caption: bool = False, drop=(), types=None) -> pa.Table:
    """rows: dicts with caption, jpg_0, jpg_1 (bytes), label_0 (+ optional caption_0/1, label_1).
    Every other Pick-a-Pic v2 column is filled in; `drop` removes columns; `types` overrides arrow types."""
    t0 = dt.datetime(2023, 5, 1)
    cols: dict[str, list] = {
        c: [] for c in schema.DOUBLE_CAPTION_COLUMNS if double_caption or not c.startswith("caption_")
    }
    for i, r in enumerate(rows):
        l0 = r["label_0"]
        vals = {
            "are_different": True, "best_image_uid": f"u{i}-0", "caption": r.get("caption", f"prompt {i}"),
            "created_at": t0, "has_label": True, "image_0_uid": f"u{i}-0", "image_0_url": "http://x/0.jpg",
            "image_1_uid": f"u{i}-1", "image_1_url": "http://x/1.jpg", "jpg_0": r["jpg_0"], "jpg_1": r["jpg_1"],
            "label_0": l0, "label_1": r.get("label_1", 1.0 - l0 if isinstance(l0, float) else None),
            "model_0": "m0", "model_1": "m1", "ranking_id": i, "user_id": 7, "num_example_per_prompt": 1,
            "__index_level_0__": i, "caption_0": r.get("caption_0"), "caption_1": r.get("caption_1"),
        }  # fmt: skip
        for c in cols:
            cols[c].append(vals[c])
    base = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64(),
            "created_at": pa.timestamp("us"), "are_different": pa.bool_(), "has_label": pa.bool_(),
            "ranking_id": pa.int64(), "user_id": pa.int64(), "num_example_per_prompt": pa.int64(),
            "__index_level_0__": pa.int64()}  # fmt: skip
    base.update(types or {})
    return pa.table({c: pa.array(v, type=base.get(c, pa.string())) for c, v in cols.items() if c not in drop})


def ranked_table(rows: list[dict], types=None) -> pa.Table:
    """rows: dicts with prompt, images (list of bytes) and any of phi / scores / rank / generators / seeds."""
    names = [c for c in schema.RANKED_COLUMNS if any(c in r for r in rows)]
    base = {"prompt": pa.string(), "images": pa.list_(pa.binary()), "generators": pa.list_(pa.string()),
            "seeds": pa.list_(pa.int64()), "phi": pa.list_(pa.float64()), "rank": pa.list_(pa.int64())}  # fmt: skip
    base.update(types or {})
    return pa.table({c: pa.array([r.get(c) for r in rows], type=base.get(c)) for c in names})


def write(table: pa.Table, path, row_group_size: int = 2) -> str:
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def mean_rgb(pixels) -> list[float]:
    """Mean of a [3, H, W] tensor in [-1, 1], back in 0..255."""
    return ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist()


@pytest.fixture(autouse=True, scope="session")
def builtin_cache(tmp_path_factory):
    """builtin:* sources write to a per-session folder, never to the user's ~/.cache (import this fixture)."""
    old = os.environ.get("DIFFALIGN_CACHE")
    os.environ["DIFFALIGN_CACHE"] = str(tmp_path_factory.mktemp("diffalign_cache"))
    yield os.environ["DIFFALIGN_CACHE"]
    if old is None:
        os.environ.pop("DIFFALIGN_CACHE", None)
    else:
        os.environ["DIFFALIGN_CACHE"] = old
