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


# ---------------------------------------------------------------------------------------- unreadable files


def _flat_with_a_corrupt_file(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(folder / "00000.png")
    (folder / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.new("RGB", (8, 8), (0, 0, 0)).save(folder / "00002.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("white\nbroken\nblack\n", encoding="utf-8")
    return folder, prompts


def test_score_entries_skips_and_names_unreadable_files(tmp_path, caplog):
    folder, _ = _flat_with_a_corrupt_file(tmp_path)
    skipped = []
    with caplog.at_level("WARNING"):
        rows = score_entries(flat_entries(folder, ["white", "broken", "black"]), {"brightness": Brightness()},
                             batch_size=2, progress=False, skipped=skipped)  # fmt: skip
    assert [(r["index"], r["scores"]["brightness"]) for r in rows] == [(0, 1.0), (2, 0.0)]
    assert [s["path"] for s in skipped] == [str(folder / "00001.png")]
    assert str(folder / "00001.png") in caplog.text and "skipped 1 of 3" in caplog.text


def test_score_cli_skips_a_corrupt_file_with_a_warning(tmp_path, capsys):
    import json

    from diffalign.evaluation.cli import score_main

    folder, prompts = _flat_with_a_corrupt_file(tmp_path)
    out = tmp_path / "out"
    rc = score_main(["--images", str(folder), "--prompts", str(prompts), "--scorers", "tests.test_score_files:Brightness",
                     "--out", str(out), "--quiet", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == [0, 2]
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "skipped 1 image file(s)" in md and "00001.png" in md


def test_score_cli_fails_clearly_when_nothing_can_be_read(tmp_path, capsys):
    from diffalign.evaluation.cli import score_main

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i:05d}.png").write_bytes(b"garbage")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\n", encoding="utf-8")
    rc = score_main(["--images", str(folder), "--prompts", str(prompts), "--scorers", "tests.test_score_files:Brightness",
                     "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "none of the 2 image files could be read" in err[0]
    assert "00000.png" in err[0] and not (tmp_path / "out" / "scores.jsonl").exists()


def test_warning_reaches_stderr_in_a_real_run(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    folder, prompts = _flat_with_a_corrupt_file(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "diffalign", "score", "--images", str(folder), "--prompts", str(prompts),
           "--scorers", "tests.test_score_files:Brightness", "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"]  # fmt: skip
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "00001.png" in line]
    assert warnings and warnings[0].startswith("skipping ") and "undecodable image" in warnings[0]
