"""GenEval's decision rules, pure functions of detections: the official logic of djghosh13/geneval
`evaluation/evaluate_images.py`.

Per class keep detections scoring above 0.3 (0.9 in counting prompts), at most 16, most confident first;
`include` clauses are ANDed and need `count` objects (of the right colour, at the right relative
position), `exclude` clauses are ORed and fail at `count` or more objects. The summary is the unweighted
mean of the six per-task image accuracies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from diffalign.evaluation.geneval_prompts import COLORS, TASKS

Obj = tuple[np.ndarray, "np.ndarray | None"]  # (box5, mask)
RawDetections = dict[str, list[Obj]]


@dataclass(frozen=True)
class GenEvalOptions:
    """The official defaults (evaluate_images.py `--options`)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # NMS IoU limit; 1.0 disables NMS
    position_threshold: float = 0.1
    bgcolor: str = "#999"  # background behind the object mask for colour crops; "original" keeps the image
    crop: bool = True


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with the +1-pixel area convention of the reference."""

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_objects(raw: RawDetections, tag: str, options: GenEvalOptions = GenEvalOptions()) -> RawDetections:
    """Per class: sort by score (highest first), keep scores > threshold, keep at most max_objects, then
    greedy NMS at max_overlap (disabled at 1.0). Classes with nothing left are dropped."""
    thr = options.counting_threshold if tag == "counting" else options.threshold
    out: RawDetections = {}
    for name, objs in raw.items():
        if not objs:
            continue
        # Keep the detector's dtype (float32): the reference compares float32 scores with the threshold.
        scores = np.array([box[4] for box, _ in objs])
        order = np.argsort(scores)[::-1]
        order = order[scores[order] > thr][: options.max_objects].tolist()
        kept = []
        while order:
            best = order.pop(0)
            kept.append(objs[best])
            if options.max_overlap < 1:
                order = [o for o in order if box_iou(objs[best][0], objs[o][0]) < options.max_overlap]
        if kept:
            out[name] = kept
    return out


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Relations of A relative to B ("left of", "right of", "above", "below"; image y points down).

    The centre offset is shrunk per axis by threshold * (size of A + size of B); the shrunk offset divided
    by the length of the raw offset must pass 0.5 in a direction for that relation to hold."""
    a = np.asarray(box_a[:4], dtype=np.float64)
    b = np.asarray(box_b[:4], dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    size_sum = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - threshold * size_sum, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


ColorFn = Callable[[list[Obj], str], list[str]]


def evaluate_metadata(
    objects: RawDetections, metadata: dict, classify_colors: ColorFn | None = None, options: GenEvalOptions = GenEvalOptions()
) -> tuple[bool, str]:
    """Decide one image. `objects` come from `select_objects` (sorted, most confident first);
    `classify_colors(objs, class_name)` returns one colour name per object."""
    correct = True
    reasons: list[str] = []
    groups: list[list[Obj] | None] = []  # objects matched per include clause (None when it failed)
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                if classify_colors is None:
                    raise ValueError("this prompt needs a colour classifier")
                colors = classify_colors(found, name)
                hits = colors.count(req["color"])
                if hits < count:
                    ok = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {name}>={count}, found {hits} {req['color']}; and {seen}")
            if "position" in req and ok:
                rel, target = req["position"]
                targets = groups[target]
                if targets is None:
                    ok = False
                    reasons.append(f"no target for {name} to be {rel}")
                else:
                    for obj in found:
                        for tgt in targets:
                            actual = relative_position(obj[0], tgt[0], options.position_threshold)
                            if rel not in actual:
                                ok = False
                                reasons.append(f"expected {name} {rel} target, found {' and '.join(sorted(actual))} target")
                                break
                        if not ok:
                            break
        correct = correct and ok
        groups.append(found if ok else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], req["count"]
        n = len(objects.get(name, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {n}")
    return correct, "\n".join(reasons)


@dataclass
class GenEvalSummary:
    total_images: int
    total_prompts: int
    correct_images: float  # fraction of images judged correct
    correct_prompts: float  # fraction of prompts with at least one correct image
    tasks: dict[str, dict]  # tag -> {"accuracy", "correct", "images"}
    overall: float  # unweighted mean of the per-task image accuracies

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(rows: list[dict]) -> GenEvalSummary:
    """The official summary: prompts are grouped by their metadata string; overall = mean over tasks."""
    if not rows:
        raise ValueError("no GenEval results to summarise")
    by_prompt: dict[str, bool] = {}
    by_task: dict[str, list[bool]] = {}
    for r in rows:
        by_prompt[r["metadata"]] = by_prompt.get(r["metadata"], False) or bool(r["correct"])
        by_task.setdefault(r["tag"], []).append(bool(r["correct"]))
    order = [t for t in TASKS if t in by_task] + [t for t in by_task if t not in TASKS]
    tasks = {t: {"accuracy": sum(by_task[t]) / len(by_task[t]), "correct": sum(by_task[t]), "images": len(by_task[t])} for t in order}
    return GenEvalSummary(
        total_images=len(rows),
        total_prompts=len(by_prompt),
        correct_images=sum(bool(r["correct"]) for r in rows) / len(rows),
        correct_prompts=sum(by_prompt.values()) / len(by_prompt),
        tasks=tasks,
        overall=float(np.mean([v["accuracy"] for v in tasks.values()])),
    )
