"""Stable Diffusion XL: two text encoders (penultimate hidden states concatenated; pooled projection of
encoder 2) and size/crop micro-conditioning (original size, crop top-left, target size)."""

from __future__ import annotations

import torch

from diffalign.backbones.base import Conditioning
from diffalign.backbones.sd import StableDiffusionBackbone


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    family = "sdxl"

    def __init__(self, unet, noise_scheduler, text_encoder, tokenizer, text_encoder_2, tokenizer_2, vae=None,
                 prediction_type=None, source=""):
        super().__init__(unet, noise_scheduler, text_encoder, tokenizer, vae, prediction_type, source)
        self.family = "sdxl"
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2

    def _text_encoders(self):
        return [self.text_encoder, self.text_encoder_2]

    def _tokenizers(self):
        return [self.tokenizer, self.tokenizer_2]

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self._tokenizers(), self._text_encoders()):
            ids = self._tokenize(tokenizer, prompts).to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's pooled (projected) output, as StableDiffusionXLPipeline takes it
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}

    def micro_conditioning(self, original_size, crop_top_left, resolution: int) -> Conditioning:
        """add_time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per candidate.

        original_size / crop_top_left are [N, 2] from the data layer (the winner's true size and the joint
        crop); the Salesforce script hard-codes (R, R, 0, 0, R, R) instead, the diffusers SDXL DPO script
        and MaPO record the true values as done here."""
        target = torch.tensor([resolution, resolution]).expand(original_size.shape[0], 2)
        return {"time_ids": torch.cat([original_size, crop_top_left, target], dim=1).float()}

    def call_denoiser(self, model, noisy, t, cond: Conditioning):
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"].to(noisy.device, cond["pooled"].dtype)}
        return model(noisy, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added,
                     return_dict=False)[0]

    def pipeline(self, unet=None):
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            unet=unet or self.denoiser,
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
        )
