"""The training invariants with the fused kernels on (Triton through its interpreter on CPU), and the
speed options train.compile and train.channels_last.

The Triton interpreter runs each kernel program in Python, so these runs use a micro pixel-space model
(one UNet level of 8 channels, 2 groups, no VAE, 8x8 images): three resnet blocks, six fused GroupNorms.
"""

from __future__ import annotations

import pytest
import torch

from diffalign.kernels import TOLERANCES
from tests.helpers import assert_states_close, logged, run, tiny_config, trainable_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from diffalign.backbones.sd import PixelBackbone
    from diffalign.backbones.tiny import tiny_scheduler, tiny_text_encoder, tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                up_block_types=("UpBlock2D",), mid_block_type=None, norm_num_groups=2,
                                cross_attention_dim=32)  # fmt: skip
    bb = PixelBackbone(unet, tiny_scheduler(), tiny_text_encoder(), tiny_tokenizer())
    return str(bb.save_pretrained(tmp_path_factory.mktemp("micro") / "model"))


def micro_run(cfg: dict):
    torch.manual_seed(0)  # LoRA's initial weights come from the global generator
    return run(cfg)


def micro_config(path, model, **train):
    # LoRA on the convolutions as well: the micro UNet has no attention
    return tiny_config(path, model={"pretrained": model},
                       data={"resolution": 8, "builtin_rows": 8},
                       lora={"rank": 2, "target_modules": ["conv1", "conv2", "time_emb_proj"]},
                       train={"batch_size": 4, "grad_accum": 1, "max_steps": 1} | train)  # fmt: skip


@pytest.mark.slow
def test_gradient_accumulation_equals_larger_batch_with_kernels_on(tmp_path, micro_model):
    from diffalign.kernels.blocks import FusedResnetBlock2D

    a = micro_run(micro_config(tmp_path / "a", micro_model, kernels="on"))
    assert "kernels on (Triton interpreter on CPU" in a.summary()
    assert sum(isinstance(m, FusedResnetBlock2D) for m in a.backbone.denoiser.modules()) == 3
    assert a.source.fused_energy
    b = micro_run(micro_config(tmp_path / "b", micro_model, kernels="on", batch_size=1, grad_accum=4))
    assert_states_close(trainable_state(a), trainable_state(b), atol=1e-6, rtol=0)
    c = micro_run(micro_config(tmp_path / "c", micro_model, kernels="on", seed=1))  # the comparison can fail
    with pytest.raises(AssertionError):
        assert_states_close(trainable_state(a), trainable_state(c), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_kernels_channels_last_and_checkpointing_give_the_losses_of_plain_torch(tmp_path, micro_model, monkeypatch):
    from diffalign.kernels import _triton_energy, _triton_group_norm_silu

    layouts = []  # the memory layout of every input the GroupNorm+SiLU kernel saw
    gn_forward, energy_forward = _triton_group_norm_silu.forward, _triton_energy.forward
    monkeypatch.setattr(_triton_group_norm_silu, "forward", lambda x, *a: layouts.append(x.is_contiguous()) or gn_forward(x, *a))
    energies = []  # the batch size of every fused energy
    monkeypatch.setattr(_triton_energy, "forward", lambda p, t: energies.append(len(p)) or energy_forward(p, t))
    runs = {}
    for name, train in {"off": {"kernels": "off"}, "on": {"kernels": "on"},
                        "on+channels_last": {"kernels": "on", "channels_last": True,
                                             "gradient_checkpointing": True}}.items():  # fmt: skip
        cfg = micro_config(tmp_path / name.replace("+", "_"), micro_model, max_steps=2, **train)
        cfg["objective"]["beta"] = 50  # Diffusion-DPO's 5000 turns a 1e-7 energy difference into 2.5e-4
        layouts.clear()
        energies.clear()
        trainer = micro_run(cfg)
        runs[name] = (logged(cfg), trainable_state(trainer))
        kernel_saw = {"off": set(), "on": {True}, "on+channels_last": {False}}[name]  # NCHW-contiguous or not
        assert set(layouts) == kernel_saw, name
        assert energies == ([] if name == "off" else [8, 8] * 2), name  # policy and reference, 2 steps x 4 pairs
        if name == "on+channels_last":  # each fused block ran again in the backward (recomputation)
            assert len(layouts) == 6 * 3 * 2, len(layouts)  # 6 GroupNorms x (policy, recomputed, ref) x 2 steps
    off_log, off_state = runs["off"]
    fp32 = TOLERANCES[torch.float32]
    for name in ("on", "on+channels_last"):
        log, state = runs[name]
        for step, (a, b) in enumerate(zip(log, off_log), 1):
            for key in ("loss", "err_w", "err_l", "ref_err_w", "ref_err_l", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=fp32["rtol"], abs=fp32["atol"]), (name, step, key)
        assert_states_close(state, off_state, **fp32)


@pytest.mark.slow
def test_compiled_denoiser_with_kernels_trains_like_the_eager_one(tmp_path, micro_model):
    """train.compile wires torch.compile into the run, and the fused kernels (custom operators inside an
    autograd.Function) compile without a graph break. The aot_eager backend traces forward and backward
    as inductor does, without inductor's code generation, which takes minutes on a CPU."""
    from torch._dynamo.utils import counters

    eager_cfg = micro_config(tmp_path / "eager", micro_model, max_steps=2, kernels="on")
    compiled_cfg = micro_config(tmp_path / "compiled", micro_model, max_steps=2, kernels="on", compile=True,
                                compile_backend="aot_eager")  # fmt: skip
    eager = micro_run(eager_cfg)
    counters.clear()
    compiled = micro_run(compiled_cfg)
    assert compiled.acc.unwrap_model(compiled.unet)._compiled_call_impl is not None
    assert "torch.compile (aot_eager)" in compiled.summary()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_states_close(trainable_state(compiled), trainable_state(eager), atol=1e-6, rtol=0)
    assert [x["loss"] for x in logged(compiled_cfg)] == pytest.approx([x["loss"] for x in logged(eager_cfg)], abs=1e-6)


def test_compile_without_a_compiler_fails_with_a_clear_message(tmp_path, micro_model, monkeypatch, capsys):
    import shutil

    import yaml

    from diffalign.training.cli import main

    monkeypatch.setattr(shutil, "which", lambda name: None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(micro_config(tmp_path, micro_model, compile=True)))
    assert main([str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("diffalign train: train.compile:") and "C++ compiler" in err[0], err


def test_the_run_summary_says_which_path_the_kernels_take(tmp_path, micro_model, monkeypatch):
    from diffalign.config import load_config
    from diffalign.kernels.blocks import FusedResnetBlock2D
    from diffalign.training.trainer import Trainer

    def speed(kernels):
        trainer = Trainer(load_config(micro_config(tmp_path / kernels, micro_model, kernels=kernels)))
        fused = any(isinstance(m, FusedResnetBlock2D) for m in trainer.backbone.denoiser.modules())
        return trainer.summary().split("speed       ")[1].splitlines()[0], fused, trainer.source.fused_energy

    line, fused, fused_energy = speed("auto")  # auto needs a CUDA device
    assert line.startswith("kernels off (auto: no CUDA device") and not fused and not fused_energy
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as a CPU run outside the tests
    line, fused, fused_energy = speed("on")
    assert line.startswith("kernels on (plain-torch reference path: no CUDA device") and fused and fused_energy
