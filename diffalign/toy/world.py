"""The toy text-to-image world: a prompt grammar and a deterministic renderer.

A scene is data: an image size, a background colour and a list of objects, each a (colour, shape,
box). The default world has one filled object per image on a black background, 16x16 RGB, with the
object's side drawn uniformly in [0.35, 0.7] of the image and a random position, giving the 18 prompts
"a {colour} {shape}". The same description carries scenes with several objects (`sample_scene` with
several specs, `prompt_for` joining them with "and"), the first step toward GenEval-like tasks (two
objects, counts, positions) at larger sizes; only single-object prompts are enabled by default and the
toy reward scores single-object prompts only.

Everything here is numpy and deterministic given a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: The six pure colours, as RGB in [0, 1]. Order is part of the world's definition (reward indices).
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DEFAULT_SIZE = 16
#: Side of an object as a fraction of the image side.
SIDE_RANGE = (0.35, 0.7)
#: Side range when a scene has several objects (so that they fit without overlapping).
MULTI_SIDE_RANGE = (0.25, 0.45)
#: Words the grammar may use beyond colours and shapes (the toy tokenizer's vocabulary).
GRAMMAR_WORDS: tuple[str, ...] = (
    "a", "an", "and", "the", "of", "one", "two", "three", "four",
    "left", "right", "above", "below", "on", "to",
)  # fmt: skip


@dataclass(frozen=True)
class SceneObject:
    """One object. `box` = (x0, y0, x1, y1) in pixels, continuous, x to the right and y downwards."""

    colour: str
    shape: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    size: int = DEFAULT_SIZE
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    extra: dict = field(default_factory=dict, compare=False)


def plural(shape: str) -> str:
    return shape + "s"


def phrase(colour: str, shape: str) -> str:
    """One object in the grammar: "a red circle"."""
    return f"a {colour} {shape}"


def all_prompts() -> list[str]:
    """The 18 single-object prompts of the default world, colour-major order."""
    return [phrase(c, s) for c in COLOURS for s in SHAPES]


def prompt_for(scene: Scene) -> str:
    """The caption of a scene: "a red circle", or "a red circle and a blue square"."""
    return " and ".join(phrase(o.colour, o.shape) for o in scene.objects)


def parse_prompt(prompt: str) -> list[tuple[str, str]]:
    """(colour, shape) of each object a prompt asks for. Raises ValueError on anything else."""
    words = prompt.lower().replace(",", " ").split()
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        if words[i] == "and":
            i += 1
            continue
        if words[i] in ("a", "an") and i + 2 < len(words):
            colour, shape = words[i + 1], words[i + 2]
            if colour in PALETTE and shape in SHAPES:
                out.append((colour, shape))
                i += 3
                continue
        raise ValueError(f"not a toy-world prompt: {prompt!r} (expected e.g. 'a red circle')")
    if not out:
        raise ValueError(f"not a toy-world prompt: {prompt!r} (expected e.g. 'a red circle')")
    return out


def shape_mask(shape: str, box: Sequence[float], size: int | tuple[int, int]) -> np.ndarray:
    """Boolean [H, W] mask of a filled shape in `box` (x0, y0, x1, y1), sampled at pixel centres.

    circle: the ellipse inscribed in the box; square: the box; triangle: apex-up, apex at the top-centre
    of the box, base along its bottom edge. The reward draws its templates with this same function.
    """
    h, w = (size, size) if isinstance(size, int) else size
    x0, y0, x1, y1 = (float(v) for v in box)
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    bw, bh = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
    if shape == "square":
        return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    if shape == "circle":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return ((xs - cx) / (bw / 2)) ** 2 + ((ys - cy) / (bh / 2)) ** 2 <= 1.0
    if shape == "triangle":
        cx = (x0 + x1) / 2
        t = (ys - y0) / bh  # 0 at the apex row, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= t * bw / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def sample_scene(
    rng: np.random.Generator,
    specs: Sequence[tuple[str | None, str | None]] = ((None, None),),
    size: int = DEFAULT_SIZE,
    side_range: tuple[float, float] | None = None,
    max_tries: int = 100,
) -> Scene:
    """A random scene with one object per (colour, shape) spec; None picks at random.

    Object side ~ U(side_range) x size (default `SIDE_RANGE` for one object, `MULTI_SIDE_RANGE` for
    several), position uniform so the object lies inside the image. With several objects the whole
    layout is re-drawn until no two boxes overlap (up to `max_tries`).
    """
    if side_range is None:
        side_range = SIDE_RANGE if len(specs) == 1 else MULTI_SIDE_RANGE
    picked = []
    for colour, shape in specs:
        colour = colour if colour is not None else COLOURS[int(rng.integers(len(COLOURS)))]
        shape = shape if shape is not None else SHAPES[int(rng.integers(len(SHAPES)))]
        if colour not in PALETTE or shape not in SHAPES:
            raise ValueError(f"unknown colour/shape {colour!r}/{shape!r}")
        picked.append((colour, shape))
    for _ in range(max_tries):
        objects: list[SceneObject] = []
        for colour, shape in picked:
            side = float(rng.uniform(*side_range)) * size
            x0, y0 = (float(v) for v in rng.uniform(0.0, size - side, size=2))
            objects.append(SceneObject(colour, shape, (x0, y0, x0 + side, y0 + side)))
        if all(not _overlap(a.box, b.box) for i, a in enumerate(objects) for b in objects[i + 1 :]):
            return Scene(objects=tuple(objects), size=size)
    raise ValueError(f"could not place {len(specs)} objects without overlap at size {size}")


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def render(scene: Scene) -> np.ndarray:
    """uint8 [H, W, 3] image of a scene (later objects are drawn over earlier ones)."""
    img = np.empty((scene.size, scene.size, 3), dtype=np.float32)
    img[:] = scene.background
    for o in scene.objects:
        img[shape_mask(o.shape, o.box, scene.size)] = PALETTE[o.colour]
    return np.round(img * 255).astype(np.uint8)


def render_prompt(prompt: str, seed: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Ground-truth render of a prompt; the same (prompt, seed, size) always gives the same image."""
    return render(sample_scene(np.random.default_rng(seed), parse_prompt(prompt), size=size))


def corrupt_caption(prompt: str, rng: np.random.Generator, p: float) -> str:
    """With probability p, return the caption with one wrong attribute (colour or shape, 50/50)
    of one of its objects; otherwise the caption itself. Used to train a deliberately imperfect base."""
    if rng.random() >= p:
        return prompt
    objs = parse_prompt(prompt)
    i = int(rng.integers(len(objs)))
    colour, shape = objs[i]
    if rng.random() < 0.5:
        others = [c for c in COLOURS if c != colour]
        colour = others[int(rng.integers(len(others)))]
    else:
        others = [s for s in SHAPES if s != shape]
        shape = others[int(rng.integers(len(others)))]
    objs[i] = (colour, shape)
    return " and ".join(phrase(c, s) for c, s in objs)


def render_batch(prompts: Sequence[str], seeds: Sequence[int], size: int = DEFAULT_SIZE) -> np.ndarray:
    """uint8 [N, H, W, 3] ground-truth renders."""
    return np.stack([render_prompt(p, s, size) for p, s in zip(prompts, seeds, strict=True)])


def vocabulary() -> list[str]:
    """Every word the grammar can produce (colours, shapes and their plurals, function words)."""
    words = list(GRAMMAR_WORDS) + list(COLOURS) + list(SHAPES) + [plural(s) for s in SHAPES]
    return list(dict.fromkeys(words))
