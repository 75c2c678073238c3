"""The toy world's programmatic reward: the scorer "toy" (and "toy_<field>"), registered by lazy name in
diffalign.rewards so that the rewards package never imports the toy world.

Per image, against the single object its prompt asks for ("a {colour} {shape}"):

1. foreground = pixels whose max channel > 0.4 (`FG_THRESHOLD`); the object is the largest
   4-connected foreground component (ties: the first in raster order);
2. colour: the mean RGB of the component's pixels; the predicted colour is the nearest palette colour,
   and `colour_prob` = softmax(-distance / 0.1) of the target colour over the 6 palette colours;
3. shape: the component is compared with circle / square / triangle templates drawn (with the
   renderer's own `shape_mask`) in its bounding box; `iou` = the target template's IoU, `shape_prob` =
   softmax(IoU / 0.05) of the target shape; the predicted shape is the best IoU, and the shape counts as
   correct only when the target's IoU is strictly the best (an ambiguous blob is not a circle);
4. cleanliness in [0, 1]: every pixel outside the component is "dirt" in proportion to its brightness,
   dirt = clip((max channel - 0.05) / (0.4 - 0.05), 0, 1), so a speckle just under the foreground
   threshold counts almost fully and extra blobs count fully; cleanliness = clip(1 - mean dirt / 0.1,
   0, 1): it reaches 0 when the background is on average 10% dirty. A rendered image scores 1.

score = colour_prob + shape_prob + iou x cleanliness, in [0, 3]. `correct` = colour AND shape right
(cleanliness is reported, not part of `correct`). An image with no foreground scores 0 and is not correct.

`toy_reward_details(images, prompts)` returns every field per image (for the eval suite); the scorer's
`score` returns the continuous score. Vectorised numpy + scipy.ndimage over the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage

from diffalign.rewards.base import Images, Prompts, Scorer
from diffalign.toy.world import COLOURS, PALETTE, SHAPES, parse_prompt, shape_mask

FG_THRESHOLD = 0.4
COLOUR_TEMPERATURE = 0.1
SHAPE_TEMPERATURE = 0.05
DIRT_FLOOR = 0.05
DIRT_SCALE = 0.1

_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # [6, 3]
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)  # 4-connectivity inside each image, none across the batch
_STRUCTURE[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def to_numpy_images(images: Images | np.ndarray) -> np.ndarray:
    """float32 [N, H, W, 3] in [0, 1] from PIL images, a [N, 3, H, W] float tensor in [0, 1], or a
    uint8 / float numpy array [N, H, W, 3]."""
    if isinstance(images, torch.Tensor):
        return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = (
            np.stack([np.asarray(im.convert("RGB")) for im in images])
            if len(images)
            else np.zeros((0, 1, 1, 3))
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)


@lru_cache(maxsize=4096)
def _templates(h: int, w: int) -> np.ndarray:
    """bool [3, h, w]: circle, square, triangle filling an h x w box."""
    return np.stack([shape_mask(s, (0, 0, w, h), (h, w)) for s in SHAPES])


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def toy_reward_details(images: Images | np.ndarray, prompts: Prompts) -> dict[str, np.ndarray]:
    """All reward fields per image: score, correct, colour_correct, shape_correct, cleanliness,
    colour_prob, shape_prob, iou (target template), pred_colour, pred_shape (str; "" when empty),
    fg_fraction (the object's share of the image). Arrays of length N."""
    n = len(images)
    prompt_list = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompt_list) != n:
        raise ValueError(f"toy reward: got {n} images but {len(prompt_list)} prompts")
    if isinstance(images, (list, tuple)) and len({im.size for im in images}) > 1:
        return _by_size(images, prompt_list)
    x = to_numpy_images(images)
    targets = []
    for p in prompt_list:
        objs = parse_prompt(p)
        if len(objs) != 1:
            raise NotImplementedError(f"the toy reward scores single-object prompts only, got {p!r}")
        targets.append(objs[0])
    t_colour = np.array([COLOURS.index(c) for c, _ in targets], dtype=np.int64)
    t_shape = np.array([SHAPES.index(s) for _, s in targets], dtype=np.int64)
    if n == 0:
        empty = np.zeros(0, dtype=np.float32)
        return (
            {k: empty for k in ("score", "cleanliness", "colour_prob", "shape_prob", "iou", "fg_fraction")}
            | {k: np.zeros(0, dtype=bool) for k in ("correct", "colour_correct", "shape_correct")}
            | {"pred_colour": np.zeros(0, dtype=object), "pred_shape": np.zeros(0, dtype=object)}
        )

    h, w = x.shape[1:3]
    mx = x.max(-1)  # [N, H, W]
    labels, nlab = ndimage.label(mx > FG_THRESHOLD, structure=_STRUCTURE)
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=nlab + 1)
    img_of = np.zeros(nlab + 1, dtype=np.int64)
    img_of[flat] = np.repeat(np.arange(n), h * w)
    best_label = np.zeros(n, dtype=np.int64)
    if nlab:
        lab = np.arange(1, nlab + 1)
        # Largest component per image; among equal sizes the lowest label (first in raster order).
        order = np.lexsort((lab, -counts[1:], img_of[1:]))
        first = np.ones(nlab, dtype=bool)
        first[1:] = img_of[1:][order][1:] != img_of[1:][order][:-1]
        chosen = lab[order][first]
        best_label[img_of[chosen]] = chosen
    has_fg = best_label > 0
    comp = (labels == best_label[:, None, None]) & has_fg[:, None, None]  # [N, H, W]
    size = comp.sum((1, 2)).astype(np.float32)

    # Colour.
    mean_rgb = (x * comp[..., None]).sum((1, 2)) / np.maximum(size, 1)[:, None]
    dist = np.linalg.norm(mean_rgb[:, None, :] - _PALETTE[None], axis=-1)  # [N, 6]
    colour_p = _softmax(-dist / COLOUR_TEMPERATURE)
    pred_c = dist.argmin(-1)
    colour_prob = np.where(has_fg, colour_p[np.arange(n), t_colour], 0.0)

    # Shape: IoU with each template in the component's bounding box.
    ious = np.zeros((n, len(SHAPES)), dtype=np.float32)
    slices = ndimage.find_objects(labels)
    for i in np.flatnonzero(has_fg):
        sl = slices[best_label[i] - 1]
        crop = comp[i][sl[1], sl[2]]
        tmpl = _templates(crop.shape[0], crop.shape[1])
        inter = (tmpl & crop).sum((1, 2))
        union = (tmpl | crop).sum((1, 2))
        ious[i] = inter / np.maximum(union, 1)
    shape_p = _softmax(ious / SHAPE_TEMPERATURE)
    shape_prob = np.where(has_fg, shape_p[np.arange(n), t_shape], 0.0)
    iou_t = ious[np.arange(n), t_shape]
    others = ious.copy()
    others[np.arange(n), t_shape] = -1.0
    shape_ok = has_fg & (iou_t > others.max(-1))
    colour_ok = has_fg & (pred_c == t_colour)

    # Background cleanliness.
    dirt = np.clip((mx - DIRT_FLOOR) / (FG_THRESHOLD - DIRT_FLOOR), 0.0, 1.0)
    bg = ~comp
    mean_dirt = (dirt * bg).sum((1, 2)) / np.maximum(bg.sum((1, 2)), 1)
    cleanliness = np.clip(1.0 - mean_dirt / DIRT_SCALE, 0.0, 1.0)

    score = colour_prob + shape_prob + iou_t * cleanliness
    return {
        "score": score.astype(np.float32),
        "correct": colour_ok & shape_ok,
        "colour_correct": colour_ok,
        "shape_correct": shape_ok,
        "cleanliness": cleanliness.astype(np.float32),
        "colour_prob": colour_prob.astype(np.float32),
        "shape_prob": shape_prob.astype(np.float32),
        "iou": iou_t.astype(np.float32),
        "pred_colour": np.array(
            [COLOURS[c] if f else "" for c, f in zip(pred_c, has_fg, strict=True)], dtype=object
        ),
        "pred_shape": np.array(
            [SHAPES[s] if f else "" for s, f in zip(ious.argmax(-1), has_fg, strict=True)], dtype=object
        ),
        "fg_fraction": (size / (h * w)).astype(np.float32),
    }


