"""Reward models behind one interface: `create_scorer(name).score(images, prompts)`.

Built-in scorers (each module imports torch-heavy libraries lazily, inside functions):
`pickscore`, `spm` (the step-aware preference model of SPO), `hpsv2`, `hpsv2.1`, `imagereward`, `clipscore` (100*cos, ViT-L/14), `clip-s` (2.5*cos, ViT-B/32),
`toy` and `toy_<field>` (the toy world's programmatic reward, diffalign/toy/reward.py).
"""

# Imported for their @register_scorer side effect.
from diffalign.rewards import clipscore, hps, imagereward, pickscore, spm  # noqa: E402, F401, I001
from diffalign.rewards.base import Scorer, available_scorers, create_scorer, register_lazy_scorer, register_scorer

#: Scorers defined above this package (the toy world uses the rewards, not the other way round): name ->
#: ("package.module:factory", fixed keyword arguments), imported on first use. The toy_<field> scorers
#: are fields of the toy reward (diffalign.toy.reward.FIELD_SCORERS) as 0/1 or [0, 1] scores.
LAZY_SCORERS: dict[str, tuple[str, dict]] = {
    "toy": ("diffalign.toy.reward:ToyScorer", {}),
    **{
        f"toy_{field}": ("diffalign.toy.reward:ToyFieldScorer", {"field": field})
        for field in ("correct", "colour_correct", "shape_correct", "cleanliness")
    },
}
for _name, (_target, _fixed) in LAZY_SCORERS.items():
    register_lazy_scorer(_name, _target, **_fixed)

__all__ = ["Scorer", "available_scorers", "create_scorer", "register_lazy_scorer", "register_scorer"]
