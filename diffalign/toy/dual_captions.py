"""DCPO data for the toy world: the (best, worst) pair of every toy Syn-Pic row, each image with its own caption.

DCPO trains Diffusion-DPO with one caption per image. Its DCPO-c variant has a captioner
describe each image; in the toy world the captioner is exact: the toy reward's reading of the image's colour
and shape ("a red square"). An image whose object the reward cannot find (no foreground) keeps the prompt,
and is counted. The pairs are the ones the ranked loader trains on (`ranked_as_pairs`: first of the best,
last of the worst, rows without a preference skipped), so DCPO sees exactly the images DPO sees.

Output: a double_caption parquet (caption, caption_0, caption_1, jpg_0, jpg_1, label_0, label_1), read by
the ordinary pair loader (`data.format: double_caption`). `caption` is the original prompt.

    python -m diffalign.toy.dual_captions runs/demo/synpic/data runs/demo/synpic/dual_captions.parquet
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def read_caption(pred_colour: str, pred_shape: str) -> str | None:
    """What the image shows, as a toy-grammar caption; None when the reward found no object ("")."""
    from diffalign.toy.world import phrase

    return phrase(pred_colour, pred_shape) if pred_colour and pred_shape else None


def write_dual_caption_data(ranked_source: str | Path, path: str | Path, resolution: int) -> dict[str, int]:
    """Write the double_caption parquet for a toy Syn-Pic folder; returns counts: the ranked loader's (rows
    read, rows without a preference, ...), unreadable images (skipped), uncaptioned images, rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.atomic import atomic_path
    from diffalign.data import build_preference_dataset
    from diffalign.data.config import DataConfig
    from diffalign.data.transforms import UnusableImage, decode_image
    from diffalign.toy.reward import toy_reward_details

    cfg = DataConfig(format="ranked", source=str(ranked_source), resolution=resolution, ranked_as_pairs=True)
    ds = build_preference_dataset(cfg)
    prompt_col, images_col = cfg.column("prompt"), cfg.column("images")
    cols: dict[str, list] = {k: [] for k in ("caption", "caption_0", "caption_1", "jpg_0", "jpg_1", "label_0", "label_1")}
    stats: Counter = Counter()
    for i in range(len(ds)):
        row = ds.src.row(int(ds.rows[i]), [prompt_col, images_col])
        prompt, stored = row[prompt_col], row[images_col]
        best, worst = (int(j) for j in ds.order[i])
        pair = [stored[best], stored[worst]]
        try:
            images = [decode_image(b) for b in pair]
        except UnusableImage as err:
            stats[err.reason] += 1
            continue
        d = toy_reward_details(images, [prompt, prompt])
        caps = [read_caption(d["pred_colour"][j], d["pred_shape"][j]) for j in range(2)]
        stats["uncaptioned"] += sum(c is None for c in caps)
        caps = [prompt if c is None else c for c in caps]
        stats["loser_caption_differs"] += int(caps[1] != prompt)
        for key, value in zip(cols, (prompt, caps[0], caps[1], pair[0], pair[1], 1.0, 0.0), strict=True):
            cols[key].append(value)
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64()}
    table = pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in cols.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return {**ds.stats, **stats, "written": table.num_rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffalign.toy.dual_captions", description=__doc__.split("\n")[0])
    p.add_argument("ranked_source", help="the toy Syn-Pic data folder (OUT/synpic/data)")
    p.add_argument("output", help="the parquet file to write")
    p.add_argument("--resolution", type=int, default=16)
    args = p.parse_args(argv)
    print(write_dual_caption_data(args.ranked_source, args.output, args.resolution))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
