"""Smoke test of the whole `diffalign demo --quick` in a subprocess (every stage, tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFALIGN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "diffalign", "demo", "--quick", "--out", str(out), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "it/s" not in proc.stderr and "train:" not in proc.stderr, proc.stderr[-2000:]  # --no-progress: no bars
    assert "kept in float32" not in proc.stderr  # no spurious diffusers warning from no-op dtype casts
    for f in ("results.md", "results.json", "index.html", "grid.png", "bars.png", "eval/report.html",
              "base/model_index.json", "synpic/data/shard-00000.parquet"):  # fmt: skip
        assert (out / f).is_file(), f
    from diffalign.toy.recipes import METHODS

    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["base", *METHODS]
    for name in METHODS:
        assert (out / "configs" / f"toy_{name}.yaml").is_file()
        assert (out / "train" / name / "final" / "model_index.json").is_file()
        m = results["models"][name]
        assert m["mcnemar"]["n"] == results["prompts"] * results["images_per_prompt"] == 36
    # the drift is logged for the methods with a reference model
    assert results["models"]["dpo"]["train"]["drift_w"] is not None
    assert results["models"]["mapo"]["train"]["drift_w"] is None
    table = (out / "results.md").read_text()
    assert "McNemar p vs base" in table and "DPO + winner term" in table
    assert results["quick"] is True and "--quick` smoke run" in table  # the page says it is a smoke run
    assert "--quick` smoke run" in (out / "index.html").read_text()
    assert "winner_weight: 500" in (out / "index.html").read_text()
    # the base was cached: a second run (one method) finds it
    proc = subprocess.run([sys.executable, "-m", "diffalign", "demo", "--quick", "--out", str(out), "--no-progress",
                           "--methods", "mapo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "toy base: cached at" in proc.stdout
    assert list(json.loads((out / "results.json").read_text())["models"]) == ["base", "mapo"]
    bad = subprocess.run([sys.executable, "-m", "diffalign", "demo", "--quick", "--methods", "ppo"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "unknown method" in bad.stderr


def test_only_a_quick_run_says_it_is_one():
    from diffalign.toy.demo import CORRECT, results_markdown

    results = {"models": {"base": {"label": "base", "scores": {CORRECT: {"mean": 0.5, "sem": 0.1}}}},
               "prompts": 2, "images_per_prompt": 1}  # fmt: skip
    assert "smoke run" in results_markdown({**results, "quick": True})
    assert "smoke run" not in results_markdown({**results, "quick": False})
