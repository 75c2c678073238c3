"""Stable Diffusion XL: two text encoders (penultimate hidden states concatenated; pooled projection of
encoder 2) and size/crop micro-conditioning (original size, crop top-left, target size)."""

from __future__ import annotations

import torch

from diffalign.backbones.base import Conditioning
from diffalign.backbones.sd import StableDiffusionBackbone, load_components, tokenize


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"

    def __init__(self, unet, noise_scheduler, text_encoder, tokenizer, text_encoder_2, tokenizer_2, vae=None,
                 prediction_type=None, source=""):
        super().__init__(unet, noise_scheduler, text_encoder, tokenizer, vae, prediction_type, source)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2

    def _text_encoders(self):
        return [self.text_encoder, self.text_encoder_2]

    def _tokenizers(self):
        return [self.tokenizer, self.tokenizer_2]

    def frozen_modules(self):
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2, "vae": self.vae}

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self._tokenizers(), self._text_encoders()):
            ids = tokenize(tokenizer, prompts).to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's pooled (projected) output, as StableDiffusionXLPipeline takes it
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}

    def micro_conditioning(self, original_size, crop_top_left, resolution: int) -> Conditioning:
        """add_time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per candidate, from the
        data layer's original_size / crop_top_left [N, 2] (which image's frame they describe is the data
        layer's `pair_geometry`, docs/data.md)."""
        target = torch.tensor([resolution, resolution]).expand(original_size.shape[0], 2)
        return {"time_ids": torch.cat([original_size, crop_top_left, target], dim=1).float()}

    def sampling_conditioning(self, n: int, height: int, width: int) -> Conditioning:
        """The pipeline's default for text-to-image: original = target = (height, width), no crop."""
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        return {"time_ids": ids.expand(n, 6)}

    def predict(self, model, x, t, cond: Conditioning):
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"].to(x.device, cond["pooled"].dtype)}
        return model(x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added, return_dict=False)[0]

    def pipeline(self, denoiser=None):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            unet=denoiser if denoiser is not None else self.denoiser,
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            scheduler=self.pipeline_scheduler,
        )


def load_sdxl(path, revision=None, variant=None, vae=None, prediction_type=None) -> StableDiffusionXLBackbone:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    c = load_components(path, revision, variant, vae)
    tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=variant,
                                                                 revision=revision).requires_grad_(False)  # fmt: skip
    bb = StableDiffusionXLBackbone(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], text_encoder_2,
                                   tokenizer_2, c["vae"], prediction_type, source=path)  # fmt: skip
    bb.pipeline_scheduler = c["pipeline_scheduler"]
    return bb


def tiny_sdxl(prediction_type=None) -> StableDiffusionXLBackbone:
    from diffalign.backbones.tiny import tiny_sdxl_components

    c = tiny_sdxl_components(prediction_type=prediction_type or "epsilon")
    return StableDiffusionXLBackbone(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], c["text_encoder_2"],
                                     c["tokenizer_2"], c["vae"], source="tiny:sdxl")  # fmt: skip


def random_sdxl(prediction_type=None) -> StableDiffusionXLBackbone:
    """The full-size SDXL-base architecture with random weights (speed and memory benchmarks)."""
    from diffalign.backbones.tiny import random_sdxl_components

    c = random_sdxl_components()
    return StableDiffusionXLBackbone(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], c["text_encoder_2"],
                                     c["tokenizer_2"], c["vae"], prediction_type, source="random:sdxl")  # fmt: skip
