"""Small synthetic preference datasets in the REAL schemas, for tests and tiny recipes.

`builtin_source(format, rows, seed)` writes (once, keyed by format/rows/seed/version) a parquet file under
$DIFFALIGN_CACHE (default ~/.cache/diffalign)/builtin/ and returns its path; the dataset then reads it
through the ordinary parquet loader. The signal is learnable: the caption names a colour and a shape;
the preferred image is that shape in that colour, clean; the rejected one is noisy and/or off-colour.

- pickapic: every Pick-a-Pic v2 column (schema.PICKAPIC_V2_COLUMNS), JPEG bytes of varied sizes and
  aspect ratios (the loser's size differs from the winner's in some rows), ~10% ties, winners on
  either side (label_0 = 1 or 0), generator names in model_0 / model_1.
- double_caption: the same plus caption_0 / caption_1 describing each image (Pick-Double-Caption).
- ranked: Syn-Pic rows (prompt, images[4], generators, seeds, scores{scorer: [4]}, phi, rank).
"""

from __future__ import annotations

import datetime as _dt
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from diffalign.atomic import atomic_path
from diffalign.data.phi import ranks_from_phi, soft_preference

VERSION = 1
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((64, 64), (96, 64), (64, 96), (80, 64), (128, 96), (72, 72))  # (W, H)
MODELS = ("toy-sd15", "toy-sdxl", "toy-sd3", "toy-pixart")


def cache_dir() -> str:
    return os.environ.get("DIFFALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diffalign")


