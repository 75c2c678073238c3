"""PickScore (Kirstain et al. 2023): exp(logit_scale) * cos(image, prompt) under the PickScore CLIP-H/14.

Reference: yuvalkirstain/PickScore README / eval_preference_predictor.py. The model is a plain
transformers CLIPModel (`yuvalkirstain/PickScore_v1`); its processor is the one of the init checkpoint
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`. The reference pinned transformers 4.27, whose image processor
was PIL-based; transformers 5 defaults to a torchvision backend, so we load `CLIPImageProcessorPil`.
Scale: exp(logit_scale) read from the checkpoint (about 100), so scores sit around 18-24.
"""

from __future__ import annotations

import torch

from diffalign.rewards._common import resolve_dtype
from diffalign.rewards._hf_clip import (
    HFCLIPScorer,
    hf_pil_image_transform,
    load_hf_clip,
    tiny_clip_components,
)
from diffalign.rewards.base import register_scorer

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreScorer(HFCLIPScorer):
    name = "pickscore"

    def _from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp().to(cos.device) * cos

    @torch.no_grad()
    def probs(self, images, prompt: str) -> torch.Tensor:
        """Softmax over the candidate images of ONE prompt (the Pick-a-Pic preference probability)."""
        if not isinstance(prompt, str):
            raise TypeError("probs() compares candidates for one prompt; pass a single string")
        return torch.softmax(self.score(images, prompt), dim=-1)


def pickscore_probs(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over PickScores of the candidates of one prompt (last axis)."""
    return torch.softmax(scores.float(), dim=-1)


@register_scorer("pickscore")
def build_pickscore(
    model: str = PICKSCORE_MODEL,
    processor: str | None = PICKSCORE_PROCESSOR,
    device=None,
    dtype=None,
    batch_size: int = 32,
    tiny: bool = False,
    seed: int = 0,
) -> PickScoreScorer:
    """PickScore from a hub id or a local folder (`model`; `processor` defaults to the LAION ViT-H one,
    pass None to read it from `model`). `tiny=True` gives a random toy CLIP for tests."""
    if tiny:
        clip, tokenizer, image_processor = tiny_clip_components(seed=seed)
    else:
        clip, tokenizer, image_processor = load_hf_clip(model, processor, resolve_dtype(dtype))
    return PickScoreScorer(
        clip, tokenizer, hf_pil_image_transform(image_processor), device=device, dtype=dtype, batch_size=batch_size
    )
