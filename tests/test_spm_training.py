"""`diffalign train-spm`: PickScore's soft-label loss and the PickScore relabelling against independent
computations, DeepSpeed's warm-up/decay schedule, one x0-hat step with a shared timestep and noise per pair,
a tiny run that exports a loadable SPM and resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spm_config(tmp_path, **sections) -> dict:
    cfg = {
        "model": {"pretrained": "tiny:sd"},
        "data": {"format": "pickapic", "source": "builtin:pickapic", "resolution": 16, "builtin_rows": 24,
                 "drop_ties": False},
        "spm": {"tiny": True},
        "optim": {"lr": 1e-3, "weight_decay": 0.3, "scheduler": "warmup_log_decay", "warmup_steps": 2,
                  "decay_steps": 8},
        "train": {"batch_size": 2, "max_steps": 4},
        "logging": {"every": 1, "tensorboard": False},
        "checkpoint": {"every": 2},
        "output_dir": str(tmp_path / "spm"),
    }  # fmt: skip
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def train_spm(cfg: dict, resume: str | None = None):
    from diffalign.config import load_spm_config
    from diffalign.training.spm import SPMTrainer

    trainer = SPMTrainer(load_spm_config(cfg), resume=resume)
    trainer.train()
    return trainer


def _state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.acc.unwrap_model(trainer.unet).state_dict().items()}


@pytest.mark.parametrize(("recipe", "lr", "steps", "relabel"), [("spm_sd15", 3e-6, 8000, "none"),
                                                             ("spm_sdxl", 1e-6, 7000, "pickscore")])
def test_spm_recipes_validate_and_carry_the_reference_settings(recipe, lr, steps, relabel):
    import yaml

    from diffalign.config import dump_config, load_spm_config

    cfg = load_spm_config(Path(__file__).resolve().parents[1] / "configs" / f"{recipe}.yaml")
    assert load_spm_config(yaml.safe_load(dump_config(cfg))) == cfg
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.scheduler, o.warmup_steps, o.decay_steps) == (lr, 0.3, "warmup_log_decay", 500,
                                                                                  steps * 4)
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.mixed_precision) == (steps, 16, "bf16")
    assert (cfg.spm.guidance, cfg.spm.relabel, cfg.spm.tie_threshold, cfg.data.drop_ties) == (5.0, relabel, 0.1, False)


def test_preference_cross_entropy_matches_pickscores_criterion():
    from diffalign.training.spm import preference_cross_entropy

    scores = torch.tensor([[21.0, 19.5], [18.0, 20.0], [20.0, 20.3], [5.0, 5.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    loss = preference_cross_entropy(scores, labels)
    expected = 0.0
    for (s0, s1), (l0, l1) in zip(scores.tolist(), labels.tolist()):
        z = math.log(math.exp(s0) + math.exp(s1))
        expected += -(l0 * (s0 - z) + l1 * (s1 - z)) + (math.log(0.5) if l0 == l1 else 0.0)
    assert loss.item() == pytest.approx(expected / 4, rel=1e-6)
    # a tie fitted perfectly costs nothing; its gradient pulls the two scores together
    loss.backward()
    assert scores.grad[3].abs().max() == 0 and scores.grad[2, 0] < 0 < scores.grad[2, 1]


def test_pickscore_relabelling_thresholds():
    from diffalign.training.spm import pickscore_labels

    gap = lambda d: math.tanh(d / 2)  # noqa: E731  the softmax gap of two scores d apart
    scores = torch.tensor([[20.0, 19.0], [19.0, 20.0], [20.0, 19.9], [20.0, 20.0 - 0.21]])
    labels = pickscore_labels(scores, 0.1)
    assert gap(0.1) < 0.1 < gap(0.21)
    assert labels.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]


def test_warmup_log_decay_is_deepspeeds_warmup_decay_lr():
    """DeepSpeed WarmupDecayLR (min lr 0, log warm-up): the lr of optimizer step k is that of its iteration
    k - 2 (-1 before the first step(): lr 0), gamma = log(i + 1) / log(W) then (T - i) / (T - W)."""
    from diffalign.training.trainer import warmup_log_decay

    warmup, total, lr = 500, 32000, 3e-6
    for processes in (1, 4):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=lr)
        sched = warmup_log_decay(opt, warmup, total, processes)
        seen = {}
        for k in range(1, 601):  # the lr each optimizer step runs at, stepping as accelerate does
            seen[k] = opt.param_groups[0]["lr"]
            opt.step()
            for _ in range(processes):
                sched.step()
        for k in (4000, 8000):  # later steps from the schedule's own factor
            seen[k] = lr * sched.lr_lambdas[0]((k - 1) * processes)
        for k in (1, 2, 3, 100, 501, 502, 503, 600, 4000, 8000):
            i = k - 2
            if i < 0:
                gamma = 0.0
            elif i < warmup:
                gamma = math.log(i + 1) / math.log(warmup)
            else:
                gamma = max(0.0, (total - i) / (total - warmup))
            assert seen[k] == pytest.approx(lr * gamma, rel=1e-12, abs=1e-20), (processes, k)
    assert seen[8000] == pytest.approx(lr * (32000 - 7998) / 31500)  # 76% of the peak when training stops


def test_each_pair_shares_its_timestep_and_noise_in_one_guided_step(tmp_path, monkeypatch):
    from diffalign.config import load_spm_config
    from diffalign.training.spm import SPMTrainer

    trainer = SPMTrainer(load_spm_config(spm_config(tmp_path)))
    seen = {}
    process = trainer.backbone.process
    real_add = process.add_noise

    def add_noise(x0, noise, t):
        seen["x0"], seen["noise"], seen["t"] = x0, noise, t
        return real_add(x0, noise, t)

    import diffalign.sampling.loop as loop

    real_guided = loop.guided_output

    def guided(bb, model, x, t, cond, uncond, guidance):
        seen["guidance"], seen["uncond"], seen["model"] = guidance, uncond, model
        return real_guided(bb, model, x, t, cond, uncond, guidance)

    monkeypatch.setattr(process, "add_noise", add_noise)
    monkeypatch.setattr(loop, "guided_output", guided)
    batch = next(iter(trainer._loader()))
    pixels, t = trainer.x0_hat_pixels(trainer._to_device(batch), micro=0)
    B = len(t)
    assert pixels.shape == (B, 2, 3, 64, 64)  # the tiny CLIP's 64 px
    assert torch.equal(seen["t"], t.repeat_interleave(2))  # one t per pair
    noise = seen["noise"].reshape(B, 2, -1)
    assert torch.equal(noise[:, 0], noise[:, 1])  # the same noise for both images
    assert not torch.equal(seen["x0"].reshape(B, 2, -1)[:, 0], seen["x0"].reshape(B, 2, -1)[:, 1])
    assert seen["guidance"] == 5.0 and seen["uncond"] is not None and seen["model"] is trainer.backbone.denoiser
    # a function of (seed, stream position) only
    again, t2 = trainer.x0_hat_pixels(trainer._to_device(batch), micro=0)
    assert torch.equal(again, pixels) and torch.equal(t2, t)


def test_tiny_spm_trains_exports_a_loadable_spm_and_resumes_exactly(tmp_path, monkeypatch):
    from diffalign.rewards import create_scorer
    from diffalign.rewards.spm import build_spm_model
    from tests.helpers import crash_then_resume

    full = train_spm(spm_config(tmp_path / "full"))
    start, _, _ = build_spm_model(tiny=True)
    trained = full.acc.unwrap_model(full.unet)
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), trained.state_dict().values()))
    final = Path(full.out) / "final"
    scorer = create_scorer("spm", tiny=True, device="cpu", checkpoint=str(final))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = create_scorer("spm", tiny=True, device="cpu")
    expected.model.load_state_dict(trained.state_dict())
    assert torch.equal(scorer.score(x, ["a red circle", "a cat"], 400), expected.score(x, ["a red circle", "a cat"], 400))

    resumed = crash_then_resume(spm_config(tmp_path / "part"), 3, monkeypatch, runner=train_spm)
    a, b = _state(full), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"format": "prompts", "source": "builtin:prompts"}}, "train-spm learns from preference pairs"),
        ({"spm": {"relabel": "pickscore"}, "cache": {"enabled": True}}, "spm.relabel=pickscore scores the pairs"),
    ],
)
def test_spm_config_refuses_what_it_cannot_learn_from(tmp_path, change, message):
    from diffalign.config import ConfigError, load_spm_config

    with pytest.raises(ConfigError, match=message):
        load_spm_config(spm_config(tmp_path, **change))


def test_relabelled_run_reads_pickscore_labels(tmp_path, monkeypatch):
    import diffalign.training.spm as spm_mod

    seen = []
    real = spm_mod.pickscore_labels

    def spy(scores, threshold):
        out = real(scores, threshold)
        seen.append((scores, threshold, out))
        return out

    monkeypatch.setattr(spm_mod, "pickscore_labels", spy)
    train_spm(spm_config(tmp_path, spm={"relabel": "pickscore"}, train={"max_steps": 1}))
    assert len(seen) == 1 and seen[0][1] == 0.1 and seen[0][0].shape == (2, 2)


def test_spm_training_from_the_latent_cache_equals_training_from_pixels(tmp_path):
    from diffalign.config import load_spm_config
    from diffalign.training.cache import build_cache
    from tests.helpers import logged

    plain = spm_config(tmp_path / "plain", train={"max_steps": 2})
    cached = spm_config(tmp_path / "cached", train={"max_steps": 2}, cache={"enabled": True, "dtype": "fp32"})
    train_spm(plain)
    build_cache(load_spm_config(cached), device="cpu")
    trainer = train_spm(cached)
    assert trainer.dataset.__class__.__name__ == "CachedPreferenceDataset"
    for a, b in zip(logged(plain), logged(cached), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["t_mean"] == a["t_mean"]