def render(
    colour: str, shape: str, size: tuple[int, int], noise: float, rng: np.random.Generator
) -> Image.Image:
    """A shape of `colour` centred on a light background, plus Gaussian noise of std `noise` (0..1)."""
    w, h = size
    img = Image.new("RGB", (w, h), (235, 235, 235))
    d = ImageDraw.Draw(img)
    s = 0.3 * min(w, h)
    cx, cy = w / 2, h / 2
    box = (cx - s, cy - s, cx + s, cy + s)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=fill)
    d.rectangle((0, 0, max(1, w // 8), max(1, h // 8)), fill=(40, 40, 40))  # top-left mark: shows flips
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 255 * noise, (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _other(rng: np.random.Generator, colour: str) -> str:
    return str(rng.choice([c for c in COLOURS if c != colour]))


def pickapic_table(rows: int, seed: int, double_caption: bool = False) -> pa.Table:
    rng = np.random.default_rng(seed)
    t0 = _dt.datetime(2023, 5, 1, tzinfo=_dt.timezone.utc)
    cols: dict[str, list] = {c: [] for c in (
        "are_different", "best_image_uid", "caption", "created_at", "has_label", "image_0_uid", "image_0_url",
        "image_1_uid", "image_1_url", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1",
        "ranking_id", "user_id", "num_example_per_prompt", "__index_level_0__", "caption_0", "caption_1",
    )}  # fmt: skip
    for i in range(rows):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        caption = f"a {colour} {shape}"
        size_w = SIZES[int(rng.integers(len(SIZES)))]
        size_l = size_w if rng.random() < 0.5 else SIZES[int(rng.integers(len(SIZES)))]
        tie = i % 10 == 9
        wrong = _other(rng, colour)
        win = render(colour, shape, size_w, 0.0, rng)
        lose = render(colour if tie else wrong, shape, size_l, 0.0 if tie else 0.25, rng)
        cap_w, cap_l = caption, (caption if tie else f"a noisy {wrong} {shape}")
        winner_first = bool(rng.random() < 0.5)
        label_0 = 0.5 if tie else (1.0 if winner_first else 0.0)
        ims = [win, lose] if winner_first else [lose, win]
        caps = [cap_w, cap_l] if winner_first else [cap_l, cap_w]
        uids = [f"{seed:04d}-{i:06d}-{j}" for j in (0, 1)]
        models = [str(m) for m in rng.choice(MODELS, size=2)]
        cols["are_different"].append(True)
        cols["best_image_uid"].append("" if tie else uids[0 if label_0 == 1.0 else 1])
        cols["caption"].append(caption)
        cols["created_at"].append(t0 + _dt.timedelta(minutes=i))
        cols["has_label"].append(True)
        for j in (0, 1):
            cols[f"image_{j}_uid"].append(uids[j])
            cols[f"image_{j}_url"].append(f"https://example.invalid/images/{uids[j]}.jpg")
            cols[f"jpg_{j}"].append(jpeg(ims[j]))
            cols[f"model_{j}"].append(models[j])
            cols[f"caption_{j}"].append(caps[j])
        cols["label_0"].append(label_0)
        cols["label_1"].append(1.0 - label_0)
        cols["ranking_id"].append(seed * 1_000_000 + i)
        cols["user_id"].append(int(rng.integers(1, 50)))
        cols["num_example_per_prompt"].append(1)
        cols["__index_level_0__"].append(i)
    types = {
        "are_different": pa.bool_(), "created_at": pa.timestamp("ns", tz="UTC"), "has_label": pa.bool_(),
        "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64(),
        "ranking_id": pa.int64(), "user_id": pa.int64(), "num_example_per_prompt": pa.int64(),
        "__index_level_0__": pa.int64(),
    }  # fmt: skip
    names = [c for c in cols if double_caption or c not in ("caption_0", "caption_1")]
    return pa.table({c: pa.array(cols[c], type=types.get(c, pa.string())) for c in names})


def ranked_table(rows: int, seed: int, k: int = 4) -> pa.Table:
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {
        c: [] for c in ("prompt", "images", "generators", "seeds", "scores", "phi", "rank")
    }
    for i in range(rows):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        size = SIZES[int(rng.integers(len(SIZES)))]
        quality = np.linspace(0.0, 1.0, k)  # 0 = clean and right; 1 = wrong colour and very noisy
        perm = rng.permutation(k)
        imgs, match, clean = [], [], []
        for q in quality[perm]:
            c = colour if q < 0.75 else _other(rng, colour)
            imgs.append(jpeg(render(c, shape, size, 0.3 * float(q), rng)))
            match.append(float(c == colour) + rng.normal(0, 0.01))
            clean.append(float(1.0 - q + rng.normal(0, 0.05)))
        scores = {"toy_colour": match, "toy_clean": clean}
        phi = soft_preference(np.array([match, clean])).tolist()
        out["prompt"].append(f"a {colour} {shape}")
        out["images"].append(imgs)
        out["generators"].append([MODELS[j % len(MODELS)] for j in perm])
        out["seeds"].append([int(seed * 100_000 + i * k + j) for j in range(k)])
        out["scores"].append(scores)
        out["phi"].append(phi)
        out["rank"].append(ranks_from_phi(phi).tolist())
    types = {
        "prompt": pa.string(), "images": pa.list_(pa.binary()), "generators": pa.list_(pa.string()),
        "seeds": pa.list_(pa.int64()),
        "scores": pa.struct([("toy_colour", pa.list_(pa.float64())), ("toy_clean", pa.list_(pa.float64()))]),
        "phi": pa.list_(pa.float64()), "rank": pa.list_(pa.int64()),
    }  # fmt: skip
    return pa.table({c: pa.array(v, type=types[c]) for c, v in out.items()})


def make_table(fmt: str, rows: int, seed: int) -> pa.Table:
    if fmt == "pickapic":
        return pickapic_table(rows, seed)
    if fmt == "double_caption":
        return pickapic_table(rows, seed, double_caption=True)
    if fmt == "ranked":
        return ranked_table(rows, seed)
    raise ValueError(f"no builtin generator for format {fmt!r}; choose pickapic, double_caption or ranked")


def write_parquet(table: pa.Table, path: str, row_group_size: int = 16) -> str:
    """Atomic write, so concurrent readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)
    return path


def builtin_source(fmt: str, rows: int = 64, seed: int = 0) -> str:
    """Path of the builtin parquet for (fmt, rows, seed); written on first use."""
    path = os.path.join(cache_dir(), "builtin", f"{fmt}-r{rows}-s{seed}-v{VERSION}.parquet")
    if not os.path.isfile(path):
        write_parquet(make_table(fmt, rows, seed), path)
    return path
