"""GenEval's 553 prompts, regenerated from the published recipe.

The official suite (djghosh13/geneval, prompts/) was made by one numpy Generator seeded 43 that draws, in
a fixed order, the objects, counts, colours and relations of six tasks; duplicates are then dropped. This
module makes the same random calls in the same order, so with the defaults it reproduces the official
`evaluation_metadata.jsonl` and `generation_prompts.txt` byte for byte (checked by a hash in the tests).
The recipe is described in docs/metrics.md (sec. 5); no official code is copied here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: The 80 COCO classes in the detector's class-index order (GenEval's object_names.txt).
OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

#: The ten colour names, in the order used both for prompt sampling and for the colour classifier.
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

GENEVAL_SEED = 43
GENEVAL_PER_TASK = 100


def _article(word: str) -> str:
    # GenEval's rule looks only at the first letter (so "an orange ..." but "a umbrella" never arises).
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(word: str) -> str:
    # Deliberately naive, as in the official suite ("buses", "sheeps", "knifes").
    return word + ("es" if word.endswith("s") else "s")


def _inc(name: str, count: int = 1, **extra) -> dict:
    return {"class": name, "count": count, **extra}


def generate_geneval_metadata(seed: int = GENEVAL_SEED, per_task: int = GENEVAL_PER_TASK) -> list[dict]:
    """The GenEval prompt metadata: a list of dicts with keys tag, include, [exclude], prompt.

    The draw order matters for byte-identity: all single-object draws, then each task's loop in turn.
    """
    rng = np.random.default_rng(seed)
    names = OBJECT_NAMES
    n = len(names)
    # Colour prompts never use 'person': draw from the other 79 and rotate past its index.
    person = names.index("person")
    out: list[dict] = []

    for i in rng.choice(n, size=n, replace=False):
        out.append({"tag": "single_object", "include": [_inc(names[i])], "prompt": f"a photo of {_article(names[i])}"})

    for _ in range(per_task):
        a, b = rng.choice(n, size=2, replace=False)
        out.append({
            "tag": "two_object",
            "include": [_inc(names[a]), _inc(names[b])],
            "prompt": f"a photo of {_article(names[a])} and {_article(names[b])}",
        })  # fmt: skip

    for _ in range(per_task):
        i = rng.choice(n)
        k = int(rng.integers(2, 4, endpoint=True))
        out.append({
            "tag": "counting",
            "include": [_inc(names[i], k)],
            "exclude": [_inc(names[i], k + 1)],
            "prompt": f"a photo of {NUMBER_WORDS[k]} {_plural(names[i])}",
        })  # fmt: skip

    for _ in range(per_task):
        i = (rng.choice(n - 1) + 1 + person) % n
        color = COLORS[rng.choice(len(COLORS))]
        out.append({
            "tag": "colors",
            "include": [_inc(names[i], 1, color=color)],
            "prompt": f"a photo of {_article(color)} {names[i]}",
        })  # fmt: skip

    for _ in range(per_task):
        a, b = rng.choice(n, size=2, replace=False)
        rel = POSITIONS[rng.choice(len(POSITIONS))]
        out.append({
            "tag": "position",
            # include[0] is the reference object; include[1] must stand `rel` of include-group 0.
            "include": [_inc(names[b]), _inc(names[a], 1, position=[rel, 0])],
            "prompt": f"a photo of {_article(names[a])} {rel} {_article(names[b])}",
        })  # fmt: skip

    for _ in range(per_task):
        a, b = (rng.choice(n - 1, size=2, replace=False) + 1 + person) % n
        ca, cb = rng.choice(len(COLORS), size=2, replace=False)
        out.append({
            "tag": "color_attr",
            "include": [_inc(names[a], 1, color=COLORS[ca]), _inc(names[b], 1, color=COLORS[cb])],
            "prompt": f"a photo of {_article(COLORS[ca])} {names[a]} and {_article(COLORS[cb])} {names[b]}",
        })  # fmt: skip

    unique, seen = [], set()
    for sample in out:
        key = json.dumps(sample)  # structural equality; key order is fixed above
        if key not in seen:
            seen.add(key)
            unique.append(sample)
    return unique


def metadata_jsonl(samples: list[dict]) -> str:
    """The text of evaluation_metadata.jsonl (json.dumps with default separators, one per line)."""
    return "".join(json.dumps(s) + "\n" for s in samples)


def prompts_txt(samples: list[dict]) -> str:
    """The text of generation_prompts.txt."""
    return "".join(s["prompt"] + "\n" for s in samples)


def write_geneval_prompts(out_dir: str | Path, seed: int = GENEVAL_SEED, per_task: int = GENEVAL_PER_TASK) -> Path:
    """Write evaluation_metadata.jsonl and generation_prompts.txt into out_dir (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = generate_geneval_metadata(seed, per_task)
    (out_dir / "evaluation_metadata.jsonl").write_text(metadata_jsonl(samples), encoding="utf-8")
    (out_dir / "generation_prompts.txt").write_text(prompts_txt(samples), encoding="utf-8")
    return out_dir
