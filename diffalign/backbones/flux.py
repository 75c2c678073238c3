"""FLUX.1 [dev] and [schnell] (FluxTransformer2DModel, an MMDiT with single-stream blocks, rectified flow).

Text conditioning as FluxPipeline builds it (`encode_prompt`): CLIP-L's pooled output (CLIPTextModel's
pooler_output, no projection) and T5-XXL's last hidden states (max_sequence_length tokens, 512 by default;
text position ids are zeros). T5 is held lazily (diffalign/backbones/t5.py).

Latents stay [N, 16, H/8, W/8] everywhere in diffalign (noise, process, cache, MSE); `predict` packs them
into 2x2 patches ([N, H/16 * W/16, 64], FluxPipeline._pack_latents) with their image position ids, calls
the transformer with t = sigma (the pipeline's timestep / 1000) and unpacks the output. Packing is a
permutation, so the per-candidate MSE equals the one on packed latents, and noise drawn in this shape is
what FluxPipeline draws before packing (the same seed gives the same image).

Guidance: FLUX.1-dev is guidance-distilled and has no classifier-free guidance; its transformer takes the
guidance scale as an input embedding. Sampling passes the sampler's guidance there (FluxPipeline's
`guidance_scale`); training passes `model.guidance_embedding`, 3.5 by default: diffusers'
examples/dreambooth/train_dreambooth_lora_flux.py `--guidance_scale` default (other trainers use 1.0).
FLUX.1-schnell (no guidance embedding) ignores both.

Timesteps for training are drawn uniformly by default, the default (`--weighting_scheme none`) of the same
diffusers script, over the scheduler's unshifted training table (dynamic shifting only shifts sampling
schedules); sampling uses FluxPipeline's schedule: sigmas linspace(1, 1/steps, steps) shifted by `mu`,
linear in the image's token count.
"""

from __future__ import annotations

import torch
from torch import nn

from diffalign.backbones.base import Conditioning
from diffalign.backbones.sd import tokenize
from diffalign.backbones.sd3 import MMDiTBackbone, dynamic_shift_mu, load_flow_parts, t5_part
from diffalign.backbones.t5 import LazyModule, t5_states

#: FLUX.1-dev's guidance embedding value in training: diffusers' train_dreambooth_lora_flux.py default
DEFAULT_TRAIN_GUIDANCE = 3.5


def _pipeline_cls():
    from diffusers import FluxPipeline

    return FluxPipeline


