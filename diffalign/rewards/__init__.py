"""Reward models behind one interface: `create_scorer(name).score(images, prompts)`.

Built-in scorers (each module imports torch-heavy libraries lazily, inside functions):
`pickscore`, `hpsv2`, `hpsv2.1`, `imagereward`, `clipscore` (100*cos, ViT-L/14), `clip-s` (2.5*cos, ViT-B/32),
`toy` (the toy world's programmatic reward, diffalign/toy/reward.py).
"""

# Imported for their @register_scorer side effect.
from diffalign.rewards import clipscore, hps, imagereward, pickscore  # noqa: E402, F401, I001
import diffalign.toy.reward  # noqa: E402, F401, I001
from diffalign.rewards.base import Scorer, available_scorers, create_scorer, register_scorer

__all__ = ["Scorer", "available_scorers", "create_scorer", "register_scorer"]
