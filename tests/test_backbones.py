"""Backbones: loading, family detection by the pipeline class, targets, shared noise, SDXL micro-conditioning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffalign.backbones import load_backbone
from diffalign.backbones.tiny import save_tiny_pipeline
from diffalign.training.experience import mse_energy

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_local_folder_loads_with_the_detected_family(tmp_path, family):
    path = save_tiny_pipeline(tmp_path / family, family)
    bb = load_backbone(str(path))
    assert bb.family == family
    tiny = load_backbone(f"tiny:{family}")
    assert bb.fingerprint() == tiny.fingerprint()  # same weights whether built in code or read from disk


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_backbone(str(tmp_path / "nope"))


def test_family_comes_from_the_pipeline_class_not_the_folder_contents(tmp_path):
    """An SD3 or FLUX folder also has text_encoder_2; only model_index.json's _class_name decides."""
    import json

    path = save_tiny_pipeline(tmp_path / "x", "sd")
    index = json.loads((path / "model_index.json").read_text())
    index["text_encoder_2"] = index["text_encoder"]
    (path / "model_index.json").write_text(json.dumps(index))
    assert load_backbone(str(path)).family == "sd"
    index["_class_name"] = "SomeOtherPipeline"
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="SomeOtherPipeline.*known pipeline classes.*StableDiffusionXLPipeline"):
        load_backbone(str(path))
    assert load_backbone(str(path), family="sd").family == "sd"  # model.family forces one
    with pytest.raises(ValueError, match="tiny:sd, tiny:sdxl"):
        load_backbone("tiny:nope")


def test_v_prediction_target_is_the_velocity(tmp_path):
    bb = load_backbone(str(save_tiny_pipeline(tmp_path / "v", "sd", prediction_type="v_prediction")))
    assert bb.prediction_type == "v_prediction"
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 999])
    a = bb.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * x0  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    torch.testing.assert_close(bb.process.target(x0, noise, t), expected)
    torch.testing.assert_close(bb.process.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    eps = load_backbone("tiny:sd")
    assert torch.equal(eps.process.target(x0, noise, t), noise)


def test_per_candidate_noise_gives_each_candidate_its_own_draw():
    from diffalign.training.experience import item_noise

    bb = load_backbone("tiny:sd")
    t, shared, eps = item_noise(bb.process, 0, [5, 6], 3, (4, 8, 8))
    t2, own, eps2 = item_noise(bb.process, 0, [5, 6], 3, (4, 8, 8), per_candidate=True)
    assert own.shape == (2, 3, 4, 8, 8) and torch.equal(t, t2) and torch.equal(eps, eps2)
    assert torch.equal(own[:, 0], shared)  # candidate 0 keeps the shared draw; the stream is unchanged
    assert not torch.equal(own[:, 1], own[:, 0]) and not torch.equal(own[:, 2], own[:, 1])
    x0 = torch.randn(2, 1, 4, 8, 8).expand(2, 3, 4, 8, 8).contiguous()
    cond = bb.encode_text(["a red circle"] * 6)
    e = mse_energy(bb, bb.denoiser, x0, own, t, cond)
    assert not torch.allclose(e[:, 1], e[:, 0])  # identical images, different noise: different energies


def test_candidates_share_noise_and_timestep():
    bb = load_backbone("tiny:sd")
    x = torch.randn(2, 1, 4, 8, 8)
    x0 = x.expand(2, 3, 4, 8, 8).contiguous()  # three identical candidates per item
    cond = bb.encode_text(["a red circle"] * 6)
    e = mse_energy(bb, bb.denoiser, x0, torch.randn(2, 4, 8, 8), torch.tensor([100, 700]), cond)
    assert e.shape == (2, 3)
    torch.testing.assert_close(e[:, 1:], e[:, :1].expand(2, 2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(e[0], e[1])


def test_sdxl_micro_conditioning_reaches_the_unet_with_true_sizes_and_crops():
    bb = load_backbone("tiny:sdxl")
    seen = {}

    def hook(module, args, kwargs):
        seen["time_ids"] = kwargs["added_cond_kwargs"]["time_ids"].clone()
        seen["text_embeds"] = kwargs["added_cond_kwargs"]["text_embeds"].shape

    bb.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    cond = bb.encode_text(["a", "b"])
    assert cond["prompt_embeds"].shape[-1] == 64  # both encoders' penultimate states concatenated (32 + 32)
    cond |= bb.micro_conditioning(torch.tensor([[768, 512], [768, 512]]), torch.tensor([[0, 17], [0, 17]]), 32)
    mse_energy(bb, bb.denoiser, torch.randn(1, 2, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.tensor([5]), cond)
    assert seen["time_ids"].tolist() == [[768, 512, 0, 17, 32, 32]] * 2
    assert seen["text_embeds"] == (2, 32)  # pooled projection of encoder 2


def test_fingerprint_is_stable_across_processes():
    """A cache built in one process must be accepted by training in another (hash seeds differ)."""
    code = "from diffalign.backbones import load_backbone; print(load_backbone('tiny:sdxl').fingerprint())"
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.add(proc.stdout.strip().splitlines()[-1])
    assert len(outs) == 1


@pytest.mark.parametrize("family,scheduler", [("sd", "DDPMScheduler"), ("sdxl", "EulerDiscreteScheduler")])
def test_full_export_keeps_the_base_models_own_scheduler(tmp_path, family, scheduler):
    """Training draws DDPM noise whatever the folder's scheduler, but the exported pipeline (and the one
    validation starts from) carries the base model's own: DDPM stays DDPM, SDXL's Euler stays Euler."""
    import json

    import diffusers

    from diffalign.backbones.tiny import tiny_pipeline

    pipe = tiny_pipeline(family)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    bb = load_backbone(str(tmp_path / "base"))
    assert type(bb.noise_scheduler).__name__ == "DDPMScheduler"  # the training noise process
    assert type(bb.pipeline().scheduler).__name__ == scheduler
    bb.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == scheduler


def test_config_knows_every_registered_family():
    import typing

    from diffalign.backbones import families
    from diffalign.config import ModelConfig

    assert set(typing.get_args(ModelConfig.model_fields["family"].annotation)) == {"auto", *families()}