class FluxBackbone(MMDiTBackbone):
    family = "flux"
    pipeline_class_name = "FluxPipeline"
    #: FluxPipeline's default max_sequence_length (FLUX.1-schnell's model card uses 256)
    default_max_sequence_length = 512
    t5_slot = "text_encoder_2"
    #: guidance-distilled: the sampler's guidance goes into the embedding, no unconditional branch
    classifier_free_guidance = False

    def __init__(self, transformer, noise_scheduler, text_encoder, tokenizer, t5: LazyModule, tokenizer_2, vae,
                 max_sequence_length: int | None = None, guidance_embedding: float | None = None, source: str = "",
                 density: str = "uniform"):  # fmt: skip
        super().__init__(transformer, noise_scheduler, text_encoder, tokenizer, vae, t5, max_sequence_length, source,
                         density)  # fmt: skip
        self.tokenizer_2 = tokenizer_2
        if guidance_embedding is not None and not self.has_guidance:
            raise ValueError("model.guidance_embedding: this FLUX transformer has no guidance embedding "
                             "(FLUX.1-schnell); leave it unset")  # fmt: skip
        self.train_guidance = DEFAULT_TRAIN_GUIDANCE if guidance_embedding is None else float(guidance_embedding)

    @property
    def has_guidance(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def text_encoder_2(self) -> nn.Module:
        return self.t5.get()

    # -- text -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        pooled = self.text_encoder(tokenize(self.tokenizer, prompts).to(self.text_encoder.device)).pooler_output
        states = t5_states(self.tokenizer_2, self.text_encoder_2, prompts, self.max_sequence_length)
        return {"prompt_embeds": states.to(pooled.device), "pooled": pooled}

    # -- latents --------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """FluxPipeline.prepare_latents: 2 * (side // (vae_scale * 2)) so that 2x2 packing fits."""
        s = self.vae_scale()
        return (self.vae.config.latent_channels, 2 * (height // (s * 2)), 2 * (width // (s * 2)))

    def default_size(self) -> int:
        return 128 * self.vae_scale()  # FluxPipeline's default_sample_size 128

    # -- denoiser -------------------------------------------------------------------------------------
    def predict(self, model, x, t, cond: Conditioning, guidance: float | None = None):
        """The transformer on 2x2-packed latents with image ids (0, row, col) and zero text ids; returns the
        velocity unpacked to x's shape. `guidance`: the embedding value (default: the training value)."""
        pipe = _pipeline_cls()
        n, c, h, w = x.shape
        packed = pipe._pack_latents(x, n, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype)
        txt = cond["prompt_embeds"]
        txt_ids = torch.zeros(txt.shape[1], 3, device=x.device, dtype=x.dtype)
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = (t.expand(n) if t.ndim == 0 else t) / 1000
        g = None
        if self.has_guidance:
            g = torch.full((n,), self.train_guidance if guidance is None else float(guidance), device=x.device,
                           dtype=torch.float32)  # fmt: skip
        out = model(hidden_states=packed, timestep=t.to(packed.dtype), guidance=g, pooled_projections=cond["pooled"],
                    encoder_hidden_states=txt, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]  # fmt: skip
        return pipe._unpack_latents(out, h, w, 1)

    def guided_prediction(self, model, x, t, cond, uncond, guidance):
        """No classifier-free guidance: FLUX.1-dev takes the guidance scale as an input (FluxPipeline's
        `guidance_scale`); schnell ignores it. `uncond` is unused."""
        return self.predict(model, x, t, cond, guidance=guidance)

    def schedule_kwargs(self, height: int, width: int, steps: int) -> dict:
        """FluxPipeline's schedule: sigmas linspace(1, 1/steps, steps) and `mu` from the packed token count."""
        import numpy as np

        _, h, w = self.latent_shape(height, width)
        mu = dynamic_shift_mu((h // 2) * (w // 2), dict(self.noise_scheduler.config), 1.15)
        return {"sigmas": np.linspace(1.0, 1 / steps, steps).tolist(), "mu": mu}

    # -- export -------------------------------------------------------------------------------------
    def pipeline(self, denoiser: nn.Module | None = None):
        """A FluxPipeline over this backbone's components (T5 built now)."""
        return _pipeline_cls()(**self._pipeline_parts(denoiser), text_encoder_2=self.text_encoder_2,
                               tokenizer_2=self.tokenizer_2)  # fmt: skip


# ---- loading ------------------------------------------------------------------------------------------


def load_flux(path, revision=None, variant=None, vae=None, prediction_type=None, max_sequence_length: int | None = None,
              guidance_embedding: float | None = None) -> FluxBackbone:  # fmt: skip
    from transformers import AutoTokenizer, CLIPTextModel

    parts = load_flow_parts(path, revision, variant, vae)
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
    clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant,
                                         revision=revision).requires_grad_(False)  # fmt: skip
    lazy, tok2 = t5_part(path, "text_encoder_2", parts["index"], revision, variant)
    if lazy is None:
        raise ValueError(f"{path!r}: a FLUX folder needs text_encoder_2 (T5)")
    return FluxBackbone(parts["transformer"], parts["scheduler"], clip, tokenizer, lazy, tok2, parts["vae"],
                        max_sequence_length, guidance_embedding, source=path)  # fmt: skip


def _built(c: dict, source: str, max_sequence_length=None, guidance_embedding=None) -> FluxBackbone:
    t5 = LazyModule.of(c["text_encoder_2"]) if "text_encoder_2" in c else LazyModule(
        lambda dtype: c["build_t5"](), lambda: f"{source}/t5")  # fmt: skip
    return FluxBackbone(c["transformer"], c["scheduler"], c["text_encoder"], c["tokenizer"], t5, c["tokenizer_2"],
                        c["vae"], max_sequence_length, guidance_embedding, source=source)  # fmt: skip


def tiny_flux(prediction_type=None, max_sequence_length: int | None = None,
              guidance_embedding: float | None = None) -> FluxBackbone:  # fmt: skip
    from diffalign.backbones.tiny import tiny_flux_components

    return _built(tiny_flux_components(), "tiny:flux", max_sequence_length, guidance_embedding)


def random_flux(prediction_type=None, max_sequence_length: int | None = None,
                guidance_embedding: float | None = None) -> FluxBackbone:  # fmt: skip
    """The FLUX.1-dev architecture (12 B transformer) with random weights; T5-XXL built lazily."""
    from diffalign.backbones.tiny import random_flux_components

    return _built(random_flux_components(), "random:flux", max_sequence_length, guidance_embedding)


def small_flux(prediction_type=None, max_sequence_length: int | None = None,
               guidance_embedding: float | None = None) -> FluxBackbone:  # fmt: skip
    """The FLUX.1-dev layout scaled down (CPU benchmarks), random weights."""
    from diffalign.backbones.tiny import random_flux_components

    return _built(random_flux_components(scale="small"), "small:flux", max_sequence_length, guidance_embedding)
