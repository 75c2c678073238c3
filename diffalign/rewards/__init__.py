"""Reward models behind one interface: `create_scorer(name).score(images, prompts)`."""

from diffalign.rewards.base import Scorer, available_scorers, create_scorer, register_scorer

__all__ = ["Scorer", "available_scorers", "create_scorer", "register_scorer"]
