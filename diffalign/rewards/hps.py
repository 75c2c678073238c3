"""HPSv2 / HPSv2.1 (Wu et al. 2023): 100 * cos(image, prompt) under open_clip ViT-H-14 fine-tuned on HPD.

Reference: tgxs002/HPSv2 @ 866735e (hpsv2/img_score.py, evaluation.py, src/open_clip/transform.py).
The checkpoints `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` (hub repo `xswu/HPSv2`) hold
`{'state_dict': <open_clip CLIP keys>}` and are loaded strictly into the upstream open_clip ViT-H-14.
We do not depend on the `hpsv2` PyPI package (broken wheel, old pins).

Preprocessing is HPS's own eval transform (not stock open_clip): convert to RGB, ToTensor FIRST, then
on the float tensor resize the longest side to 224 (bicubic, `antialias=True` chosen explicitly, see
below), zero-pad centred to 224x224 (left/top get pad//2), no crop, OpenAI mean/std.

antialias: the reference calls torchvision's tensor resize without `antialias`, which means False under
torchvision < 0.17 and True from 0.17 on; we fix True (the current behaviour) and record it in
`HPSScorer.antialias`.

Scale: the benchmark convention, cosine * 100 (`hpsv2.score()` itself returns the raw cosine, ~0.2-0.35).
"""

from __future__ import annotations

import torch

from diffalign.rewards._common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TextCachingScorer,
    as_float_list,
    load_torch_state_dict,
    resolve_checkpoint_file,
    resolve_device,
    resolve_dtype,
)
from diffalign.rewards.base import register_scorer

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"
TINY_ARCH = "diffalign-tiny-hps"
#: A toy open_clip config of the same family as ViT-H-14 (GELU, 77-token context, real 49,408 vocab).
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_open_clip_config() -> str:
    """Register TINY_CONFIG with open_clip under TINY_ARCH (idempotent), so the normal factory builds it."""
    from open_clip import factory

    factory._MODEL_CONFIGS.setdefault(TINY_ARCH, TINY_CONFIG)
    return TINY_ARCH


def hps_resize_pad(image: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """HPS `ResizeMaxSize` on a float tensor [..., 3, H, W]: longest side -> size (new dims with Python
    round), torchvision bicubic, then centred zero padding to size x size.

    Departure: when the longest side already equals `size` the reference neither resizes nor pads, so a
    non-square image of that size reached the model at the wrong shape and failed; we still pad it
    (identical to the reference whenever the reference works)."""
    import torchvision.transforms.functional as TF

    h, w = image.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        image = TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=antialias)
    h, w = image.shape[-2:]
    pad_h, pad_w = size - h, size - w
    if pad_h or pad_w:
        image = TF.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return image


class HPSScorer(TextCachingScorer):
    name = "hpsv2"
    antialias = True  # see module docstring

    def __init__(self, model, tokenizer, device=None, dtype=None, batch_size: int = 32, version: str = "v2.1"):
        super().__init__(batch_size=batch_size)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.version = version
        self.name = "hpsv2.1" if version == "v2.1" else "hpsv2"
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self._mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
        self._std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)

    def preprocess(self, images) -> torch.Tensor:
        """-> normalised [N, 3, 224, 224] float32 on the CPU."""
        if isinstance(images, torch.Tensor):  # one size: resize the whole batch in one call
            x = hps_resize_pad(torch.stack(as_float_list(images)), self.image_size, self.antialias)
        else:
            x = torch.stack([hps_resize_pad(im, self.image_size, self.antialias) for im in as_float_list(images)])
        return (x - self._mean) / self._std

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def encode_images(self, images) -> torch.Tensor:
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        img = self.encode_images(images)
        txt = self._cached_text(prompts).to(img.device)
        return 100.0 * (img * txt).sum(-1)


def build_hps_model(arch: str = HPS_ARCH, state_dict: dict | None = None, seed: int = 0):
    """open_clip model `arch` (no pretrained download) + its tokenizer; strict load of `state_dict`."""
    import open_clip

    if arch == TINY_ARCH:
        register_tiny_open_clip_config()
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, precision="fp32", device="cpu")
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)  # raises naming any missing / unexpected key
    return model.eval(), open_clip.get_tokenizer(arch)


def _build(version: str, checkpoint, device, dtype, batch_size, tiny, seed) -> HPSScorer:
    if tiny and checkpoint is None:
        model, tokenizer = build_hps_model(TINY_ARCH, seed=seed)
    else:
        path = resolve_checkpoint_file(checkpoint, HPS_REPO, HPS_FILES[version], f"HPS {version}")
        model, tokenizer = build_hps_model(TINY_ARCH if tiny else HPS_ARCH, load_torch_state_dict(path))
    return HPSScorer(model, tokenizer, device=device, dtype=dtype, batch_size=batch_size, version=version)


@register_scorer("hpsv2")
def build_hpsv2(checkpoint=None, device=None, dtype=None, batch_size: int = 32, tiny: bool = False, seed: int = 0):
    """HPSv2.0. `checkpoint`: None (hub download), a .pt file, or a folder holding HPS_v2_compressed.pt.
    `tiny=True`: toy open_clip model (random, or loaded from `checkpoint` if given)."""
    return _build("v2.0", checkpoint, device, dtype, batch_size, tiny, seed)


@register_scorer("hpsv2.1")
def build_hpsv21(checkpoint=None, device=None, dtype=None, batch_size: int = 32, tiny: bool = False, seed: int = 0):
    """HPSv2.1 (what most recent papers report as "HPS"). Same arguments as `hpsv2`."""
    return _build("v2.1", checkpoint, device, dtype, batch_size, tiny, seed)
