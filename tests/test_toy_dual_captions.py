"""DCPO data for the toy world: (best, worst) pairs of ranked rows, each image captioned by what it shows."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from data_helpers import png, ranked_table, write
from PIL import Image


def _png(prompt: str, seed: int = 0) -> bytes:
    from diffalign.toy.world import render_prompt

    return png(Image.fromarray(render_prompt(prompt, seed, 32)))


def test_pairs_are_the_loaders_and_each_image_is_captioned_by_what_it_shows(tmp_path):
    from diffalign.toy.dual_captions import write_dual_caption_data

    blank = png(Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)))
    rows = [
        {"prompt": "a red circle", "images": [_png("a blue square"), _png("a red circle"), _png("a green triangle")],
         "phi": [0.2, 0.9, 0.1]},
        {"prompt": "a blue square", "images": [_png("a blue square"), _png("a red square")], "phi": [0.5, 0.5]},
        {"prompt": "a cyan circle", "images": [blank, _png("a cyan circle", 3)], "phi": [0.1, 0.8]},
        {"prompt": "a red square", "images": [b"not an image", _png("a red square")], "phi": [0.9, 0.1]},
    ]  # fmt: skip
    src = write(ranked_table(rows), tmp_path / "ranked.parquet")
    counts = write_dual_caption_data(src, tmp_path / "dual.parquet", resolution=32)
    assert counts["equal_phi"] == 1 and counts["corrupt_image"] == 1 and counts["uncaptioned"] == 1
    assert counts["written"] == 2
    t = pq.read_table(tmp_path / "dual.parquet").to_pylist()
    # row 1: best is image 1 (what was asked), worst image 2, captioned as the green triangle it shows
    assert (t[0]["caption"], t[0]["caption_0"], t[0]["caption_1"]) == ("a red circle", "a red circle", "a green triangle")
    assert t[0]["jpg_0"] == rows[0]["images"][1] and t[0]["jpg_1"] == rows[0]["images"][2]
    assert (t[0]["label_0"], t[0]["label_1"]) == (1.0, 0.0)
    # row 3: the blank loser shows nothing to caption, so it keeps the prompt
    assert (t[1]["caption_0"], t[1]["caption_1"]) == ("a cyan circle", "a cyan circle")


def test_the_output_trains_through_the_double_caption_loader(tmp_path):
    from diffalign.data import build_preference_dataset
    from diffalign.data.config import DataConfig
    from diffalign.toy.dual_captions import write_dual_caption_data

    rows = [{"prompt": "a red circle", "images": [_png("a red circle"), _png("a blue square")], "phi": [0.9, 0.1]}]
    write_dual_caption_data(write(ranked_table(rows), tmp_path / "r.parquet"), tmp_path / "d.parquet", 32)
    ds = build_preference_dataset(DataConfig(format="double_caption", source=str(tmp_path / "d.parquet"), resolution=32))
    assert len(ds) == 1 and ds.captions(0) == ["a red circle", "a blue square"]
