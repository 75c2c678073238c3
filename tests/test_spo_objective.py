"""The SPO loss against an independent scalar computation of its formula, values and gradients, including
the hard clamp's zero gradient outside the ratio band."""

import math

import pytest
import torch

from diffalign.objectives import get_objective


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _reference_loss(e, r, beta, clip):
    """loop-by-loop: r = clamp(exp(logp - logp_ref), 1 - clip, 1 + clip), loss = -log sigmoid(beta (log r_w -
    log r_l)), with logp = -energy."""
    total = 0.0
    for b in range(len(e)):
        ratios = []
        for k in range(2):
            ratio = math.exp((-e[b][k]) - (-r[b][k]))
            ratios.append(min(max(ratio, 1 - clip), 1 + clip))
        total += -_logsigmoid(beta * (math.log(ratios[0]) - math.log(ratios[1])))
    return total / len(e)


def test_spo_loss_matches_the_formula_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 2, generator=g, dtype=torch.float64)
    # log ratios spread over (-0.3, 0.3): some inside the band [log 0.9, log 1.1], some outside
    energy = (ref - (torch.rand(16, 2, generator=g, dtype=torch.float64) - 0.5) * 0.6).requires_grad_(True)
    beta, clip = 10.0, 0.1
    loss, metrics = get_objective("spo")(energy, ref, None, beta=beta, clip=clip)
    assert loss.item() == pytest.approx(_reference_loss(energy.tolist(), ref.tolist(), beta, clip), rel=1e-12)
    loss.backward()
    # d loss / d e_bk by central differences of the independent computation
    base = energy.detach().tolist()
    h = 1e-7
    inside_band = 0
    for b in range(16):
        for k in range(2):
            up = [row[:] for row in base]
            down = [row[:] for row in base]
            up[b][k] += h
            down[b][k] -= h
            numeric = (_reference_loss(up, ref.tolist(), beta, clip)
                       - _reference_loss(down, ref.tolist(), beta, clip)) / (2 * h)  # fmt: skip
            assert energy.grad[b, k].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9), (b, k)
            ratio = math.exp(ref[b, k].item() - base[b][k])
            if 1 - clip < ratio < 1 + clip:
                inside_band += 1
                assert energy.grad[b, k].item() != 0.0
            else:
                assert energy.grad[b, k].item() == 0.0  # hard clamp: exactly zero outside the band
    assert 0 < inside_band < 32  # both cases occurred
    assert metrics["clipped"].item() == pytest.approx(1 - inside_band / 32)


def test_spo_at_initialisation_is_log2_and_logs_unit_ratios():
    e = torch.randn(5, 2, dtype=torch.float64)
    loss, m = get_objective("spo")(e.clone().requires_grad_(True), e, None)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert m["ratio_win"].item() == 1.0 and m["ratio_lose"].item() == 1.0 and m["implicit_acc"].item() == 0.5


def test_spo_defaults_come_from_the_reference_config():
    assert get_objective("spo").defaults == {"beta": 10.0, "clip": 0.1}
    assert get_objective("spo").experience == ("rollout",)
