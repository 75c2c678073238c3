"""Row planning: which rows of a source are usable, in which order their candidates go (best first) and
with which phi. Reads only the light columns (labels, phi / scores / rank); counts every skipped or
flagged row in `stats` (the counters of docs/data.md). Also opens the source a DataConfig names, reading
jsonl / HPDv2 files into the ranked layout in memory."""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from diffalign.data import schema
from diffalign.data.columns import check_columns, is_image, is_list_of, is_number, is_scores, is_text
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
from diffalign.data.synthetic import builtin_source

#: a plan: usable row indices, their candidate order (best first), their phi (in that order), their #images
Plan = tuple[list[int], list[tuple[int, ...]], list[tuple[float, ...]], np.ndarray]


def open_data_source(cfg: DataConfig) -> RowSource:
    """The RowSource of `cfg.source`: a builtin synthetic table, a jsonl / HPDv2 file, or anything
    diffalign.data.sources opens (hub id, parquet, save_to_disk folder)."""
    if cfg.source.startswith("builtin:"):
        return open_source(builtin_source(cfg.format, rows=cfg.builtin_rows, seed=cfg.builtin_seed), cfg.split)
    if cfg.format in ("jsonl", "hpdv2") or cfg.source.endswith((".jsonl",)):
        if cfg.format in schema.PAIR_FORMATS:
            raise DataFormatError(f"a .jsonl source is read with format 'jsonl', not {cfg.format!r}")
        src = json_source(cfg)
        if cfg.columns or cfg.caption_column:
            raise DataFormatError("column renames do not apply to jsonl / hpdv2 sources (keys are fixed)")
        return src
    return open_source(cfg.source, cfg.split)


def plan_rows(cfg: DataConfig, src: RowSource, stats: Counter) -> Plan:
    """Check the columns and plan the rows of `src` for `cfg.format` (pairs or ranked lists)."""
    return (pair_plan if cfg.format in schema.PAIR_FORMATS else ranked_plan)(cfg, src, stats)


def _phi_of_scores(scores: Any) -> list[float] | None:
    """The Syn-Pic phi of a row's `scores` ({scorer: [k]} or [k]; diffalign.data.phi), or None when they
    cannot give one: no scorer, k < 2, lengths that differ, or a non-finite score (the loader does not
    rank around a NaN; the row's rank is tried next)."""
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


def pair_plan(cfg: DataConfig, src: RowSource, stats: Counter) -> Plan:
    fmt = cfg.format
    img_t = "encoded image bytes (binary), an {bytes, path} struct or a path string"
    wanted = {r: (cfg.column(r), is_image, img_t) for r in ("jpg_0", "jpg_1")}
    wanted["label_0"] = (cfg.column("label_0"), is_number, "a number (float or int)")
    for r in ("caption_0", "caption_1") if fmt == "double_caption" else ("caption",):
        wanted[r] = (cfg.column(r), is_text, "text (string)")
    check_columns(src, wanted, fmt)
    label0 = src.column(cfg.column("label_0"))
    lab1_col = cfg.column("label_1")
    label1 = (
        src.column(lab1_col)
        if lab1_col in src.column_names and is_number(src.schema.field(lab1_col).type)
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


def row_phi(cfg: DataConfig, src: RowSource, stats: Counter) -> list[list[float] | None]:
    names = src.column_names
    have = {r: cfg.column(r) in names for r in schema.RANKED_PREFERENCE_SOURCES}
    if not any(have.values()):
        cols = [cfg.column(r) for r in schema.RANKED_PREFERENCE_SOURCES]
        raise DataFormatError(
            f"{cfg.format} source {src.description}: missing a preference column, one of {cols}; "
            f"found columns {names}"
        )
    checks = {
        "phi": (is_list_of, "a list of numbers"),
        "scores": (None, "{scorer: list of numbers} or a list of numbers"),
        "rank": (is_list_of, "a list of integers"),
    }
    for role, ok in have.items():
        if ok:
            t = src.schema.field(cfg.column(role)).type
            good = is_scores(t) if role == "scores" else checks[role][0](t, is_number)
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


def ranked_plan(cfg: DataConfig, src: RowSource, stats: Counter) -> Plan:
    wanted = {
        "prompt": (cfg.column("prompt"), is_text, "text (string)"),
        "images": (
            cfg.column("images"),
            lambda t: is_list_of(t, is_image),
            "a list of images (bytes/paths)",
        ),
    }
    check_columns(src, wanted, cfg.format)
    all_phi = row_phi(cfg, src, stats)
    ks = sorted({len(p) for p in all_phi if p is not None and len(p) >= 2})
    if len(ks) > 1 and not cfg.ranked_as_pairs:
        raise DataFormatError(
            f"{cfg.format} source {src.description}: rows hold different numbers of candidates K={ks}; a batch "
            "needs one K. Filter the rows to one K, or set ranked_as_pairs: true to train on (best, worst) pairs."
        )
    rows, orders, phis, n_images = [], [], [], []
    if src.single_images:  # one image per row, no preference: what SFT and SePPO read (candidate 0 only)
        if cfg.ranked_as_pairs:
            raise DataFormatError(f"{src.description} holds one image per line (a plain image set): there are no "
                                  "pairs to make; remove ranked_as_pairs")  # fmt: skip
        keep = [i for i, phi in enumerate(all_phi) if phi is not None]
        return keep, [(0,)] * len(keep), [(1.0,)] * len(keep), np.ones(len(keep), dtype=np.int64)
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


def json_source(cfg: DataConfig) -> RowSource:
    """jsonl (pairs, ranked lists or single images) or HPDv2 train.json, normalised to the ranked layout in
    memory."""
    path = cfg.source
    if not os.path.isfile(path):
        raise DataFormatError(f"{cfg.format} source {path!r} is not a file")
    raw = read_json_rows(path)
    if not raw:
        raise DataFormatError(f"{cfg.format} source {path} holds no rows (empty, or blank lines only)")
    base = os.path.dirname(os.path.abspath(path))
    rows: list[dict[str, Any]] = []
    kind = None
    for n, obj in enumerate(raw, start=1):
        where = f"{path} {'line' if path.endswith('.jsonl') else 'entry'} {n}"
        if cfg.format == "hpdv2":
            need, this = schema.HPDV2_KEYS, "hpdv2"
        else:
            this = "pair" if "chosen" in obj or "rejected" in obj else "image" if "image" in obj else "ranked"
            need = {"pair": schema.JSONL_PAIR_KEYS, "image": schema.JSONL_IMAGE_KEYS}.get(this, schema.JSONL_RANKED_KEYS)
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
        elif this == "image":
            if not isinstance(obj["image"], str):
                raise DataFormatError(f"{where}: 'image' must be a path string, got {obj['image']!r}")
            images, pref = [obj["image"]], {"phi": [1.0]}
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
    src = ListSource(rows, pa.schema(fields), os.path.abspath(path), base, fp)
    src.single_images = kind == "image"
    return src
