"""RankDPO (Karthik et al., arXiv 2410.18013, Alg. 2): a DCG-weighted pairwise DPO loss over k ranked
candidates sharing one timestep (each with its own noise by default, see `noise` below).

Per candidate, s_i = e_i - r_i (policy minus reference error; lower is better). For every pair with
phi_i > phi_j:
    gain      G_ij = 2^phi_i - 2^phi_j
    discount  D(tau) = log2(1 + tau), tau the 1-based position in the ranking
    weight    Delta_ij = |G_ij| * |1/D(tau_i) - 1/D(tau_j)|       (the usual Delta-DCG of a swap)
    pair loss -Delta_ij * log sigmoid(-0.5 beta (s_i - s_j))
summed over pairs and averaged over items.

Choices where the paper's text leaves room (all named options):
- `discount="true_rank"` (default) takes tau from the ranking by phi, as Algorithm 2 reads;
  `"predicted_rank"` takes it from the current model's ranking of s (LambdaLoss style, Fig. 2's caption).
- The 0.5 beta factor keeps diffalign's one beta convention (objectives/base.py): RankDPO's "paper" beta
  equals beta / 2 here. With `normalize=True` the pair losses are divided by sum Delta, so that k = 2
  reduces exactly to Diffusion-DPO; the default (False) is the paper's plain sum.
- Candidates tied in phi form no pair (G = 0). Ties in position use the order the data layer gave.
- Noise: each image of the list gets its own diffusion noise and all share one timestep (Eq. 5,
  Algorithm 2); `noise="shared"` gives the whole list one noise, as Diffusion-DPO pairs do. The loss
  function reads only energies; the experience source reads this parameter.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
import torch.nn.functional as F

from diffalign.objectives.base import Objective, Params, implicit_accuracy, pair_metrics, register

DISCOUNTS = ("true_rank", "predicted_rank")


class RankDPOParams(Params):
    beta: float = pydantic.Field(5000.0, gt=0)
    discount: Literal["true_rank", "predicted_rank"] = "true_rank"
    normalize: bool = False
    #: per_image: each candidate its own diffusion noise, one shared timestep (the paper's Eq. 5 and
    #: Algorithm 2); shared: one noise for the whole list (Diffusion-DPO's pairing, diffalign < 0.2)
    noise: Literal["per_image", "shared"] = "per_image"


def dcg_pair_weights(phi: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Delta_ij for all ordered pairs, [B, K, K]; zero unless phi_i > phi_j. positions are 1-based."""
    gain = (2.0**phi).unsqueeze(2) - (2.0**phi).unsqueeze(1)
    inv_discount = 1.0 / torch.log2(1.0 + positions.to(phi.dtype))
    delta = gain.abs() * (inv_discount.unsqueeze(2) - inv_discount.unsqueeze(1)).abs()
    better = phi.unsqueeze(2) > phi.unsqueeze(1)
    return torch.where(better, delta, torch.zeros_like(delta))


def _positions(values: torch.Tensor, descending: bool) -> torch.Tensor:
    order = torch.argsort(values, dim=1, descending=descending, stable=True)
    pos = torch.empty_like(order)
    ranks = torch.arange(1, values.shape[1] + 1, device=values.device).expand_as(order)
    return pos.scatter_(1, order, ranks)


def rankdpo_loss(
    energy: torch.Tensor,
    ref_energy: torch.Tensor,
    phi: torch.Tensor,
    *,
    beta: float = 5000.0,
    discount: str = "true_rank",
    normalize: bool = False,
    noise: str = "per_image",
) -> tuple[torch.Tensor, dict]:
    if discount not in DISCOUNTS:
        raise ValueError(f"discount must be one of {DISCOUNTS}, got {discount!r}")
    if phi is None or phi.shape != energy.shape:
        raise ValueError(f"rankdpo needs phi of shape {tuple(energy.shape)}, got {None if phi is None else tuple(phi.shape)}")
    phi = phi.to(energy.dtype)
    s = energy - ref_energy
    if discount == "true_rank":
        positions = _positions(phi, descending=True)
    else:
        positions = _positions(s.detach(), descending=False)
    weights = dcg_pair_weights(phi, positions)
    inside = -0.5 * beta * (s.unsqueeze(2) - s.unsqueeze(1))  # [B, i, j]
    pair_losses = -weights * F.logsigmoid(inside)
    per_item = pair_losses.sum(dim=(1, 2))
    if normalize:
        per_item = per_item / weights.sum(dim=(1, 2)).clamp_min(torch.finfo(weights.dtype).tiny)
    loss = per_item.mean()
    has_pair = weights > 0
    pair_inside = inside.detach()[has_pair]
    metrics = {
        "implicit_acc": implicit_accuracy(pair_inside) if pair_inside.numel() else energy.new_tensor(0.5),
        "margin": pair_inside.mean() if pair_inside.numel() else energy.new_tensor(0.0),
        **pair_metrics(energy, ref_energy),
    }
    return loss, metrics


register(Objective("rankdpo", rankdpo_loss, needs_reference=True, params=RankDPOParams))
