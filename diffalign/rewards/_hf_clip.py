"""Shared machinery for scorers built on a transformers `CLIPModel` (PickScore, CLIPScore, CLIP-S).

Each scorer = normalised image embedding . normalised text embedding (a cosine), then a scorer-specific
map of the cosine (logit_scale * cos, 100 * max(cos, 0), 2.5 * max(cos, 0)). Only the image transform,
the prompt prefix and that map differ between them.
"""

from __future__ import annotations

import html
from collections.abc import Callable

import torch

from diffalign.rewards._common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TextCachingScorer,
    as_pil_list,
    clip_bpe_tokenizer,
    resolve_device,
    resolve_dtype,
)

CLIP_MAX_LENGTH = 77


def clean_clip_text(text: str) -> str:
    """The text cleaning OpenAI CLIP's `simple_tokenizer` and open_clip's default tokenizer apply before
    BPE (open_clip `tokenizer.py`: basic_clean, whitespace_clean, lower): ftfy.fix_text (mojibake,
    Unicode NFC, and HTML entities when the text holds no literal '<'), then HTML entities unescaped twice
    ("&amp;lt;" -> "<"), whitespace runs collapsed to one space and stripped, and lower case. transformers'
    CLIP tokenizer only normalises whitespace and case, so without this "fish &amp; chips" and
    "fish & chips" get different tokens."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object whose `.pooler_output` is the projected embedding;
    # transformers 4 returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_pil_image_transform(processor) -> Callable[[list], torch.Tensor]:
    """The transformers CLIP image processor on its PIL backend (the path transformers 4.x used, and so
    the path the PickScore / torchmetrics references scored with): RGB convert (alpha dropped), shortest side -> size
    bicubic (long side truncated with int()), centre crop with floor offsets, /255, OpenAI normalise."""
    from transformers import CLIPImageProcessorPil

    if not isinstance(processor, CLIPImageProcessorPil):
        raise TypeError(
            "expected the PIL-backend CLIPImageProcessorPil; transformers 5's default CLIPImageProcessor is "
            f"the torchvision backend, which differs by up to ~0.015 per pixel. Got {type(processor).__name__}"
        )

    def transform(images) -> torch.Tensor:
        # Convert to RGB ourselves: transformers 4.x dropped alpha (`convert("RGB")`), transformers 5
        # composites transparency onto white, which changes scores of RGBA inputs.
        rgb = [im.convert("RGB") for im in as_pil_list(images)]
        return processor(images=rgb, return_tensors="pt")["pixel_values"]

    return transform


def openai_clip_image_transform(size: int) -> Callable[[list], torch.Tensor]:
    """OpenAI `clip.load` preprocessing (torchvision on PIL): Resize(size, bicubic) of the shorter side,
    CenterCrop(size) (rounded offsets), convert RGB, ToTensor, OpenAI normalise. Used by CLIP-S and
    ImageReward, in that order (resize and crop happen before the RGB conversion)."""
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )

    def transform(images) -> torch.Tensor:
        return torch.stack([tf(im) for im in as_pil_list(images)])

    return transform


class HFCLIPScorer(TextCachingScorer):
    """cos(image, prefix + prompt) under a transformers CLIPModel, mapped by `_from_cosine`.

    `clean_text=True` passes prefix + prompt through `clean_clip_text` first, for scorers whose reference
    tokenises with OpenAI CLIP's or open_clip's tokenizer (CLIP-S)."""

    name = "hf-clip"

    def __init__(
        self,
        model,
        tokenizer,
        image_transform: Callable[[list], torch.Tensor],
        device=None,
        dtype=None,
        batch_size: int = 32,
        prefix: str = "",
        max_length: int = CLIP_MAX_LENGTH,
        clean_text: bool = False,
    ):
        super().__init__(batch_size=batch_size)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.prefix = prefix
        self.max_length = max_length
        self.clean_text = clean_text

    # -- the two towers -------------------------------------------------------------------------------
    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        # truncation keeps BOS + first 75 tokens + EOS, so the pooled (EOS) feature stays well defined
        texts = [self.prefix + p for p in prompts]
        if self.clean_text:
            texts = [clean_clip_text(t) for t in texts]
        tok = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        emb = _features(self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def encode_images(self, images) -> torch.Tensor:
        pixels = self.image_transform(images).to(device=self.device, dtype=self.dtype)
        emb = _features(self.model.get_image_features(pixel_values=pixels))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def cosine(self, images, prompts: list[str]) -> torch.Tensor:
        img = self.encode_images(images)
        txt = self._cached_text(prompts).to(img.device)
        return (img * txt).sum(-1)

    def _from_cosine(self, cos: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        return self._from_cosine(self.cosine(images, prompts))


def load_hf_clip(model: str, processor: str | None, dtype: torch.dtype):
    """(CLIPModel, tokenizer, PIL image processor) from hub ids or local folders. Never trust_remote_code."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    processor = processor or model
    clip = CLIPModel.from_pretrained(model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(processor)
    image_processor = CLIPImageProcessorPil.from_pretrained(processor)
    return clip, tokenizer, image_processor


def tiny_clip_components(image_size: int = 64, patch_size: int = 16, hidden: int = 32, seed: int = 0):
    """A random transformers CLIPModel at toy width with the real 49,408-token BPE tokenizer and a PIL
    image processor at `image_size`: the same code paths as ViT-H/14 or ViT-L/14, in milliseconds."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = clip_bpe_tokenizer(CLIP_MAX_LENGTH)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
            hidden_act="gelu",
        ),
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    return model, tokenizer, image_processor


def save_tiny_clip(path, **kwargs) -> None:
    """Write a tiny CLIP as a hub-layout folder (model safetensors + tokenizer + preprocessor config)."""
    model, tokenizer, image_processor = tiny_clip_components(**kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
