"""CLIP score, in the two conventions papers mix up (always say which one you report).

- `clipscore`: the torchmetrics convention, 100 * cos(image, prompt) with `openai/clip-vit-large-patch14`,
  clamped at 0 (per image here; torchmetrics clamps the mean, identical unless some cosines are negative).
  Images go through the model's CLIP image processor (PIL backend, as transformers 4 did).
- `clip-s`: the original CLIP-S of Hessel et al. 2021 (jmhessel/clipscore), 2.5 * max(cos, 0) with
  `openai/clip-vit-base-patch32`, the text prefixed with "A photo depicts ", OpenAI `clip.load`
  preprocessing (torchvision Resize + CenterCrop on PIL). The text is cleaned as OpenAI's
  `clip.tokenize` cleans it (`clean_clip_text`: ftfy, HTML entities, whitespace), so "fish &amp; chips"
  scores exactly as "fish & chips". `clipscore` does not clean by default: its reference, torchmetrics,
  tokenises with transformers' CLIP tokenizer, which does not either (`clean_text=True` turns it on).

Computed directly: torchmetrics' CLIPScore breaks on transformers 5 and loads its model at construction.
"""

from __future__ import annotations

import torch

from diffalign.rewards._common import resolve_dtype
from diffalign.rewards._hf_clip import (
    HFCLIPScorer,
    hf_pil_image_transform,
    load_hf_clip,
    openai_clip_image_transform,
    tiny_clip_components,
)
from diffalign.rewards.base import register_scorer

CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"
CLIP_S_MODEL = "openai/clip-vit-base-patch32"
CLIP_S_PREFIX = "A photo depicts "


class CLIPScoreScorer(HFCLIPScorer):
    """torchmetrics-style CLIPScore: 100 * max(cos, 0).

    Departure from torchmetrics for prompts over 77 tokens: torchmetrics slices the token ids to 77,
    dropping the end token, so CLIP pools the wrong token: the start token (a feature that does not depend
    on the prompt, so every long prompt gets the same text feature) when the config has the corrected
    end-token id, or the largest-id token when it has the legacy id 2. We truncate keeping the end token
    (as `clip.tokenize(truncate=True)` does), so the score depends on the first 75 prompt tokens
    (docs/rewards.md)."""

    name = "clipscore"

    def _from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return 100.0 * cos.clamp(min=0)


class CLIPSScorer(HFCLIPScorer):
    """Original CLIP-S: 2.5 * max(cos, 0) with the "A photo depicts " prefix."""

    name = "clip-s"

    def _from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return 2.5 * cos.clamp(min=0)


@register_scorer("clipscore")
def build_clipscore(
    model: str = CLIPSCORE_MODEL,
    processor: str | None = None,
    device=None,
    dtype=None,
    batch_size: int = 32,
    tiny: bool = False,
    seed: int = 0,
    clean_text: bool = False,
) -> CLIPScoreScorer:
    if tiny:
        clip, tokenizer, image_processor = tiny_clip_components(seed=seed)
    else:
        clip, tokenizer, image_processor = load_hf_clip(model, processor, resolve_dtype(dtype))
    return CLIPScoreScorer(
        clip, tokenizer, hf_pil_image_transform(image_processor), device=device, dtype=dtype,
        batch_size=batch_size, clean_text=clean_text,
    )  # fmt: skip


@register_scorer("clip-s")
def build_clip_s(
    model: str = CLIP_S_MODEL,
    processor: str | None = None,
    device=None,
    dtype=None,
    batch_size: int = 32,
    prefix: str = CLIP_S_PREFIX,
    tiny: bool = False,
    seed: int = 0,
    clean_text: bool = True,
) -> CLIPSScorer:
    if tiny:
        clip, tokenizer, _ = tiny_clip_components(seed=seed)
    else:
        clip, tokenizer, _ = load_hf_clip(model, processor, resolve_dtype(dtype))
    size = clip.config.vision_config.image_size
    return CLIPSScorer(
        clip,
        tokenizer,
        openai_clip_image_transform(size),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        prefix=prefix,
        clean_text=clean_text,
    )
