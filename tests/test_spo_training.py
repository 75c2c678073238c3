"""SPO through the trainer: rollouts by the policy, several optimizer steps per rollout, exact resume with the
kept pairs in the checkpoint, 2 processes = 1 process with double batch, and the config's refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    assert_states_close,
    crash_then_resume,
    launch,
    logged,
    run,
    tiny_config,
    trainable_state,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: 6 DDIM steps, branching from step 2 with K = 2: steps 2, 3, 4 give pairs (the tiny scheduler's last step is
#: deterministic); threshold 0 keeps every pair whose candidates score differently
SPO = dict(
    data={"format": "prompts", "source": "builtin:prompts", "resolution": 16, "builtin_rows": 24},
    objective={"name": "spo"},
    experience={"sampler": {"steps": 6, "guidance": 3.0, "eta": 1.0},
                "rollout": {"scorer": "spm", "scorer_args": {"tiny": True}, "candidates": 2, "divert_start_step": 2,
                            "threshold": 0.0, "pairs_per_step": 2}},
)  # fmt: skip


def spo_config(tmp_path, **sections):
    import copy

    cfg = tiny_config(tmp_path, **copy.deepcopy(SPO))
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("recipe", "facts"),
    [  # RockeyCoss/SPO configs/basic_config.py and the two experiment configs over it
        ("spo_sd15", dict(candidates=4, threshold=0.3, inner_steps=0, lr=6e-5, rank=4, batch=10, pairs=10, accum=1)),
        ("spo_sdxl", dict(candidates=2, threshold=0.4, inner_steps=3, lr=1e-5, rank=64, batch=2, pairs=2, accum=2)),
    ],
)
def test_spo_recipes_carry_the_reference_settings(recipe, facts):
    from diffalign.config import load_config

    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    s, r = cfg.experience.sampler, cfg.experience.rollout
    assert (s.steps, s.eta, s.guidance, r.divert_start_step) == (20, 1.0, 5.0, 4)
    assert (r.candidates, r.threshold, r.inner_steps, r.pairs_per_step) == (facts["candidates"], facts["threshold"],
                                                                            facts["inner_steps"], facts["pairs"])
    assert cfg.objective.params() == {"beta": 10.0, "clip": 0.1}
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm, cfg.optim.scheduler) == (
        facts["lr"], 1e-4, 1.0, "constant")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init) == (facts["rank"], facts["rank"], "gaussian")
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.max_epochs, cfg.train.seed) == (
        facts["batch"], facts["accum"], 10, 42)


def test_tiny_spo_recipe_trains_several_steps_per_rollout_and_logs(tmp_path):
    from diffalign.config import load_config
    from diffalign.training.trainer import Trainer

    rollouts = []
    real = Trainer.compute_loss

    def spy(self, batch, micro):
        if micro is not None:
            rollouts.append((micro, list(batch["prompts"])))
        return real(self, batch, micro)

    out = tmp_path / "tiny_spo"
    cfg = load_config(ROOT / "configs" / "tiny_spo.yaml", [f"output_dir={out}", "logging.tensorboard=false"])
    import unittest.mock

    with unittest.mock.patch.object(Trainer, "compute_loss", spy):
        trainer = Trainer(cfg)
        trainer.train()
    assert trainer.source.kind == "rollout"
    rows = logged({"output_dir": str(out)})
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the first step
    assert rows[0]["ratio_win"] == 1.0 and rows[0]["ratio_lose"] == 1.0
    assert {"pairs", "kept_fraction", "preference_score_mean", "preference_score_std", "clipped"} <= set(rows[0])
    # 2 prompts x 3 pairs = 6 pairs per rollout, 2 per step: 3 steps per rollout, so 2 rollouts for 6 steps
    assert [m for m, _ in rollouts] == [0, 1] and rows[0]["rollout_pairs"] == 6.0
    assert all(len(p) == 2 and all(isinstance(x, str) and x for x in p) for _, p in rollouts)
    lora = trainable_state(trainer)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # the adapters moved
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_spo_resume_after_a_crash_mid_rollout_is_exact(tmp_path, monkeypatch):
    # LoRA dropout draws from torch's global RNG, keyed per micro-step; steps 2-3 train on pending pairs
    common = dict(lora={"rank": 4, "dropout": 0.3}, train={"batch_size": 2, "max_steps": 6}, checkpoint={"every": 2})
    full = run(spo_config(tmp_path / "full", **common))
    part = spo_config(tmp_path / "part", **common)
    resumed = crash_then_resume(part, 3, monkeypatch)
    # the checkpoint of step 2 holds the rollout's third mini-batch, not yet trained on
    ckpt = Path(part["output_dir"]) / "checkpoints" / "step-0000002"
    assert (ckpt / "rollout.safetensors").is_file()
    assert [r["step"] for r in logged(part)] == [1, 2, 3, 3, 4, 5, 6]
    assert_states_close(trainable_state(full), trainable_state(resumed), atol=0, rtol=0)


def test_spo_two_processes_match_one_with_double_batch(tmp_path):
    # see test_experience.py for the larger adam eps
    one = spo_config(tmp_path / "one", optim={"lr": 1e-3, "adam_eps": 1e-4}, train={"batch_size": 2, "max_steps": 3})
    two = spo_config(tmp_path / "two", optim={"lr": 1e-3, "adam_eps": 1e-4}, train={"batch_size": 1, "max_steps": 3})
    one["experience"]["rollout"]["pairs_per_step"] = 2
    two["experience"]["rollout"]["pairs_per_step"] = 1
    launch(one, 1, tmp_path)
    launch(two, 2, tmp_path)
    a = load_file(str(Path(one["output_dir"]) / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(Path(two["output_dir"]) / "final" / "pytorch_lora_weights.safetensors"))
    assert_states_close(a, b, atol=1e-6, rtol=0)
    for r1, r2 in zip(logged(one), logged(two)):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5) and r1["rollout_pairs"] == r2["rollout_pairs"]


def test_uneven_last_mini_batch_keeps_processes_in_lockstep(tmp_path):
    """3 pairs, 1 pair per process per step, 2 processes: the second mini-batch holds one pair; the process
    without one computes a stand-in with loss weight 0, and the weights make the mean gradient the mean over
    the mini-batch's pairs."""
    from diffalign.backbones import load_backbone
    from diffalign.training.experience import RolloutSource

    bb = load_backbone("tiny:sd")
    buffer = {"x": torch.randn(3, 2, 4, 8, 8), "prev": torch.randn(3, 2, 4, 8, 8), "step": torch.tensor([2, 3, 4]),
              "prompt": torch.tensor([0, 0, 1]), "order": torch.tensor([2, 0, 1]), "prompts": ["a cat", "a dog"],
              "next": 0, "metrics": {}}  # fmt: skip
    sources = [RolloutSource(bb, seed=0, resolution=16, device="cpu", dtype=torch.float32, global_batch=2,
                             local_batch=1, rank=r, world=2, scorer=None, steps=6, pairs_per_step=1)
               for r in range(2)]  # fmt: skip
    for s in sources:
        s.buffer = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in buffer.items()}
    first = [s.next({}, None, bb.denoiser) for s in sources]
    assert [e.weight for e in first] == [1.0, 1.0] and all(s.pending() for s in sources)
    second = [s.next({}, None, bb.denoiser) for s in sources]
    assert [e.weight for e in second] == [2.0, 0.0] and not any(s.pending() for s in sources)
    assert [e.metrics["pairs"] for e in second] == [1.0, 0.0]
    # process 0 trains on shuffled pair 1 (order[2]); the stand-in of process 1 is a real pair
    e = second[0].energy(bb.denoiser)
    assert e.shape == (1, 2) and torch.isfinite(e).all() and torch.isfinite(second[1].energy(bb.denoiser)).all()


