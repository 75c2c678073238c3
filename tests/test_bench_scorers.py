"""scripts/bench_scorers.py, the command docs/rewards.md gives, runs: options a scorer's factory does not
take (the toy rewards take no dtype) are not passed to it."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_scorers.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_scorers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_runs_a_model_scorer_and_a_toy_scorer(monkeypatch, capsys):
    bench = _load()
    argv = ["bench_scorers.py", "--n", "2", "--size", "32", "--batch-size", "2", "--device", "cpu",
            "--scorers", "clip-s", "toy_correct", "--prompt", "a red circle"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| clip-s") or line.startswith("| toy_correct")]
    assert len(rows) == 2 and "speed-up" in out


def test_default_run_covers_every_model_scorer_and_skips_the_toy_rewards():
    bench = _load()
    from diffalign.rewards import available_scorers

    names = bench.default_scorers()
    assert {"pickscore", "hpsv2", "hpsv2.1", "imagereward", "clipscore", "clip-s"} <= set(names)
    assert not [n for n in names if n.startswith("toy")]
    assert set(available_scorers()) - set(names) == {n for n in available_scorers() if n.startswith("toy")}
    assert bench.scorer_kwargs("toy_correct", device="cpu", dtype="fp32", tiny=True) == {"device": "cpu"}
    assert bench.scorer_kwargs("clip-s", dtype="fp32", tiny=True) == {"dtype": "fp32", "tiny": True}
