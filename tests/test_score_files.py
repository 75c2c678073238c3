"""`diffalign score` / `diffalign eval` read image files with the training data's decode rule, name
unreadable files, and refuse to succeed on nothing."""

import numpy as np
import torch
from PIL import Image

from diffalign.data.transforms import decode_image
from diffalign.evaluation.runner import flat_entries, score_entries
from diffalign.rewards.base import Scorer


class Brightness(Scorer):
    """Mean pixel value in [0, 1] of the RGB image it is given."""

    name = "brightness"

    def _score_batch(self, images, prompts):
        return torch.tensor([np.asarray(im, dtype=np.float32).mean() / 255 for im in images])


def _files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(folder / "00000.png")  # 16-bit mid grey
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(folder / "00001.png")  # fully transparent
    Image.new("RGB", (8, 8), (30, 60, 90)).save(folder / "00002.png")
    return folder


def test_scoring_decodes_files_like_the_training_data(tmp_path):
    folder = _files(tmp_path)
    rows = score_entries(flat_entries(folder, ["a", "b", "c"]), {"brightness": Brightness()}, progress=False)
    got = [r["scores"]["brightness"] for r in rows]
    want = [float(Brightness().score([decode_image(str(p))], "x")) for p in sorted(folder.iterdir())]
    assert got == want
    assert abs(got[0] - 128 / 255) < 1e-6  # not white (PIL's convert clips 16-bit at 255)
    assert got[1] == 1.0  # transparent over white, not black
    assert abs(got[2] - 60 / 255) < 1e-6
