"""SePPO (Zhang, Lan et al., arXiv 2410.05255 v1; renamed SSPO, "Self-Sampling Preference Optimization",
in v2): Diffusion-DPO between a preferred image from the data and a sample x_ref drawn now by the reference
model, with the anchor-based flip (v1's Anchor-based Adaptive Flipper, v2's Self-Sampling Regularization).

The winner (column 0) and x_ref (column 1) are noised with one shared noise and timestep. With e / r the
policy / reference denoising errors:

    D_w = e_w - r_w          how much worse the policy fits the winner than the reference does (the anchor)
    D_r = e_r - r_r          the same on the reference's own sample
    s   = +1 if D_w <= 0     the policy fits the winner at least as well as the reference: x_ref is treated
                             as a loser (plain Diffusion-DPO)
          -1 otherwise       x_ref is treated as a likely winner: both samples are pulled up ("switch to SFT")
    loss = -log sigmoid(-beta/2 (D_w - s D_r))

`flip`: "sign" (the paper's rule), "mask" (s = 0 instead of -1: the paper's indicator ablation, 21.56 vs
21.57 PickScore), "none" (always s = +1: the paper's "w/o AAF" ablation, 20.88). s is read from the detached
D_w of each item's single noise draw, as the paper does; no gradient flows through it. At D_w = 0 exactly
(policy == reference, e.g. at the first step) s = +1, following the "<= 0" of the paper's Theorem 4.1.

beta: diffalign's one convention, Salesforce's (with the 1/2, objectives/base.py). The paper's "beta 2000 as
in Diffusion-DPO" is read as Salesforce train.py's --beta_dpo 2000 (docs/seppo.md says why).

The reference (a checkpoint drawn from earlier in the run, training/reference.py `pool`) and the x_ref
sample (training/experience.py `GeneratedSource`) are not this function's business: it reads energies only.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
import torch.nn.functional as F

from diffalign.objectives.base import Objective, Params, implicit_accuracy, pair_metrics, register

FLIPS = ("sign", "mask", "none")


class SePPOParams(Params):
    #: Salesforce's convention (with the 1/2); the paper's 2000 "as in Diffusion-DPO"
    beta: float = pydantic.Field(2000.0, gt=0)
    #: what happens when the anchor fails (D_w > 0): sign = x_ref counted as a winner, mask = x_ref
    #: ignored, none = x_ref always a loser
    flip: Literal["sign", "mask", "none"] = "sign"


def anchor_sign(d_w: torch.Tensor, flip: str) -> torch.Tensor:
    """s per item (detached): +1 where D_w <= 0, else -1 (sign), 0 (mask) or +1 (none)."""
    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {FLIPS}, got {flip!r}")
    fails = d_w.detach() > 0
    other = {"sign": -1.0, "mask": 0.0, "none": 1.0}[flip]
    return torch.where(fails, torch.full_like(d_w, other), torch.ones_like(d_w)).detach()


def seppo_loss(
    energy: torch.Tensor,
    ref_energy: torch.Tensor,
    phi: torch.Tensor | None = None,
    *,
    beta: float = 2000.0,
    flip: str = "sign",
) -> tuple[torch.Tensor, dict]:
    """energy / ref_energy [B, 2]: column 0 the data's winner, column 1 the reference's sample x_ref."""
    if energy.shape[1] != 2:
        raise ValueError(f"SePPO takes (winner, reference sample) pairs; got {energy.shape[1]} candidates per item")
    d = energy - ref_energy
    d_w, d_r = d[:, 0], d[:, 1]
    s = anchor_sign(d_w, flip)
    inside = -0.5 * beta * (d_w - s * d_r)
    loss = -F.logsigmoid(inside).mean()
    dpo_inside = (-0.5 * beta * (d_w - d_r)).detach()  # the plain DPO margin: is the winner preferred to x_ref?
    metrics = {
        # the share of items whose anchor failed (D_w > 0): flipped under "sign", masked under "mask", and
        # what would have been flipped under "none" (the paper's "AAF rate")
        "flip_frac": (d_w.detach() > 0).float().mean(),
        "implicit_acc": implicit_accuracy(dpo_inside),
        "margin": dpo_inside.mean(),
        **pair_metrics(energy, ref_energy),  # drift_w = D_w, drift_l = D_r (means over the batch)
    }
    return loss, metrics


register(
    Objective(
        "seppo",
        seppo_loss,
        needs_reference=True,
        params=SePPOParams,
        experience=("generated",),
        reference="pool",
    )
)
