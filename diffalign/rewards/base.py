"""The one interface every reward model / scorer implements.

A scorer maps (images, prompts) to one float per image. Images are either a list of PIL images or a
float tensor [N, 3, H, W] with values in [0, 1]. Prompts are a list of N strings, or one string shared by
all images (the scorer then encodes it once). Scorers are used by evaluation, by Syn-Pic ranking and by
training-time relabelling, so they never assume where they are called from.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from diffalign.lazy import load_attr

Images = Sequence[Image.Image] | torch.Tensor
Prompts = Sequence[str] | str


class Scorer:
    """Base class: subclasses set `name` and implement `_score_batch`; `score` handles batching."""

    name: str = "scorer"
    #: True when a higher score means a better image (all built-in scorers).
    higher_is_better: bool = True
    #: True when every score is 0 or 1 (a per-image pass / fail), so paired tests such as McNemar apply.
    binary: bool = False

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size

    def _score_batch(self, images: Images, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: Images, prompts: Prompts) -> torch.Tensor:
        n = len(images)
        prompt_list = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != n:
            raise ValueError(f"{self.name}: got {n} images but {len(prompt_list)} prompts")
        out = []
        for i in range(0, n, self.batch_size):
            out.append(self._score_batch(images[i : i + self.batch_size], prompt_list[i : i + self.batch_size]).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    __call__ = score


# The registry. Importing this module imports the diffalign.rewards package first, which registers the
# built-in scorers; scorers of higher layers (the toy world) are registered there by lazy name.
_REGISTRY: dict[str, Callable[..., Scorer]] = {}
_LAZY: dict[str, tuple[str, dict]] = {}  # name -> ("package.module:factory", fixed keyword arguments)


def _check_new(name: str) -> None:
    if name in _REGISTRY or name in _LAZY:
        raise ValueError(f"scorer {name!r} registered twice")


def register_scorer(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    def deco(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        _check_new(name)
        _REGISTRY[name] = factory
        return factory

    return deco


def register_lazy_scorer(name: str, target: str, **fixed) -> None:
    """Register `name` as the factory `target` ("package.module:attr", a string in diffalign's own code),
    imported on first use; `fixed` keyword arguments are bound to it. Listed by available_scorers()
    without importing anything."""
    _check_new(name)
    _LAZY[name] = (target, fixed)


def available_scorers() -> list[str]:
    return sorted({*_REGISTRY, *_LAZY})


def scorer_factory(name: str) -> Callable[..., Scorer]:
    """The factory registered as `name` (a lazy one is imported now). KeyError naming the closest name."""
    if name not in _REGISTRY and name in _LAZY:
        target, fixed = _LAZY[name]
        factory = load_attr(target)
        _REGISTRY[name] = functools.partial(factory, **fixed) if fixed else factory
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, available_scorers(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown scorer {name!r}.{hint} Available: {', '.join(available_scorers())}")
    return _REGISTRY[name]


def create_scorer(name: str, **kwargs) -> Scorer:
    """Build a scorer by registry name, e.g. create_scorer("pickscore", device="cuda")."""
    return scorer_factory(name)(**kwargs)