def test_an_epoch_without_a_kept_pair_is_an_error_not_a_hang(tmp_path):
    cfg = spo_config(tmp_path, data={"max_items": 4}, train={"batch_size": 2, "max_steps": 2})
    cfg["experience"]["rollout"]["threshold"] = 0.99
    with pytest.raises(RuntimeError, match="no rollout kept a pair; lower experience.rollout.threshold"):
        run(cfg)


def test_max_epochs_stops_after_the_last_rollouts_pairs(tmp_path):
    cfg = spo_config(tmp_path, data={"max_items": 4}, train={"batch_size": 2, "max_steps": 1000, "max_epochs": 1})
    trainer = run(cfg)
    # 2 rollouts of 2 prompts, 6 pairs each, 2 pairs per step
    assert trainer.step == 6 and trainer.micro == 2
    assert (Path(cfg["output_dir"]) / "checkpoints" / "step-0000006").is_dir()
    assert (Path(cfg["output_dir"]) / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"format": "pickapic", "source": "builtin:pickapic"}},
         "experience.source=rollout (SPO) learns online from prompts, not from data.format='pickapic' images"),
        ({"experience": {"sampler": {"eta": 0.0}}}, "needs a stochastic sampler: set experience.sampler.eta > 0"),
        ({"experience": {"rollout": {"divert_start_step": 6}}}, "divert_start_step (6) must be below"),
        ({"objective": {"name": "dpo"}, "experience": {"source": "offline"}},
         "data.format=prompts holds prompts only; objective 'dpo'"),
    ],
)  # fmt: skip
def test_config_refuses_what_spo_cannot_learn_from(tmp_path, change, message):
    from diffalign.config import ConfigError, load_config

    cfg = spo_config(tmp_path)
    for key, value in change.items():
        if key == "experience":
            for sub, fields in value.items():
                cfg["experience"][sub] = {**cfg["experience"].get(sub, {}), **fields} if isinstance(fields, dict) \
                    else fields  # fmt: skip
        else:
            cfg[key] = value
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert message in str(err.value)


