"""Fused kernels against their plain-torch references, values and gradients, per dtype, the fallback when
Triton cannot run, and the fused diffusers blocks against unpatched ones.

On CPU, Triton runs through its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything
imports triton). With a GPU the kernel tests run on it; `TRITON_INTERPRET=0 python -m pytest
tests/test_kernels.py` then tests the compiled kernels rather than the interpreter."""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch

from diffalign.kernels import (
    TOLERANCES,
    group_norm_silu,
    group_norm_silu_reference,
    per_sample_mse,
    per_sample_mse_reference,
    runtime,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DTYPES = list(TOLERANCES)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    """On a GPU, fp32 convolutions in full fp32 (cuDNN's default TF32 would swamp the fp32 tolerances;
    matmuls are full fp32 by default)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _randn(*shape, g, dtype=torch.float32):
    """Random values drawn on CPU (the same on every machine), on the test device."""
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _grads(fn, *inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [t.grad for t in leaves]


def _assert_close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=lambda m: f"{what} ({dtype}): {m}")


# ---- GroupNorm + SiLU ------------------------------------------------------------------------------------


GN_CASES = {
    "nchw": ((2, 12, 5, 3), 3, "nchw", None),  # several groups per program
    "channels_last": ((2, 12, 5, 3), 3, "channels_last", None),
    "3d": ((3, 6, 7), 2, "nchw", None),  # [N, C, L]
    # tiny tiles: a group spans 21 programs, and the merges loop over blocks of their partial sums (the
    # arithmetic does not depend on the dtype, so fp32 only: the interpreter takes 4 s a case)
    "chunked": ((1, 8, 9, 9), 2, "channels_last", 16),
}


@pytest.mark.parametrize(
    ("case", "dtype"),
    [(case, dtype) for case in GN_CASES for dtype in DTYPES if case != "chunked" or dtype == torch.float32],
    ids=str,
)
def test_group_norm_silu_matches_the_reference(case, dtype, monkeypatch):
    shape, groups, layout, tile = GN_CASES[case]
    from diffalign.kernels import _triton_group_norm_silu as tk

    if tile is not None:
        monkeypatch.setattr(tk, "TILE", tile)
    g = torch.Generator().manual_seed(0)
    x = _randn(shape, g=g, dtype=dtype) * 3 + 1  # an offset mean: a naive E[x^2] - E[x]^2 loses it
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight, bias = _randn(shape[1], g=g, dtype=dtype), _randn(shape[1], g=g, dtype=dtype)
    dy = _randn(shape, g=g, dtype=dtype)

    y, grads = _grads(lambda *a: group_norm_silu(*a, groups, 1e-5), x, weight, bias, grad_out=dy)
    assert type(y.grad_fn).__name__ == "GroupNormSiLUFunctionBackward"  # the Triton path ran
    ref, ref_grads = _grads(lambda *a: group_norm_silu_reference(*a, groups, 1e-5), x, weight, bias, grad_out=dy)
    assert y.dtype == dtype and y.stride() == x.stride()  # the input's dtype and memory layout
    _assert_close(y, ref, dtype, "output")
    for name, a, b in zip(("x", "weight", "bias"), grads, ref_grads):
        assert a.dtype == dtype
        _assert_close(a, b, dtype, f"grad {name}")


def test_group_norm_silu_takes_a_gradient_in_another_layout():
    """The upstream gradient of a channels-last output can arrive NCHW (and the other way round)."""
    g = torch.Generator().manual_seed(1)
    x = _randn(2, 8, 4, 4, g=g).to(memory_format=torch.channels_last)
    weight, bias, dy = _randn(8, g=g), _randn(8, g=g), _randn(2, 8, 4, 4, g=g)
    y, grads = _grads(lambda *a: group_norm_silu(*a, 4), x, weight, bias, grad_out=dy)
    ref, ref_grads = _grads(lambda *a: group_norm_silu_reference(*a, 4), x, weight, bias, grad_out=dy)
    assert type(y.grad_fn).__name__ == "GroupNormSiLUFunctionBackward"
    for a, b in zip([y, *grads], [ref, *ref_grads]):
        _assert_close(a, b, torch.float32, "channels-last x, NCHW dy")


# ---- per-sample energy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_fp32", [True, False], ids=["fp32-target", "same-dtype-target"])
def test_per_sample_mse_matches_the_reference(dtype, target_fp32, monkeypatch):
    from diffalign.kernels import _triton_energy as tk

    monkeypatch.setattr(tk, "BLOCK", 32)  # 168 elements a sample: 3 programs of 2 vector steps each
    monkeypatch.setattr(tk, "MAX_ITERS", 2)
    g = torch.Generator().manual_seed(0)
    pred = _randn(3, 4, 6, 7, g=g, dtype=dtype)
    target = _randn(3, 4, 6, 7, g=g, dtype=torch.float32 if target_fp32 else dtype)
    w = _randn(3, g=g)

    e, grads = _grads(per_sample_mse, pred, target, grad_out=w)
    assert type(e.grad_fn).__name__ == "PerSampleMSEFunctionBackward"
    ref, ref_grads = _grads(per_sample_mse_reference, pred, target, grad_out=w)
    assert e.dtype == torch.float32 and e.shape == (3,)
    _assert_close(e, ref, torch.float32, "energy")  # fp32 arithmetic on the same inputs in both paths
    assert grads[0].dtype == dtype and grads[1].dtype == target.dtype  # no fp32 copies handed back
    _assert_close(grads[0], ref_grads[0], dtype, "grad pred")
    _assert_close(grads[1], ref_grads[1], target.dtype, "grad target")


# ---- when Triton cannot run --------------------------------------------------------------------------------


@pytest.fixture
def fresh_runtime():
    runtime.load_triton.cache_clear()
    runtime._said.clear()
    yield
    runtime.load_triton.cache_clear()
    runtime._said.clear()


@pytest.mark.parametrize("missing", ["triton", "device"])
def test_without_triton_or_a_device_the_reference_runs_and_says_so_once(missing, fresh_runtime, monkeypatch, caplog):
    if missing == "triton":
        monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
        expected = "triton is not installed (pip install 'diffalign[kernels]')"
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor and no interpreter
        expected = "no CUDA device"
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 4, 3, 3, generator=g), torch.randn(4, generator=g), torch.randn(4, generator=g)
    pred, target = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    with caplog.at_level(logging.WARNING, logger="diffalign.kernels"):
        for _ in range(2):
            y = group_norm_silu(x, w, b, 2)
            e = per_sample_mse(pred, target)
    assert torch.equal(y, group_norm_silu_reference(x, w, b, 2))
    assert torch.equal(e, per_sample_mse_reference(pred, target))
    said = [r.getMessage() for r in caplog.records if r.name == "diffalign.kernels"]
    assert len(said) == 1 and expected in said[0] and "plain-torch reference" in said[0], said
    assert expected in runtime.describe("cpu")


# ---- the fused diffusers blocks ---------------------------------------------------------------------------


def _resnet_block(temb_channels):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=temb_channels, groups=4, eps=1e-6)
    for p in block.parameters():  # GroupNorm's default affine (1, 0) would hide a mix-up of weight and bias
        p.data += 0.1 * torch.randn_like(p)
    return block


def _forward_backward(block, x, temb, grad_out):
    x = x.detach().clone().requires_grad_()
    temb = None if temb is None else temb.detach().clone().requires_grad_()
    out = block(x, temb)
    out.backward(grad_out)
    grads = {n: p.grad for n, p in block.named_parameters()}
    return out, x.grad, None if temb is None else temb.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_temb", [True, False], ids=["unet-block", "vae-block"])
def test_fused_resnet_block_matches_the_unpatched_block(dtype, with_temb):
    from diffusers.models.resnet import ResnetBlock2D

    from diffalign.kernels.blocks import FusedResnetBlock2D, fuse_resnet_blocks

    plain = _resnet_block(16 if with_temb else None).to(DEVICE, dtype)
    fused = copy.deepcopy(plain)
    assert fuse_resnet_blocks(fused) == (1, 0)
    assert isinstance(fused, FusedResnetBlock2D) and isinstance(fused, ResnetBlock2D)
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints and LoRA names unchanged

    g = torch.Generator().manual_seed(1)
    x = _randn(2, 8, 6, 6, g=g, dtype=dtype)
    temb = _randn(2, 16, g=g, dtype=dtype) if with_temb else None
    grad_out = _randn(2, 12, 6, 6, g=g, dtype=dtype)
    got = _forward_backward(fused, x, temb, grad_out)
    want = _forward_backward(plain, x, temb, grad_out)
    pairs = [("output", got[0], want[0]), ("grad x", got[1], want[1])]
    pairs += [("grad temb", got[2], want[2])] if with_temb else []
    pairs += [(f"grad {name}", got[3][name], want[3][name]) for name in want[3]]
    for what, a, b in pairs:
        if dtype == torch.float32:  # elementwise, at twice the kernel's own tolerance (two convolutions follow)
            torch.testing.assert_close(a, b, **{k: 2 * v for k, v in TOLERANCES[dtype].items()},
                                       msg=lambda m, what=what: f"{what}: {m}")  # fmt: skip
        else:
            # bf16: both blocks round every layer's output; elementwise, near-zero gradient entries differ by
            # many ulp either way, so compare the whole tensor: measured at most 1.2e-2 here, and each block
            # is about 5e-3 from an fp64 run of the same weights
            rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
            assert rel <= TOLERANCES[dtype]["rtol"], f"{what}: relative difference {rel:.3g}"


def test_whole_tiny_sdxl_unet_matches_the_unpatched_unet():
    from diffusers.models.resnet import ResnetBlock2D

    from diffalign.backbones.tiny import tiny_unet
    from diffalign.kernels.blocks import fuse_resnet_blocks

    plain = tiny_unet(sdxl=True).to(DEVICE)
    fused = copy.deepcopy(plain)
    n_blocks = sum(isinstance(m, ResnetBlock2D) for m in plain.modules())
    assert fuse_resnet_blocks(fused) == (n_blocks, 0) and n_blocks >= 8

    g = torch.Generator().manual_seed(0)
    x, t = _randn(1, 4, 16, 16, g=g), torch.tensor([500], device=DEVICE)
    cond = dict(encoder_hidden_states=_randn(1, 8, 64, g=g),
                added_cond_kwargs={"text_embeds": _randn(1, 32, g=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]], device=DEVICE)})  # fmt: skip
    outs = []
    for unet in (fused, plain):
        out = unet(x, t, **cond).sample
        out.square().mean().backward()
        outs.append((out, {n: p.grad for n, p in unet.named_parameters()}))
    tol = {k: 10 * v for k, v in TOLERANCES[torch.float32].items()}  # 16 GroupNorms and ~40 other layers deep
    torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
    for name, grad in outs[1][1].items():
        torch.testing.assert_close(outs[0][1][name], grad, **tol, msg=lambda m, name=name: f"grad {name}: {m}")


def test_backbones_fuse_their_own_blocks():
    from diffalign.backbones.base import Backbone
    from diffalign.backbones.sd import tiny_sd

    bb = tiny_sd()
    assert bb.apply_kernels() == {"unet": 8, "vae": 6}
    assert Backbone.apply_kernels(bb) == {}  # the default (transformer families): nothing to fuse


# ---- scripts/bench_kernels.py ----------------------------------------------------------------------------


def test_bench_kernels_on_cpu_times_the_reference_and_says_there_is_no_fused_timing(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--rounds", "1", "--inner", "1", "--warmup", "1", "--no-compile"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| GroupNorm+SiLU") or line.startswith("| energy")]
    assert "NO FUSED TIMINGS: no CUDA device" in out
    assert len(rows) == len(bench.CPU_GN_SHAPES) + len(bench.CPU_ENERGY_SHAPES)
    assert all("| eager |" in row for row in rows)  # no fused (nor made-up) numbers
