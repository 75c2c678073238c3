"""GenEval: the official decision rules over object detections, a colour classifier and detector backends.

The decision logic follows djghosh13/geneval `evaluation/evaluate_images.py` (facts in docs/metrics.md,
sec. 5): per class keep detections scoring above 0.3 (0.9 in counting prompts), at most 16, most confident
first; `include` clauses are ANDed and need `count` objects (of the right colour, at the right relative
position), `exclude` clauses are ORed and fail at `count` or more objects. The summary is the unweighted
mean of the six per-task image accuracies.

Detectors sit behind `Detector.detect(image, path) -> {class name: [(box5, mask), ...]}` with box5 =
[x1, y1, x2, y2, score] and mask a bool array of the image's size (or None). The default backend is
transformers' Mask2Former, which is NOT the official detector (the official one is mmdet 2.x Mask2Former
Swin-S with mmdet's weights); reports say so. An mmdet backend is used only when mmdet is importable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from diffalign.atomic import write_atomic
from diffalign.evaluation.geneval_prompts import COLORS, OBJECT_NAMES, TASKS
from diffalign.evaluation.layout import read_layout

Obj = tuple[np.ndarray, "np.ndarray | None"]  # (box5, mask)
RawDetections = dict[str, list[Obj]]

DEFAULT_MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
NOT_OFFICIAL_NOTE = (
    "GenEval detector: transformers Mask2Former ({model}), NOT the official detector (mmdet 2.x Mask2Former "
    "Swin-S, mmdet weights); scores are not directly comparable with published GenEval numbers."
)


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


# ----------------------------------------------------------------------------------------- decision rules


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


# ----------------------------------------------------------------------------------------- colour


def color_crop(image: Image.Image, box: Sequence[float], mask: np.ndarray | None, bgcolor: str = "#999", crop: bool = True) -> Image.Image:
    """The object pasted over a flat background (through its mask), cropped to its box."""
    image = image.convert("RGB")
    if mask is not None:
        if tuple(mask.shape) != (image.height, image.width):
            raise ValueError(f"mask shape {mask.shape} does not match image size {image.size[::-1]}")
        blank = image.copy() if bgcolor == "original" else Image.new("RGB", image.size, color=bgcolor)
        image = Image.composite(image, blank, Image.fromarray(np.asarray(mask, dtype=bool)))
    if crop:
        image = image.crop(tuple(float(v) for v in box[:4]))
    return image


class ColorClassifier:
    """Zero-shot colour classification with an open_clip model (GenEval: ViT-L-14, OpenAI weights).

    Per object class, a text classifier is the re-normalised mean of the normalised embeddings of three
    templates per colour; an object's colour is the argmax of 100 * cosine over the ten colours."""

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str | None = "openai",
        device: str = "cpu",
        amp: bool | None = None,
        batch_size: int = 16,
        options: GenEvalOptions = GenEvalOptions(),
    ):
        import open_clip
        import torch

        self.device = device
        self.amp = (str(device).startswith("cuda")) if amp is None else amp
        self.batch_size = batch_size
        self.options = options
        self.model, _, self.transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._torch = torch
        self._classifiers: dict[str, object] = {}

    @staticmethod
    def templates(class_name: str) -> list[str]:
        return [f"a photo of a {{c}} {class_name}", f"a photo of a {{c}}-colored {class_name}", "a photo of a {c} object"]

    def _autocast(self):
        torch = self._torch
        return torch.autocast(device_type="cuda", dtype=torch.float16) if self.amp else torch.autocast("cpu", enabled=False)

    def text_classifier(self, class_name: str):
        torch = self._torch
        if class_name not in self._classifiers:
            cols = []
            with torch.no_grad(), self._autocast():
                for color in COLORS:
                    tokens = self.tokenizer([t.format(c=color) for t in self.templates(class_name)]).to(self.device)
                    emb = self.model.encode_text(tokens).float()
                    emb = emb / emb.norm(dim=-1, keepdim=True)
                    emb = emb.mean(dim=0)
                    cols.append(emb / emb.norm())
            self._classifiers[class_name] = torch.stack(cols, dim=1)  # [D, colours]
        return self._classifiers[class_name]

    def logits(self, crops: list[Image.Image], class_name: str):
        torch = self._torch
        clf = self.text_classifier(class_name)
        out = []
        with torch.no_grad(), self._autocast():
            for i in range(0, len(crops), self.batch_size):
                x = torch.stack([self.transform(c) for c in crops[i : i + self.batch_size]]).to(self.device)
                feats = self.model.encode_image(x).float()
                feats = feats / feats.norm(dim=-1, keepdim=True)
                out.append(100.0 * feats @ clf)
        return torch.cat(out)

    def __call__(self, image: Image.Image, objs: list[Obj], class_name: str) -> list[str]:
        crops = [color_crop(image, box, mask, self.options.bgcolor, self.options.crop) for box, mask in objs]
        return [COLORS[i] for i in self.logits(crops, class_name).argmax(dim=1).tolist()]


