"""GenEval: the official decision rules over object detections (`rules`), the detectors and the colour
classifier (`detectors`), and the folder runner that writes results.jsonl (`folders`).

The rules follow djghosh13/geneval `evaluation/evaluate_images.py`; the default detector is NOT the
official one (see `detectors`), and reports say so. Every public name is importable from here.
"""

from diffalign.evaluation.geneval.detectors import (
    DEFAULT_MASK2FORMER,
    NOT_OFFICIAL_NOTE,
    ColorClassifier,
    Detector,
    Mask2FormerDetector,
    MMDetDetector,
    color_crop,
    mask_to_box,
    mmdet_available,
    register_tiny_open_clip,
)
from diffalign.evaluation.geneval.folders import evaluate_folder, evaluate_image, read_results, write_results
from diffalign.evaluation.geneval.rules import (
    ColorFn,
    GenEvalOptions,
    GenEvalSummary,
    Obj,
    RawDetections,
    box_iou,
    evaluate_metadata,
    relative_position,
    select_objects,
    summarize,
)

__all__ = [
    "DEFAULT_MASK2FORMER",
    "NOT_OFFICIAL_NOTE",
    "ColorClassifier",
    "ColorFn",
    "Detector",
    "GenEvalOptions",
    "GenEvalSummary",
    "MMDetDetector",
    "Mask2FormerDetector",
    "Obj",
    "RawDetections",
    "box_iou",
    "color_crop",
    "evaluate_folder",
    "evaluate_image",
    "evaluate_metadata",
    "mask_to_box",
    "mmdet_available",
    "read_results",
    "register_tiny_open_clip",
    "relative_position",
    "select_objects",
    "summarize",
    "write_results",
]
