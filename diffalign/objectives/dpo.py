"""Diffusion-DPO (Wallace et al. 2023) and its relatives on pairs: DCPO, and the SFT baseline.

Reference: SalesforceAIResearch/DiffusionDPO train.py; the diffusers research_projects ports.
Hinge and IPO variants follow the diffusers SD1.5 script's loss_type option (its IPO branch crashes
there; here IPO is (h - 1/(2 beta))^2 with h = -0.5 ((e_w - r_w) - (e_l - r_l)), Azar et al.'s form with
beta in the role of IPO's tau, the same beta convention as the sigmoid loss).
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
import torch.nn.functional as F

from diffalign.objectives.base import Objective, Params, implicit_accuracy, pair_metrics, register

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


class DPOParams(Params):
    #: Salesforce's convention (with the 1/2, objectives/base.py); must be > 0 (0 cannot learn, < 0 learns
    #: the preference backwards)
    beta: float = pydantic.Field(5000.0, gt=0)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    #: weight of an SFT term on the preferred image (RPO-style); 0 = off, as in the reference recipes
    winner_weight: float = pydantic.Field(0.0, ge=0)


class DCPOParams(DPOParams):
    beta: float = pydantic.Field(500.0, gt=0)  # DCPO-T2I src/run.sh


def dpo_loss(
    energy: torch.Tensor,
    ref_energy: torch.Tensor,
    phi: torch.Tensor | None = None,
    *,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
    winner_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO on pairs: energy/ref_energy [B, 2], winner in column 0.

    winner_weight > 0 adds winner_weight * mean(e_w), an SFT term on the preferred image (RPO-style).
    It counters likelihood displacement (both errors rising while the margin grows); off by default,
    as in the reference recipes.
    """
    if energy.shape[1] != 2:
        raise ValueError(f"DPO takes pairs; got {energy.shape[1]} candidates per item (use rankdpo for lists)")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    model_diff = energy[:, 0] - energy[:, 1]
    ref_diff = ref_energy[:, 0] - ref_energy[:, 1]
    h = -0.5 * (model_diff - ref_diff)
    inside = beta * h
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - inside)
    else:  # ipo
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    loss = losses.mean()
    if winner_weight:
        loss = loss + winner_weight * energy[:, 0].mean()
    metrics = {
        "implicit_acc": implicit_accuracy(inside),
        "margin": inside.detach().mean(),
        **pair_metrics(energy, ref_energy),
    }
    return loss, metrics


def sft_loss(energy: torch.Tensor, ref_energy=None, phi=None) -> tuple[torch.Tensor, dict]:
    """Supervised fine-tuning on the preferred image only (the Diffusion-DPO paper's SFT baseline)."""
    return energy[:, 0].mean(), {"err_w": energy[:, 0].detach().mean()}


register(
    Objective(
        "dpo",
        dpo_loss,
        needs_reference=True,
        params=DPOParams,
        formats=("pickapic", "double_caption", "ranked", "jsonl", "hpdv2"),
        experience=("offline", "generated"),
    )
)
# DCPO (Saeidi et al. 2025) is the DPO loss with one caption per image; the captions reach the energies
# through the data layer (double_caption format). Its reference recipe uses beta 500 (src/run.sh).
register(Objective("dcpo", dpo_loss, needs_reference=True, params=DCPOParams, formats=("double_caption",)))
register(Objective("sft", sft_loss, needs_reference=False, candidates=1))
