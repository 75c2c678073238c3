"""Resume and checkpoint safety: a resumed run equals an uninterrupted one for every setting (LoRA dropout
included); a new run never mixes with another run's checkpoints; weights that blew up are never saved."""

from __future__ import annotations

from tests.helpers import assert_states_close, crash_then_resume, run, tiny_config, trainable_state


def test_resume_with_lora_dropout_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    common = dict(lora={"rank": 4, "dropout": 0.3}, train={"max_steps": 3}, checkpoint={"every": 2})
    full = run(tiny_config(tmp_path / "full", **common))
    resumed = crash_then_resume(tiny_config(tmp_path / "crash", **common), 2, monkeypatch)
    assert_states_close(trainable_state(full), trainable_state(resumed), atol=1e-7, rtol=1e-6)
    # dropout does act: without it the weights differ (so the equality above can fail)
    plain = run(tiny_config(tmp_path / "plain", **{**common, "lora": {"rank": 4}}))
    diff = max((trainable_state(full)[k] - v).abs().max().item() for k, v in trainable_state(plain).items())
    assert diff > 1e-5


def test_a_new_run_in_a_folder_with_checkpoints_is_refused_unless_overwrite(tmp_path):
    from pathlib import Path

    import pytest

    from diffalign.errors import UserError

    common = dict(train={"max_steps": 2}, checkpoint={"every": 2})
    cfg = tiny_config(tmp_path, **common)
    run(cfg)
    out = Path(cfg["output_dir"])
    with pytest.raises(UserError) as err:
        run(tiny_config(tmp_path, train={"max_steps": 1}, checkpoint={"every": 1}))
    msg = str(err.value)
    assert "\n" not in msg and str(out) in msg and "--resume latest" in msg and "--overwrite" in msg
    assert (out / "checkpoints" / "step-0000002").is_dir()  # nothing was touched

    from diffalign.config import load_config
    from diffalign.training.trainer import Trainer

    Trainer(load_config(tiny_config(tmp_path, train={"max_steps": 1}, checkpoint={"every": 1})), overwrite=True).train()
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000001"]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    from diffalign.training import checkpoint as ckpt

    root = ckpt.checkpoint_root(tmp_path)
    for step in (5, 6, 500):  # a newer run's checkpoints (500) and older ones of this history
        (root / f"step-{step:07d}").mkdir(parents=True)
    tmp = root / "step-0000007.tmp"
    tmp.mkdir()
    ckpt.finalize(tmp, root / "step-0000007", {"step": 7}, keep=2)
    latest = root / (root / "latest").read_text()
    assert latest.name == "step-0000007" and latest.is_dir()
    # keep=2 keeps the new one and the newest before it; the one after it in name order is not ours to prune
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000006", "step-0000007", "step-0000500"]


def test_an_update_that_blows_the_weights_up_stops_the_run_before_it_is_checkpointed(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import pytest
    import torch
    from safetensors.torch import load_file

    from diffalign.training.trainer import NonFiniteLossError

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def exploding(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the loss of step 2 was finite; its update is not
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(1e30)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", exploding)
    cfg = tiny_config(tmp_path, train={"max_steps": 3}, checkpoint={"every": 1})
    with pytest.raises(NonFiniteLossError) as err:
        run(cfg)
    msg = str(err.value)
    assert "step 2" in msg and "max_weight_abs" in msg and "step-0000001" in msg and "\n" not in msg
    root = Path(cfg["output_dir"]) / "checkpoints"
    assert (root / "latest").read_text() == "step-0000001" and not (root / "step-0000002").exists()
    saved = load_file(str(root / "step-0000001" / "lora_0.safetensors"))
    assert max(v.abs().max().item() for v in saved.values()) < 1e3
    assert json.loads((root / "step-0000001" / "trainer_state.json").read_text())["step"] == 1
