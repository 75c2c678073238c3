"""Helpers shared by the built-in scorers: device/dtype resolution, image input conversion, the
per-call text cache, and an offline builder for the real CLIP BPE tokenizer.

Kept free of heavy imports at module level; transformers / open_clip are imported inside functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from diffalign.rewards.base import Images, Scorer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """[3,H,W] float in [0,1] -> RGB PIL, rounding to uint8 the way diffusers saves images."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [3,H,W] (or [1,H,W]), got shape {tuple(image.shape)}")
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy(), mode="L").convert("RGB")
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def as_pil_list(images: Images) -> list[Image.Image]:
    """Images as a list of PIL images (mode untouched: each scorer converts to RGB at the reference's step)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected an image tensor [N,3,H,W], got shape {tuple(images.shape)}")
        return [tensor_to_pil(im) for im in images]
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            out.append(tensor_to_pil(im))
        elif isinstance(im, Image.Image):
            out.append(im)
        else:
            raise TypeError(f"expected PIL images or a tensor, got {type(im).__name__}")
    return out


def pil_to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> [3,H,W] float in [0,1] (torchvision ToTensor semantics) after converting to RGB."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def as_float_list(images: Images) -> list[torch.Tensor]:
    """Images as a list of [3,H,W] float tensors in [0,1], RGB. Tensor inputs are used as given (no
    uint8 round trip); PIL inputs are converted to RGB first (RGBA drops alpha, L is replicated)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected an image tensor [N,3,H,W], got shape {tuple(images.shape)}")
        x = images.detach().float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return list(x)
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            out.append(im.detach().float().expand(3, -1, -1) if im.shape[0] == 1 else im.detach().float())
        else:
            out.append(pil_to_rgb_tensor(im))
    return out


class TextCachingScorer(Scorer):
    """A scorer whose text side can be computed once per distinct prompt.

    During one `score` call, each distinct prompt is encoded once (in one batched call to
    `_encode_prompts`) and reused across image batches, so a prompt shared by many images is encoded
    exactly once whatever `batch_size` is.
    """

    def __init__(self, batch_size: int = 32):
        super().__init__(batch_size=batch_size)
        self._text_cache: dict[str, torch.Tensor] | None = None

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _cached_text(self, prompts: Sequence[str]) -> torch.Tensor:
        cache = self._text_cache if self._text_cache is not None else {}
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            enc = self._encode_prompts(missing)
            for p, e in zip(missing, enc, strict=True):
                cache[p] = e
        return torch.stack([cache[p] for p in prompts])

    @torch.no_grad()
    def score(self, images, prompts):
        self._text_cache = {}
        try:
            return super().score(images, prompts)
        finally:
            self._text_cache = None

    __call__ = score


def is_local(path: str | os.PathLike) -> bool:
    return Path(path).expanduser().exists()


def clip_bpe_tokenizer(model_max_length: int = 77):
    """The real 49,408-token CLIP BPE tokenizer (as a transformers CLIPTokenizer), built offline from the
    `bpe_simple_vocab_16e6.txt.gz` that ships inside open_clip_torch. Same ids as open_clip's
    SimpleTokenizer and the hub CLIP tokenizers for ordinary text."""
    import gzip

    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab_list)},
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )


def resolve_checkpoint_file(checkpoint: str | Path | None, repo: str, filename: str, what: str) -> Path:
    """A third-party checkpoint file: None downloads `filename` from hub `repo`; a folder means the file of
    that name inside it; else the path itself. A missing file is an error naming the path."""
    if checkpoint is None:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename))
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    return path


def load_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A third-party .pt file, loaded with `torch.load(weights_only=True)` (tensors and plain containers
    only, never arbitrary pickled objects); accepts {'state_dict': sd} or a bare state dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
