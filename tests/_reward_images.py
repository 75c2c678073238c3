"""Deterministic test images for the reward tests (several sizes, aspect ratios and PIL modes)."""

import numpy as np
import torch
from PIL import Image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

# (height, width): square, landscape, portrait, odd sizes, smaller than the model input
SIZES = [(64, 64), (48, 80), (90, 37), (33, 33), (20, 52)]

LONG_PROMPT = " ".join(["a red cat on the blue dog with a painting of the photo"] * 12)  # > 77 / 35 tokens


def make_image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7 * h + w)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    ch = 4 if mode == "RGBA" else 3
    arr = rng.integers(0, 256, (h, w, ch), dtype=np.uint8)
    return Image.fromarray(arr, mode=mode)


def rgb_array(img: Image.Image) -> np.ndarray:
    """[H,W,3] float32 in [0,1] from any PIL mode (RGBA drops alpha, L is replicated)."""
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def normalize(arr_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((arr_hwc - MEAN) / STD).transpose(2, 0, 1).copy()).float()


def quantized_pil(t: torch.Tensor) -> Image.Image:
    """What a [3,H,W] float tensor becomes when saved as a PNG (round to uint8)."""
    arr = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")
