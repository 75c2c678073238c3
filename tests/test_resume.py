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