def _by_size(images, prompts: list[str]) -> dict[str, np.ndarray]:
    """Images of several sizes: score each size group as one batch and put the fields back in order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    out: dict[str, np.ndarray] = {}
    for idx in groups.values():
        part = toy_reward_details([images[i] for i in idx], [prompts[i] for i in idx])
        for key, value in part.items():
            if key not in out:
                out[key] = np.empty(len(images), dtype=value.dtype)
            out[key][idx] = value
    return out


class ToyScorer(Scorer):
    """The toy world's reward as a Scorer: score in [0, 3], higher is better (see module docstring)."""

    name = "toy"

    def __init__(self, batch_size: int = 1024, device: str | None = None):
        # `device` is accepted (and ignored: numpy on CPU) so configs can pass it to every scorer alike.
        super().__init__(batch_size=batch_size)

    def _score_batch(self, images: Images, prompts: list[str]) -> torch.Tensor:
        return torch.from_numpy(toy_reward_details(images, prompts)["score"])

    def details(self, images: Images | np.ndarray, prompts: Prompts) -> dict[str, np.ndarray]:
        return toy_reward_details(images, prompts)


#: per-image fields of `toy_reward_details` exposed as scorers "toy_<field>" (correct/colour/shape as
#: 0/1, so their mean is an accuracy and a paired McNemar test applies; cleanliness in [0, 1]); their names
#: are registered in diffalign.rewards.LAZY_SCORERS (tests/test_toy_reward.py checks the two agree)
FIELD_SCORERS = ("correct", "colour_correct", "shape_correct", "cleanliness")


class ToyFieldScorer(ToyScorer):
    """One field of the toy reward as a scorer, e.g. "toy_correct" (1.0 = the image follows its prompt)."""

    def __init__(self, field: str, batch_size: int = 1024, device: str | None = None):
        if field not in FIELD_SCORERS:
            raise ValueError(f"unknown toy reward field {field!r}; expected one of {FIELD_SCORERS}")
        super().__init__(batch_size=batch_size)
        self.field = field
        self.name = f"toy_{field}"
        self.binary = field != "cleanliness"

    def _score_batch(self, images: Images, prompts: list[str]) -> torch.Tensor:
        return torch.from_numpy(toy_reward_details(images, prompts)[self.field].astype(np.float32))


def accuracy_on_ground_truth(
    num: int = 1800, size: int = 16, seed: int = 0, prompts: Sequence[str] | None = None
) -> dict[str, float]:
    """Reward accuracy on rendered ground truth: `num` renders cycling through the prompts."""
    from diffalign.toy.world import all_prompts, render_batch

    prompts = list(prompts or all_prompts())
    ps = [prompts[i % len(prompts)] for i in range(num)]
    seeds = [seed * 1_000_003 + i for i in range(num)]
    d = toy_reward_details(render_batch(ps, seeds, size), ps)
    return {
        "accuracy": float(d["correct"].mean()),
        "colour_accuracy": float(d["colour_correct"].mean()),
        "shape_accuracy": float(d["shape_correct"].mean()),
        "mean_score": float(d["score"].mean()),
        "min_cleanliness": float(d["cleanliness"].min()),
    }
