"""Small shared helpers for the training tests."""

from __future__ import annotations

import torch


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; tests that build several Accelerators reset them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def tiny_config(tmp_path, **sections) -> dict:
    cfg = {
        "model": {"pretrained": "tiny:sd"},
        "data": {"format": "pickapic", "source": "builtin:pickapic", "resolution": 32, "builtin_rows": 24},
        "objective": {"name": "dpo"},
        "lora": {"rank": 4},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 2},
        "logging": {"every": 1, "tensorboard": False},
        "checkpoint": {"every": 100},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def run(cfg_dict: dict, resume: str | None = None):
    """Train in-process; returns the trainer (weights, counters, output dir)."""
    from diffalign.config import load_config
    from diffalign.training.trainer import Trainer

    reset_accelerate()
    trainer = Trainer(load_config(cfg_dict), resume=resume)
    trainer.train()
    return trainer


def trainable_state(trainer) -> dict[str, torch.Tensor]:
    unet = trainer.acc.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def assert_states_close(a: dict, b: dict, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(
            a[k], b[k], atol=atol, rtol=rtol,
            msg=lambda m, k=k: f"parameter {k} differs: {m}",
        )


def crash_then_resume(cfg_dict: dict, crash_at_step: int, monkeypatch):
    """Train until `crash_at_step` optimizer steps are done, die there (as a kill would), then resume from
    the latest checkpoint and train to the end. Returns the resumed trainer."""
    import pytest

    from diffalign.training.trainer import Trainer

    original = Trainer._optimizer_step

    def crashing(self, batches):
        if self.step == crash_at_step:
            raise KeyboardInterrupt("simulated crash")
        return original(self, batches)

    monkeypatch.setattr(Trainer, "_optimizer_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_dict)
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    return run(cfg_dict, resume="latest")