def register_tiny_open_clip(name: str = "diffalign-tiny-clip") -> str:
    """Register a tiny random open_clip config (for tests): real tokenizer, 32-pixel ViT, width 32."""
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    return name


# ----------------------------------------------------------------------------------------- detectors


class Detector:
    """Interface: detections for one image, per GenEval class name."""

    name = "detector"
    official = False

    def detect(self, image: Image.Image, path: str | None = None) -> RawDetections:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """[x1, y1, x2, y2] of a bool mask, with the exclusive right/bottom edge (x_max + 1); zeros if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=np.float32)


class Mask2FormerDetector(Detector):
    """transformers Mask2Former (COCO instance segmentation). Loaded lazily on the first image.

    Pre- and post-processing follow the mmdet test pipeline the official GenEval uses: keep-ratio resize to
    fit (1333, 800), ImageNet mean/std, zero-pad to a multiple of 32; top-100 (query, class) pairs by class
    probability (no-object column dropped); masks = logits > 0 at the original size; score = class
    probability x mean sigmoid inside the mask; box = the mask's extent. Class index i is OBJECT_NAMES[i]
    (both are the 80 COCO classes in COCO order)."""

    name = "mask2former-transformers"
    official = False
    MEAN = (123.675, 116.28, 103.53)
    STD = (58.395, 57.12, 57.375)

    def __init__(
        self,
        model: str | object = DEFAULT_MASK2FORMER,
        device: str = "cpu",
        dtype: str = "float32",
        scale: tuple[int, int] = (1333, 800),
        max_per_image: int = 100,
        size_divisor: int = 32,
    ):
        self._model = None if isinstance(model, str) else model
        self.model_id = model if isinstance(model, str) else type(model).__name__
        self.device = device
        self.dtype = dtype
        self.scale = scale
        self.max_per_image = max_per_image
        self.size_divisor = size_divisor
        if self._model is not None:
            self._check(self._model)

    def describe(self) -> str:
        return NOT_OFFICIAL_NOTE.format(model=self.model_id)

    @staticmethod
    def _check(model) -> None:
        n = model.config.num_labels
        if n != len(OBJECT_NAMES):
            raise ValueError(f"GenEval needs a COCO instance model with 80 classes; this one has {n}")
        first = str(getattr(model.config, "id2label", {}).get(0, "person")).lower()
        if first not in ("person", "label_0"):
            import warnings

            warnings.warn(f"detector class 0 is {first!r}, not 'person': is it in COCO order?", stacklevel=2)

    @property
    def model(self):
        if self._model is None:
            import torch
            from transformers import Mask2FormerForUniversalSegmentation

            try:
                model = Mask2FormerForUniversalSegmentation.from_pretrained(self.model_id, torch_dtype=getattr(torch, self.dtype))
            except OSError as e:
                raise FileNotFoundError(
                    f"could not load the Mask2Former detector {self.model_id!r} (download it once with network access "
                    f"or pass a local folder with --detector-model): {e}"
                ) from e
            self._check(model)
            self._model = model.to(self.device).eval()
        return self._model

    def preprocess(self, image: Image.Image):
        import torch

        w, h = image.size
        long_edge, short_edge = max(self.scale), min(self.scale)
        s = min(long_edge / max(w, h), short_edge / min(w, h))
        nw, nh = int(w * s + 0.5), int(h * s + 0.5)
        img = image.convert("RGB").resize((nw, nh), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
        x = (x - torch.tensor(self.MEAN).view(3, 1, 1)) / torch.tensor(self.STD).view(3, 1, 1)
        d = self.size_divisor
        ph, pw = -(-nh // d) * d, -(-nw // d) * d
        pixels = torch.zeros(1, 3, ph, pw)
        pixels[0, :, :nh, :nw] = x
        pixel_mask = torch.zeros(1, ph, pw, dtype=torch.long)
        pixel_mask[0, :nh, :nw] = 1
        return pixels, pixel_mask, (nh, nw)

    def detect(self, image: Image.Image, path: str | None = None) -> RawDetections:
        import torch
        import torch.nn.functional as F

        model = self.model
        param = next(model.parameters())
        pixels, pixel_mask, (nh, nw) = self.preprocess(image)
        with torch.no_grad():
            out = model(pixel_values=pixels.to(param.device, param.dtype), pixel_mask=pixel_mask.to(param.device))
            probs = out.class_queries_logits[0].float().softmax(-1)[:, :-1]  # [Q, C]
            n_cls = probs.shape[1]
            k = min(self.max_per_image, probs.numel())
            top_scores, top_idx = probs.flatten().topk(k)
            labels, queries = top_idx % n_cls, top_idx // n_cls
            masks = out.masks_queries_logits[0].float()[queries][None]  # [1, k, h, w]
            masks = F.interpolate(masks, size=pixels.shape[-2:], mode="bilinear", align_corners=False)[..., :nh, :nw]
            masks = F.interpolate(masks, size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
            binary = masks > 0
            mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            scores = (top_scores * mask_scores).cpu().numpy()
        binary = binary.cpu().numpy()
        result: RawDetections = {}
        for j, lab in enumerate(labels.tolist()):
            box = np.concatenate([mask_to_box(binary[j]), np.array([scores[j]], dtype=np.float32)])
            result.setdefault(OBJECT_NAMES[lab], []).append((box, binary[j]))
        return result


class MMDetDetector(Detector):
    """The official detector (mmdet 2.x Mask2Former Swin-S). Needs mmdet + mmcv-full with CUDA ops;
    only constructed when mmdet is importable."""

    name = "mask2former-mmdet"
    official = True

    def __init__(self, config: str, checkpoint: str, device: str = "cuda"):
        try:
            from mmdet.apis import init_detector
        except ImportError as e:
            raise ImportError(
                "the official GenEval detector needs mmdet 2.x and mmcv-full (see docs/evaluation.md); "
                "use --detector mask2former for the transformers backend"
            ) from e
        self.model = init_detector(config, checkpoint, device=device)

    def describe(self) -> str:
        return "GenEval detector: mmdet Mask2Former (official)"

    def detect(self, image: Image.Image, path: str | None = None) -> RawDetections:
        from mmdet.apis import inference_detector

        src = path if path is not None else np.asarray(image.convert("RGB"))[:, :, ::-1]  # mmdet wants BGR arrays
        res = inference_detector(self.model, src)
        bbox, segm = (res[0], res[1] if len(res) > 1 else None) if isinstance(res, tuple) else (res, None)
        out: RawDetections = {}
        for i, name in enumerate(OBJECT_NAMES):
            out[name] = [(np.asarray(bbox[i][j]), None if segm is None else np.asarray(segm[i][j], dtype=bool)) for j in range(len(bbox[i]))]
        return out


def mmdet_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mmdet") is not None


# ----------------------------------------------------------------------------------------- folders and summary


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
