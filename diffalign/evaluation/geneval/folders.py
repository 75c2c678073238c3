"""GenEval over a folder: every image of a GenEval-layout folder through a detector and the decision rules,
written as the official results.jsonl."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from diffalign.atomic import write_atomic
from diffalign.evaluation.geneval.detectors import Detector
from diffalign.evaluation.geneval.rules import GenEvalOptions, Obj, evaluate_metadata, select_objects
from diffalign.evaluation.layout import read_layout


def evaluate_image(
    path: str | Path,
    metadata: dict,
    detector: Detector,
    color_classifier: Callable[[Image.Image, list[Obj], str], list[str]] | None,
    options: GenEvalOptions = GenEvalOptions(),
) -> dict:
    """One row of results.jsonl in the official layout."""
    image = ImageOps.exif_transpose(Image.open(path))
    image.load()
    raw = detector.detect(image, str(path))
    objects = select_objects(raw, metadata["tag"], options)
    fn = (lambda objs, name: color_classifier(image, objs, name)) if color_classifier is not None else None
    correct, reason = evaluate_metadata(objects, metadata, fn, options)
    return {
        "filename": str(path),
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps({k: [np.asarray(b, dtype=float).tolist() for b, _ in v] for k, v in objects.items()}),
    }


def evaluate_folder(
    image_dir: str | Path,
    detector: Detector,
    color_classifier=None,
    options: GenEvalOptions = GenEvalOptions(),
    outfile: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Score every image of a GenEval-layout folder; optionally write results.jsonl."""
    from tqdm.auto import tqdm

    jobs = [(p, f.metadata) for f in read_layout(image_dir) for p in f.images]
    rows = [evaluate_image(p, m, detector, color_classifier, options) for p, m in tqdm(jobs, desc="GenEval", disable=not progress)]
    if outfile is not None:
        write_results(rows, outfile)
    return rows


def write_results(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_results(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
