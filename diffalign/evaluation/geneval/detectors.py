"""GenEval's detectors and colour classifier.

Detectors sit behind `Detector.detect(image, path) -> {class name: [(box5, mask), ...]}` with box5 =
[x1, y1, x2, y2, score] and mask a bool array of the image's size (or None). The default backend is
transformers' Mask2Former, which is NOT the official detector (the official one is mmdet 2.x Mask2Former
Swin-S with mmdet's weights); reports say so. An mmdet backend is used only when mmdet is importable.
Colours are classified zero-shot with open_clip, as GenEval does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from diffalign.evaluation.geneval.rules import GenEvalOptions, Obj, RawDetections
from diffalign.evaluation.geneval_prompts import COLORS, OBJECT_NAMES

DEFAULT_MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
NOT_OFFICIAL_NOTE = (
    "GenEval detector: transformers Mask2Former ({model}), NOT the official detector (mmdet 2.x Mask2Former "
    "Swin-S, mmdet weights); scores are not directly comparable with published GenEval numbers."
)


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
