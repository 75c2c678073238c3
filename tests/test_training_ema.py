"""train.ema_decay: an exponential moving average of the trainable weights, used by the export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_states_close, crash_then_resume, run, tiny_config, trainable_state

FULL = dict(lora=None, optim={"lr": 1e-3})


def _exported_unet(cfg) -> dict[str, torch.Tensor]:
    return load_file(str(Path(cfg["output_dir"]) / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_ema_export_follows_the_recurrence(tmp_path, monkeypatch):
    decay = 0.9
    cfg = tiny_config(tmp_path / "ema", **FULL, train={"max_steps": 3, "ema_decay": decay})
    from diffalign.training.trainer import Trainer

    snapshots = []
    original = Trainer._optimizer_step

    def recording(self, batches):
        out = original(self, batches)
        snapshots.append(trainable_state(self))
        return out

    monkeypatch.setattr(Trainer, "_optimizer_step", recording)
    trainer = run(cfg)
    assert len(snapshots) == 3
    # diffusers EMAModel: the first update copies, then decay_n = min(decay, (1 + n) / (10 + n)), n = 1, 2
    expected = dict(snapshots[0])
    for n, snap in enumerate(snapshots[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))
        expected = {k: d * expected[k] + (1 - d) * snap[k] for k in expected}
    exported = _exported_unet(cfg)
    assert_states_close({k: exported[k] for k in expected}, expected, atol=1e-6, rtol=1e-5)
    # the raw weights are the last step's, and differ from the average (so the check above can fail)
    raw = trainable_state(trainer)
    assert_states_close(raw, snapshots[-1], atol=0, rtol=0)
    with pytest.raises(AssertionError):
        assert_states_close({k: exported[k] for k in raw}, raw, atol=1e-6, rtol=1e-5)


def test_ema_off_exports_the_raw_weights(tmp_path):
    cfg = tiny_config(tmp_path / "raw", **FULL, train={"max_steps": 2})
    trainer = run(cfg)
    assert trainer.ema is None
    raw = trainable_state(trainer)
    exported = _exported_unet(cfg)
    assert_states_close({k: exported[k] for k in raw}, raw, atol=0, rtol=0)


def test_ema_state_survives_a_resume(tmp_path, monkeypatch):
    common = dict(**FULL, train={"max_steps": 4, "ema_decay": 0.8}, checkpoint={"every": 2})
    full_cfg = tiny_config(tmp_path / "full", **common)
    run(full_cfg)
    crash_cfg = tiny_config(tmp_path / "crash", **common)
    resumed = crash_then_resume(crash_cfg, 3, monkeypatch)
    assert resumed.ema.optimization_step == 4
    a, b = _exported_unet(full_cfg), _exported_unet(crash_cfg)
    assert_states_close(a, b, atol=1e-7, rtol=1e-6)
