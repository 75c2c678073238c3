"""MaPO: margin-aware preference optimisation without a reference model (Hong, Paul et al. 2024).

Reference: mapo-t2i/mapo utils.py compute_loss. With per-sample errors m_w, m_l (MSE over C, H, W):
    s(m) = a m / (exp(a m) - 1)              a = 0.5 (the reference's --snr_value)
    ratio = log sigmoid(T (s(m_w) - s(m_l)))  T = 1000 (num_train_timesteps)
    loss = mean(m_w) - beta * mean(ratio)      beta = 0.1
"""

from __future__ import annotations

import pydantic
import torch
import torch.nn.functional as F

from diffalign.objectives.base import Objective, Params, implicit_accuracy, pair_metrics, register


class MaPOParams(Params):
    beta: float = pydantic.Field(0.1, gt=0)  # the reference's --beta_mapo
    a: float = pydantic.Field(0.5, gt=0)  # the reference's --snr_value
    num_train_timesteps: float = pydantic.Field(1000.0, gt=0)  # T in log sigmoid(T (s_w - s_l))


def _likelihood_link(m: torch.Tensor, a: float) -> torch.Tensor:
    # a m / (exp(a m) - 1), written with expm1 for accuracy at small m; the limit at m = 0 is 1.
    x = a * m
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return torch.where(x == 0, torch.ones_like(x), safe / torch.expm1(safe))


def mapo_loss(
    energy: torch.Tensor,
    ref_energy=None,
    phi=None,
    *,
    beta: float = 0.1,
    a: float = 0.5,
    num_train_timesteps: float = 1000.0,
) -> tuple[torch.Tensor, dict]:
    if energy.shape[1] != 2:
        raise ValueError(f"MaPO takes pairs; got {energy.shape[1]} candidates per item")
    m_w, m_l = energy[:, 0], energy[:, 1]
    s_w, s_l = _likelihood_link(m_w, a), _likelihood_link(m_l, a)
    log_odds = s_w - s_l
    ratio = F.logsigmoid(num_train_timesteps * log_odds)
    loss = m_w.mean() - beta * ratio.mean()
    metrics = {
        "implicit_acc": implicit_accuracy(log_odds),
        "margin": log_odds.detach().mean(),
        "win_score": s_w.detach().mean(),
        "lose_score": s_l.detach().mean(),
        "or_loss": -ratio.detach().mean(),
        **pair_metrics(energy, None),
    }
    return loss, metrics


register(Objective("mapo", mapo_loss, needs_reference=False, params=MaPOParams))