def test_spo_trains_a_flow_matching_backbone_with_the_sde_transition(tmp_path, monkeypatch):
    """SD3's path on a miniature flow model (a pixel UNet on FlowMatchEulerDiscreteScheduler): the rollout uses
    the Flow-GRPO SDE step with eta as its noise level, the loss its Gaussian transition log-probability."""
    from diffalign.backbones import registry
    from diffalign.backbones.base import Family
    from diffalign.training.experience import RolloutSource
    from tests.test_spo_resample import tiny_flow_backbone

    fam = Family("tinyflow", (), load=lambda *a, **k: tiny_flow_backbone(), builders={"tiny": lambda **k: tiny_flow_backbone()})
    monkeypatch.setitem(registry._FAMILIES, "tinyflow", fam)
    steps_seen = []
    real = RolloutSource._experience

    def spy(self, buf, idx, weight):
        steps_seen.extend(buf["step"][idx].tolist())
        return real(self, buf, idx, weight)

    monkeypatch.setattr(RolloutSource, "_experience", spy)
    cfg = spo_config(tmp_path, model={"pretrained": "tiny:tinyflow"}, train={"batch_size": 2, "max_steps": 3})
    cfg["data"]["resolution"] = 8
    cfg["experience"]["sampler"] = {"steps": 4, "guidance": 2.0, "eta": 0.7}
    cfg["experience"]["rollout"] |= {"divert_start_step": 1, "inner_steps": 1}
    trainer = run(cfg)
    assert trainer.backbone.process.kind == "flow"
    rows = logged(cfg)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert 3 in steps_seen  # the flow SDE's last step is stochastic: it gives pairs too
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_prompt_file_without_a_prompt_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import yaml

    from diffalign.backbones import registry
    from diffalign.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the prompts were read")

    monkeypatch.setattr(registry, "load_backbone", no_model)  # what the trainer's backbone_from_config calls

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    path = tmp_path / "spo.yaml"
    path.write_text(yaml.safe_dump(spo_config(tmp_path, data={"source": str(prompts)})))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"diffalign train: no usable prompts: prompts from {prompts}: 2 rows -> 0 prompts; skipped: empty_caption 2"]
