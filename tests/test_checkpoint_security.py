"""What diffalign writes into a checkpoint loads back without unpickling code: its own state is safetensors
and JSON, and accelerate's torch files are read with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import run, tiny_config


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_ema_checkpoint_is_safetensors_and_json_and_resumes_with_weights_only(tmp_path, monkeypatch):
    common = dict(train={"max_steps": 2, "ema_decay": 0.9}, checkpoint={"every": 1})
    cfg = tiny_config(tmp_path, **common)
    run(cfg)
    latest = Path(cfg["output_dir"]) / "checkpoints" / "step-0000002"
    names = sorted(p.name for p in latest.iterdir())
    assert "ema.safetensors" in names and "ema.json" in names
    assert not [n for n in names if n.startswith("custom_checkpoint")], names

    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    resumed = run(tiny_config(tmp_path, **{**common, "train": {**common["train"], "max_steps": 3}}), resume="latest")
    assert resumed.step == 3 and resumed.ema.optimization_step == 3
    assert calls and all(w is True for w in calls), calls  # optimizer, scheduler, RNG states


def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path):
    cfg = tiny_config(tmp_path, train={"max_steps": 1, "ema_decay": 0.9}, checkpoint={"every": 1})
    run(cfg)
    ckpt = Path(cfg["output_dir"]) / "checkpoints" / "step-0000001"
    marker = tmp_path / "code-ran"
    torch.save({"shadow_params": [], "x": _Payload(marker)}, ckpt / "custom_checkpoint_0.pkl")
    with pytest.raises(Exception, match="custom_checkpoint_0.pkl"):
        run(tiny_config(tmp_path, train={"max_steps": 2, "ema_decay": 0.9}), resume="latest")
    assert not marker.exists()
