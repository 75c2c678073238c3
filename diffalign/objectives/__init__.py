"""Training objectives as pure functions of per-candidate energies; look them up by name."""

from diffalign.objectives import dpo, mapo, rankdpo, seppo, spo  # noqa: F401  (register the built-ins)
from diffalign.objectives.base import _REGISTRY, Objective, Params

__all__ = ["Objective", "Params", "available_objectives", "get_objective"]


def get_objective(name: str) -> Objective:
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown objective {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)
