"""Training objectives as pure functions of per-candidate energies; look them up by name."""

from diffalign.objectives import dpo, mapo, rankdpo  # noqa: F401  (register the built-ins)
from diffalign.objectives.base import Objective, available_objectives, get_objective

__all__ = ["Objective", "available_objectives", "get_objective"]
