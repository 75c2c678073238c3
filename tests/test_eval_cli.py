"""`diffalign eval` / `diffalign score` end to end on a tiny pipeline saved to disk, with tiny scorers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.evaluation.cli import eval_main, score_main
from diffalign.rewards.base import Scorer

ROOT = Path(__file__).resolve().parents[1]


class Brightness(Scorer):
    name = "brightness"

    def _score_batch(self, images, prompts):
        return torch.tensor([np.asarray(im, dtype=np.float32).mean() / 255 for im in images])


class Redness(Scorer):
    name = "redness"

    def _score_batch(self, images, prompts):
        return torch.tensor([np.asarray(im, dtype=np.float32)[..., 0].mean() / 255 for im in images])


SCORERS = "tests.test_eval_cli:Brightness,tests.test_eval_cli:Redness"
PROMPTS = ["a red square", "a blue circle", "a green triangle"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffalign.backbones.tiny import save_tiny_pipeline, tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    base = save_tiny_pipeline(root / "tiny-sd")
    pipe = tiny_pipeline("sd")
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    lora_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=lora_sd)
    suite = root / "suite.yaml"
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    suite.write_text(
        "name: tiny\nprompts: {type: file, path: prompts.txt}\nimages_per_prompt: 2\n"
        "seeds: {base: 7, scheme: unique}\nsteps: 2\nguidance: 3.0\nscorers: [brightness]\n"
        "anchors: {note: none}\n"
    )
    return {"base": base, "lora": root / "lora", "suite": suite, "prompts": root / "prompts.txt"}


def _run(args):
    return eval_main([*map(str, args), "--device", "cpu", "--quiet"])


def test_eval_end_to_end_resume_and_compare(models, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--model", models["base"], "--lora", models["lora"], "--name", "tuned", "--compare", models["base"],
            "--compare-name", "base", "--suite", models["suite"], "--scorers", SCORERS, "--out", out]  # fmt: skip
    assert _run(args) == 0
    assert "tuned: generated 6 images, kept 0" in capsys.readouterr().out

    # layout, results, summary, report
    for label in ("tuned", "base"):
        assert json.loads((out / label / "images" / "00002" / "metadata.jsonl").read_text()) == {"prompt": PROMPTS[2]}
        assert sorted(p.name for p in (out / label / "images" / "00001" / "samples").iterdir()) == ["0000.png", "0001.png"]
        rows = [json.loads(x) for x in (out / label / "scores.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and set(rows[0]["scores"]) == {"brightness", "redness"}
        assert [r["seed"] for r in rows] == [7, 8, 9, 10, 11, 12]  # unique scheme: base + index * 2 + k
        img = Image.open(out / rows[3]["image"])
        assert rows[3]["scores"]["brightness"] == pytest.approx(np.asarray(img, dtype=np.float32).mean() / 255, rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    tuned = [json.loads(x) for x in (out / "tuned" / "scores.jsonl").read_text().splitlines()]
    base = [json.loads(x) for x in (out / "base" / "scores.jsonl").read_text().splitlines()]
    assert summary["models"]["tuned"]["scores"]["brightness"]["mean"] == pytest.approx(np.mean([r["scores"]["brightness"] for r in tuned]))
    # the LoRA changes the images, so the two models differ
    assert [r["scores"]["brightness"] for r in tuned] != [r["scores"]["brightness"] for r in base]
    # win rate recomputed from the per-image scores
    for s in ("brightness", "redness"):
        a = [np.mean([r["scores"][s] for r in tuned if r["index"] == i]) for i in range(3)]
        b = [np.mean([r["scores"][s] for r in base if r["index"] == i]) for i in range(3)]
        w = summary["comparison"]["win_rates"][s]
        assert w["prompts"] == 3 and w["wins"] == sum(x > y for x, y in zip(a, b, strict=True))
        assert w["win_rate"] == pytest.approx((w["wins"] + 0.5 * w["ties"]) / 3)
    assert len((out / "comparison.jsonl").read_text().splitlines()) == 3
    md = (out / "summary.md").read_text()
    assert "| tuned |" in md and "| base |" in md and "win rate of **tuned** over **base**" in md
    html = (out / "report.html").read_text()
    assert html.count("<img class='plot'") == 3  # two scorer plots + the win-rate plot
    assert html.count("<img class='thumb") == 12  # 3 prompts x 2 images x 2 models

    # resume: nothing regenerated, files untouched
    img = out / "tuned" / "images" / "00000" / "samples" / "0001.png"
    before = img.stat().st_mtime_ns, img.read_bytes()
    assert _run(args) == 0
    o = capsys.readouterr().out
    assert "tuned: generated 0 images, kept 6" in o and "base: generated 0 images, kept 6" in o
    assert (img.stat().st_mtime_ns, img.read_bytes()) == before
    # a missing image is regenerated, identically (its own seed)
    img.unlink()
    assert _run(args) == 0
    assert "tuned: generated 1 images, kept 5" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(img)), np.asarray(Image.open(__import__("io").BytesIO(before[1]))))

    # other settings into the same folder are refused
    assert _run([*args, "--steps", "3"]) == 2
    assert "other settings" in capsys.readouterr().err
    # a run.json left empty by a kill (older versions rewrote it in place) is one clear error, not a traceback
    (out / "tuned" / "run.json").write_text("")
    assert _run(args) == 2
    assert f"{out / 'tuned' / 'run.json'} is empty or unreadable" in capsys.readouterr().err


def test_limit_and_suite_default_scorers(models, tmp_path, monkeypatch):
    from diffalign.rewards import base as rewards_base

    monkeypatch.setitem(rewards_base._REGISTRY, "brightness", lambda **kw: Brightness())
    out = tmp_path / "run"
    assert _run(["--model", models["base"], "--suite", models["suite"], "--out", out, "--limit", "1", "--no-report"]) == 0
    label = next(p.name for p in out.iterdir() if p.is_dir())
    rows = (out / label / "scores.jsonl").read_text().splitlines()
    assert len(rows) == 2 and set(json.loads(rows[0])["scores"]) == {"brightness"}
    assert not (out / "report.html").exists() and (out / "summary.md").exists()


def test_clear_errors_for_bad_checkpoints(models, tmp_path, capsys):
    common = ["--suite", models["suite"], "--scorers", SCORERS, "--out", tmp_path / "o"]
    assert _run(["--model", tmp_path / "missing", *common]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _run(["--model", tmp_path / "empty", *common]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    assert _run(["--model", models["lora"], *common]) == 2
    assert "--lora" in capsys.readouterr().err
    assert _run(["--model", models["base"], "--lora", tmp_path / "nolora", *common]) == 2
    assert "LoRA folder" in capsys.readouterr().err
    assert _run(["--model", models["base"], "--suite", "no-such-suite", "--out", tmp_path / "o"]) == 2
    assert "no suite" in capsys.readouterr().err
    assert _run(["--model", models["base"], "--suite", models["suite"], "--scorers", "nowhere.mod:X", "--out", tmp_path / "o"]) == 2
    assert "cannot be imported" in capsys.readouterr().err


def test_score_existing_images_layout_and_flat(models, tmp_path, capsys):
    # GenEval layout without metadata: prompts come from the prompt file
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        d = tmp_path / "layout" / f"{i:05d}" / "samples"
        d.mkdir(parents=True)
        Image.new("RGB", (8, 8), color).save(d / "0000.png")
    out = tmp_path / "scored"
    rc = score_main(["--images", str(tmp_path / "layout"), "--prompts", str(models["prompts"]), "--scorers", SCORERS,
                     "--out", str(out), "--device", "cpu", "--quiet"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:2]
    assert [r["scores"]["redness"] for r in rows] == [1.0, 0.0]
    assert (out / "report.html").exists()
    # a layout folder with no metadata and no --prompts is refused with a hint
    assert score_main(["--images", str(tmp_path / "layout"), "--scorers", SCORERS, "--quiet", "--device", "cpu"]) == 2
    assert "metadata.jsonl" in capsys.readouterr().err


def test_score_cli_subprocess_flat_folder(models, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in (2, 0):
        Image.new("RGB", (8, 8), (200, 200, 200) if i == 2 else (0, 0, 0)).save(flat / f"{i:05d}.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "diffalign", "score", "--images", str(flat), "--prompts", str(models["prompts"]),
           "--scorers", "tests.test_eval_cli:Brightness", "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (tmp_path / "o" / "scores.jsonl").read_text().splitlines()]
    assert [(r["index"], r["prompt"]) for r in rows] == [(0, PROMPTS[0]), (2, PROMPTS[2])]
    assert rows[1]["scores"]["brightness"] == pytest.approx(200 / 255)
    assert "brightness" in res.stdout
