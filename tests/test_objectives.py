"""Each objective against an independent, loop-by-loop computation of its paper formula."""

import math

import pytest
import torch

from diffalign.objectives import available_objectives, get_objective


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _rand(b, k, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, k, generator=g, dtype=torch.float64) * scale).requires_grad_(True)


def test_registry_lists_every_method_and_suggests_close_names():
    assert {"dpo", "dcpo", "mapo", "rankdpo", "sft"} <= set(available_objectives())
    with pytest.raises(KeyError, match="Did you mean 'mapo'"):
        get_objective("mappo")


def test_dpo_at_initialisation_is_log2():
    e = _rand(8, 2, 0)
    loss, m = get_objective("dpo")(e, e.detach().clone(), None)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert m["implicit_acc"].item() == 0.5


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("winner_weight", [0.0, 3.0])
def test_dpo_matches_formula(loss_type, winner_weight):
    beta = 2000.0
    e, r = _rand(6, 2, 1), _rand(6, 2, 2).detach()
    loss, _ = get_objective("dpo")(e, r, None, beta=beta, loss_type=loss_type, winner_weight=winner_weight)
    expected = 0.0
    for b in range(6):
        h = -0.5 * ((e[b, 0].item() - r[b, 0].item()) - (e[b, 1].item() - r[b, 1].item()))
        if loss_type == "sigmoid":
            expected += -_logsigmoid(beta * h)
        elif loss_type == "hinge":
            expected += max(0.0, 1 - beta * h)
        else:
            expected += (h - 1 / (2 * beta)) ** 2
    expected = expected / 6 + winner_weight * sum(e[b, 0].item() for b in range(6)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_dpo_gradient_matches_closed_form():
    # d/d e_w of -logsigmoid(-0.5 beta (e_w - r_w - e_l + r_l)) = 0.5 beta sigmoid(-inside) / B
    beta = 1000.0
    e, r = _rand(5, 2, 3), _rand(5, 2, 4).detach()
    loss, _ = get_objective("dpo")(e, r, None, beta=beta)
    loss.backward()
    for b in range(5):
        inside = -0.5 * beta * ((e[b, 0] - r[b, 0]) - (e[b, 1] - r[b, 1])).item()
        g = 0.5 * beta * (1 / (1 + math.exp(inside))) / 5
        assert e.grad[b, 0].item() == pytest.approx(g, rel=1e-9)
        assert e.grad[b, 1].item() == pytest.approx(-g, rel=1e-9)


def test_dcpo_is_dpo_with_its_recipe_beta():
    e, r = _rand(4, 2, 5), _rand(4, 2, 6).detach()
    dcpo, _ = get_objective("dcpo")(e, r, None)
    dpo, _ = get_objective("dpo")(e, r, None, beta=500.0)
    assert dcpo.item() == pytest.approx(dpo.item(), rel=1e-12)


def test_mapo_matches_formula_and_gradient():
    e = _rand(7, 2, 7, scale=0.5)
    loss, m = get_objective("mapo")(e, None, None)
    a, T, beta = 0.5, 1000.0, 0.1

    def s(x):
        return a * x / (math.exp(a * x) - 1)

    mw = [e[b, 0].item() for b in range(7)]
    ml = [e[b, 1].item() for b in range(7)]
    ratio = [_logsigmoid(T * (s(w) - s(l_))) for w, l_ in zip(mw, ml)]
    expected = sum(mw) / 7 - beta * sum(ratio) / 7
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert m["win_score"].item() == pytest.approx(sum(map(s, mw)) / 7, rel=1e-9)
    # gradient by central finite differences on one entry
    loss.backward()
    eps = 1e-6
    for idx in [(0, 0), (3, 1)]:
        plus, minus = e.detach().clone(), e.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (get_objective("mapo")(plus, None, None)[0] - get_objective("mapo")(minus, None, None)[0]) / (2 * eps)
        assert e.grad[idx].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def test_mapo_link_is_finite_at_zero_error():
    e = torch.zeros(2, 2, requires_grad=True, dtype=torch.float64)
    loss, _ = get_objective("mapo")(e, None, None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e.grad).all()


def _rankdpo_reference(e, r, phi, beta, discount, normalize):
    total = 0.0
    B, K = phi.shape
    for b in range(B):
        s = [e[b, i].item() - r[b, i].item() for i in range(K)]
        p = [phi[b, i].item() for i in range(K)]
        keys = [(-p[i], i) if discount == "true_rank" else (s[i], i) for i in range(K)]
        order = sorted(range(K), key=keys.__getitem__)
        tau = {idx: pos + 1 for pos, idx in enumerate(order)}
        item, wsum = 0.0, 0.0
        for i in range(K):
            for j in range(K):
                if p[i] > p[j]:
                    w = abs(2 ** p[i] - 2 ** p[j]) * abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                    item += -w * _logsigmoid(-0.5 * beta * (s[i] - s[j]))
                    wsum += w
        total += item / wsum if normalize else item
    return total / B


@pytest.mark.parametrize("discount", ["true_rank", "predicted_rank"])
@pytest.mark.parametrize("normalize", [False, True])
def test_rankdpo_matches_formula(discount, normalize):
    e, r = _rand(3, 4, 8), _rand(3, 4, 9).detach()
    phi = torch.tensor([[1.0, 2 / 3, 1 / 3, 0.0], [0.75, 0.75, 0.25, 0.0], [1.0, 0.5, 0.5, 0.0]], dtype=torch.float64)
    loss, _ = get_objective("rankdpo")(e, r, phi, beta=300.0, discount=discount, normalize=normalize)
    assert loss.item() == pytest.approx(_rankdpo_reference(e, r, phi, 300.0, discount, normalize), rel=1e-10)


def test_rankdpo_with_two_candidates_normalised_equals_dpo():
    e, r = _rand(5, 2, 10), _rand(5, 2, 11).detach()
    phi = torch.tensor([[1.0, 0.0]] * 5, dtype=torch.float64)
    rank, _ = get_objective("rankdpo")(e, r, phi, beta=800.0, normalize=True)
    dpo, _ = get_objective("dpo")(e, r, None, beta=800.0)
    assert rank.item() == pytest.approx(dpo.item(), rel=1e-12)


def test_rankdpo_gradient_matches_finite_differences():
    e, r = _rand(2, 3, 12), _rand(2, 3, 13).detach()
    phi = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    f = get_objective("rankdpo")
    loss, _ = f(e, r, phi, beta=500.0)
    loss.backward()
    eps = 1e-7
    for idx in [(0, 0), (0, 2), (1, 1)]:
        plus, minus = e.detach().clone(), e.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (f(plus, r, phi, beta=500.0)[0] - f(minus, r, phi, beta=500.0)[0]) / (2 * eps)
        assert e.grad[idx].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9)


def test_sft_reads_only_the_winner():
    e = _rand(4, 2, 14)
    loss, _ = get_objective("sft")(e, None, None)
    loss.backward()
    assert loss.item() == pytest.approx(e[:, 0].mean().item())
    assert torch.all(e.grad[:, 1] == 0)


def test_bad_shapes_and_options_are_clear_errors():
    e = _rand(2, 3, 15)
    with pytest.raises(ValueError, match="pairs"):
        get_objective("dpo")(e, e.detach(), None)
    with pytest.raises(ValueError, match="loss_type"):
        get_objective("dpo")(e[:, :2], e[:, :2].detach(), None, loss_type="cpo")
    with pytest.raises(ValueError, match="needs reference"):
        get_objective("dpo")(e[:, :2], None, None)
    with pytest.raises(ValueError, match="phi"):
        get_objective("rankdpo")(e, e.detach(), None)
