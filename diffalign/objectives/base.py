"""Objectives are pure functions of per-candidate denoising errors ("energies").

    energy[b, k]      policy error of candidate k of item b (lower = the model likes it more); with grad
    ref_energy[b, k]  the same under the reference model, no grad; None for reference-free objectives
    phi[b, k]         preference strength of each candidate, best first (pairs: [1, 0])

Candidates are ordered best first by the data layer, so for a pair column 0 is the winner and column 1
the loser. An objective returns (loss, metrics) where metrics are detached scalars for logging.

Beta convention (one for every DPO-family objective in diffalign): the Salesforce Diffusion-DPO one,

    inside = -0.5 * beta * ((e_w - r_w) - (e_l - r_l)),   loss = -log sigmoid(inside)

with e/r the per-sample MSE averaged over C, H, W. beta = 5000 here equals the diffusers SD1.5 script's
`--beta_dpo 2500` (which has no 0.5 factor) and a "paper" beta of 2500 in logsigmoid(-beta * delta).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pydantic
import torch

Metrics = dict[str, torch.Tensor]

#: where an objective's candidates come from (diffalign/training/experience.py)
EXPERIENCE_KINDS = ("offline", "generated", "rollout")


class Params(pydantic.BaseModel):
    """An objective's hyper-parameters: typed, validated when the config loads (a misspelt or ill-typed
    parameter fails before any model is built). Subclasses declare fields with defaults.

    A field named `noise` ("shared" | "per_image") tells the experience source whether the candidates of
    an item share one diffusion noise (Diffusion-DPO) or draw one each (RankDPO's Algorithm 2)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    pass


@dataclass(frozen=True)
class Objective:
    """A named loss with the facts the trainer needs to feed it."""

    name: str
    fn: Callable[..., tuple[torch.Tensor, Metrics]]
    needs_reference: bool
    #: its hyper-parameters and their defaults
    params: type[Params] = NoParams
    #: how many candidates per item the objective reads: None = all, 1 = the best only (SFT)
    candidates: int | None = None
    #: data formats it accepts (None = any)
    formats: tuple[str, ...] | None = None
    #: experience sources it can learn from; the first is the default
    experience: tuple[str, ...] = ("offline",)
    #: the reference `train.reference: auto` gives: "auto" = adapters off for LoRA, a frozen copy for full
    #: fine-tuning; "pool" = earlier checkpoints of the run (SePPO)
    reference: str = "auto"

    @property
    def defaults(self) -> dict:
        return self.params().model_dump()

    def validate(self, params: dict | Params | None = None) -> Params:
        """The typed parameters (defaults filled in); raises pydantic.ValidationError."""
        if isinstance(params, self.params):
            return params
        return self.params.model_validate(dict(params or {}))

    def __call__(self, energy, ref_energy, phi, **params) -> tuple[torch.Tensor, Metrics]:
        if self.needs_reference and ref_energy is None:
            raise ValueError(f"objective {self.name!r} needs reference energies")
        return self.fn(energy, ref_energy, phi, **self.validate(params).model_dump())


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    if objective.name in _REGISTRY:
        raise ValueError(f"objective {objective.name!r} registered twice")
    _REGISTRY[objective.name] = objective
    return objective


def pair_metrics(energy: torch.Tensor, ref_energy: torch.Tensor | None) -> Metrics:
    """Errors of the best (column 0) and worst (last column) candidate, and the winner's drift.

    drift_w = e_w - r_w is the likelihood-displacement signal: DPO can win its margin by making the
    preferred image *less* likely (drift_w > 0) as long as the loser gets worse faster."""
    e = energy.detach()
    out = {"err_w": e[:, 0].mean(), "err_l": e[:, -1].mean()}
    if ref_energy is not None:
        r = ref_energy.detach()
        out |= {
            "ref_err_w": r[:, 0].mean(),
            "ref_err_l": r[:, -1].mean(),
            "drift_w": (e[:, 0] - r[:, 0]).mean(),
            "drift_l": (e[:, -1] - r[:, -1]).mean(),
        }
    return out


def implicit_accuracy(inside: torch.Tensor) -> torch.Tensor:
    """Fraction of items the implicit reward ranks correctly; a tie (inside == 0) counts one half, as in
    the diffusers scripts, so an untrained LoRA (policy == reference) reads 0.5 rather than 0."""
    inside = inside.detach()
    return ((inside > 0).float() + 0.5 * (inside == 0).float()).mean()
