"""The toy eval suite: McNemar, the toy field scorers, the pixel-space generator and `diffalign eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffalign.evaluation.stats import mcnemar_exact, mcnemar_table, paired_mcnemar


def test_mcnemar_exact_on_hand_made_tables():
    # 8 discordant pairs favour A, 2 favour B: p = 2 * P(X <= 2 | n = 10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)
    # concordant pairs do not matter: 30 both right, 40 both wrong, then the 8 / 2 above
    a = [1] * 30 + [0] * 40 + [1] * 8 + [0] * 2
    b = [1] * 30 + [0] * 40 + [0] * 8 + [1] * 2
    t = mcnemar_table([bool(x) for x in a], [bool(x) for x in b])
    assert (t["both"], t["neither"], t["a_only"], t["b_only"], t["n"]) == (30, 40, 8, 2, 80)
    assert t["a_mean"] == pytest.approx(38 / 80) and t["b_mean"] == pytest.approx(32 / 80)
    assert t["p_value"] == pytest.approx(112 / 1024)


def test_paired_mcnemar_pairs_rows_by_prompt_and_sample():
    def rows(values):
        return [{"index": i // 2, "sample": i % 2, "scores": {"ok": v, "cont": 0.3}} for i, v in enumerate(values)]

    a = rows([1.0, 1.0, 0.0, 1.0])
    b = list(reversed(rows([0.0, 1.0, 1.0, 0.0])))  # row order must not matter: pairing is by (index, sample)
    t = paired_mcnemar(a, b, "ok")
    assert (t["a_only"], t["b_only"], t["both"], t["n"]) == (2, 1, 1, 4)
    assert paired_mcnemar(a, b[:2], "ok")["n"] == 2  # only the pairs both models have
    assert paired_mcnemar(a, b, "cont") is None  # not a binary scorer


def test_toy_field_scorers_match_the_reward_details():
    from diffalign.rewards import create_scorer
    from diffalign.toy.reward import toy_reward_details
    from diffalign.toy.world import all_prompts, render_batch

    prompts = all_prompts() * 2
    images = render_batch(prompts, list(range(len(prompts))))
    images[0] = images[1]  # a wrong image: prompt 0 ("a red circle") gets a red square
    images[3] = 0  # an empty image
    details = toy_reward_details(images, prompts)
    from PIL import Image

    pil = [Image.fromarray(x) for x in images]
    for field in ("correct", "colour_correct", "shape_correct", "cleanliness"):
        got = create_scorer(f"toy_{field}").score(pil, prompts).numpy()
        np.testing.assert_allclose(got, details[field].astype(np.float32))
    assert create_scorer("toy_correct").score(pil[:1], prompts[:1]).item() == 0.0
    assert create_scorer("toy_colour_correct").score(pil[:1], prompts[:1]).item() == 1.0
    assert create_scorer("toy_correct").score(pil[3:4], prompts[3:4]).item() == 0.0


def test_toy_suite_protocol():
    from diffalign.evaluation.suites import load_suite
    from diffalign.toy.prompts import eval_prompts
    from diffalign.toy.recipes import DemoRecipe

    suite = load_suite("toyworld")
    items = suite.load_prompts()
    assert [it.prompt for it in items] == [p["prompt"] for p in eval_prompts()]
    assert len(items) == 18 and items[0].metadata == {"prompt": "a red circle", "colour": "red", "shape": "circle"}
    assert suite.images_per_prompt >= 16
    eval_seeds = {suite.seed_for(it.index, k) for it in items for k in range(suite.images_per_prompt)}
    assert len(eval_seeds) == 18 * suite.images_per_prompt  # every image its own seed
    r = DemoRecipe()
    data_seeds = set(range(18 * r.groups_per_prompt * r.k))  # Syn-Pic: seed 0 + row * k + j
    assert not eval_seeds & data_seeds
    assert {"toy", "toy_correct", "toy_colour_correct", "toy_shape_correct", "toy_cleanliness"} <= set(suite.scorers)


def _tiny_pixel_model(path: Path, seed: int = 0) -> str:
    from dataclasses import replace

    from diffalign.toy.base import QUICK_RECIPE, build_init_backbone

    build_init_backbone(replace(QUICK_RECIPE, seed=seed)).save_pretrained(path)
    return str(path)


def test_diffalign_eval_on_pixel_folders_with_a_paired_test(tmp_path):
    from diffalign.evaluation.cli import eval_main

    a = _tiny_pixel_model(tmp_path / "a", seed=0)
    b = _tiny_pixel_model(tmp_path / "b", seed=1)
    out = tmp_path / "eval"
    rc = eval_main(["--model", a, "--name", "a", "--compare", b, "--compare-name", "b", "--suite", "toyworld",
                    "--limit", "2", "--images-per-prompt", "3", "--steps", "2", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for label in ("a", "b"):
        scores = summary["models"][label]["scores"]
        assert {"toy", "toy_correct", "toy_colour_correct", "toy_shape_correct", "toy_cleanliness"} <= set(scores)
        assert scores["toy_correct"]["n"] == 6
    mc = summary["comparison"]["mcnemar"]
    assert set(mc) == {"toy_correct", "toy_colour_correct", "toy_shape_correct"}  # the binary scorers only
    assert mc["toy_correct"]["n"] == 6
    assert "McNemar" in (out / "summary.md").read_text() and (out / "report.html").is_file()
    rows = [json.loads(x) for x in (out / "a" / "scores.jsonl").read_text().splitlines()]
    # the suite's unique scheme: image k of prompt i has seed base + i * images_per_prompt + k
    assert sorted(r["seed"] for r in rows) == [1_000_000 + 3 * i + k for i in range(2) for k in range(3)]
    from PIL import Image

    assert Image.open(out / "a" / "images" / "00000" / "samples" / "0000.png").size == (16, 16)


def test_pixel_generator_is_deterministic_per_seed_and_rejects_lora(tmp_path):
    from diffalign.sampling.generators import (
        ModelLoadError,
        PixelGenerator,
        is_pixel_folder,
        make_generator,
    )

    m = _tiny_pixel_model(tmp_path / "m")
    assert is_pixel_folder(m) and not is_pixel_folder(str(tmp_path))
    gen = make_generator(m, steps=2, guidance=5.0)
    assert isinstance(gen, PixelGenerator)
    one = gen(["a red circle", "a blue square"], [7, 8])
    two = gen(["a blue square"], [8])  # image of seed 8 does not depend on its batch
    assert np.array_equal(np.asarray(one[1]), np.asarray(two[0]))
    assert not np.array_equal(np.asarray(one[0]), np.asarray(gen(["a red circle"], [9])[0]))
    with pytest.raises(ModelLoadError, match="LoRA"):
        PixelGenerator(m, lora=str(tmp_path))


def test_the_paired_test_separates_a_right_generator_from_a_wrong_one(tmp_path):
    """run_eval on the toy suite with the renderer (right) against the renderer drawing corrupted captions
    (always wrong): the McNemar test must find the difference, and must not between two right ones."""
    from diffalign.evaluation.cli import build_scorers
    from diffalign.evaluation.runner import ModelRun, run_eval
    from diffalign.evaluation.suites import load_suite
    from diffalign.toy.generators import ToyRenderGenerator

    suite = load_suite("toyworld")
    right, wrong = ToyRenderGenerator(size=16), ToyRenderGenerator(size=16, corrupt_p=1.0)
    runs = [ModelRun("right", right.generate), ModelRun("wrong", wrong.generate)]
    summary = run_eval(suite, runs, build_scorers(["toy_correct"]), tmp_path / "rw", limit=2, progress=False,
                       report=False)  # fmt: skip
    t = summary["comparison"]["mcnemar"]["toy_correct"]
    n = 2 * suite.images_per_prompt  # limit=2 prompts
    assert t["n"] == n and t["a_only"] >= n - 4 and t["b_only"] == 0 and t["p_value"] < 1e-6
    runs = [ModelRun("right", right.generate), ModelRun("right2", right.generate)]
    summary = run_eval(suite, runs, build_scorers(["toy_correct"]), tmp_path / "rr", limit=2, progress=False,
                       report=False)  # fmt: skip
    assert summary["comparison"]["mcnemar"]["toy_correct"]["p_value"] == 1.0
