"""CI-sized end to end: base -> toy Syn-Pic -> alignment -> paired evaluation must show a real,
statistically clear improvement of at least one method over the base.

It trains the default base model from scratch (the test cache is empty), so it is the demo's cold path
with the methods the CI recipe keeps (diffalign.toy.recipes.CI); about 4 minutes on 2 CPU cores."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_alignment_beats_the_base_with_a_paired_test(tmp_path):
    from diffalign.toy.demo import run_demo
    from diffalign.toy.recipes import CI

    results = run_demo(CI, tmp_path / "demo", progress=False, log=lambda *a, **k: None)
    models = results["models"]
    n = results["prompts"] * results["images_per_prompt"]
    assert n >= 576  # 18 prompts x 32 held-out seeds
    base = models["base"]["scores"]["toy_correct"]["mean"]
    better = {}
    for name in CI.methods:
        m = models[name]
        assert m["mcnemar"]["n"] == n  # every image paired with the base's on the same prompt and seed
        if m["scores"]["toy_correct"]["mean"] > base and m["mcnemar"]["p_value"] < 0.01:
            better[name] = (m["scores"]["toy_correct"]["mean"], m["mcnemar"]["p_value"])
    assert better, {k: (v["scores"]["toy_correct"]["mean"], v.get("mcnemar")) for k, v in models.items()}
