"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction), and the same layout without a VAE
(pixel-space models such as the toy world's)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from diffalign.backbones.base import Backbone, Conditioning


def _module_digest(module: nn.Module | None) -> str:
    """A cheap identity of a module's weights: its class, every parameter's name and shape, and the bytes
    of a sample of tensors. Config metadata (library versions, paths) is left out on purpose: the same
    weights read from a hub id, a local copy or built in code give the same digest."""
    if module is None:
        return "none"
    import hashlib

    h = hashlib.sha256(type(module).__name__.encode())
    params = list(module.state_dict().items())
    for name, p in params:
        h.update(f"{name}:{tuple(p.shape)}".encode())
    for _, p in params[:4] + params[len(params) // 2 : len(params) // 2 + 4] + params[-4:]:
        h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


#: model_index.json `_class_name` of a pixel-space folder (diffusers has no pipeline class for it; the
#: missing `vae` entry is what makes load_backbone pick the pixel family)
PIXEL_CLASS_NAME = "DiffalignPixelPipeline"


class StableDiffusionBackbone(Backbone):
    family = "sd"

    def __init__(self, unet, noise_scheduler, text_encoder, tokenizer, vae=None, prediction_type=None, source=""):
        super().__init__(unet, noise_scheduler, prediction_type)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.source = source
        if vae is None:
            self.family = "pixel"

    # -- text -----------------------------------------------------------------------------------------
    def _tokenize(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        device = self.text_encoder.device
        ids = self._tokenize(self.tokenizer, prompts).to(device)
        return {"prompt_embeds": self.text_encoder(ids)[0]}

    # -- images ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def latent_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] -> the VAE posterior's (mean, std), unscaled. Pixel-space: (pixels, 0)."""
        if self.vae is None:
            return pixels, torch.zeros_like(pixels)
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def latents_from_posterior(self, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        """A posterior sample mean + std * eps (the reference DPO scripts take `latent_dist.sample()`),
        shifted and scaled by the VAE's config; eps None gives the mean."""
        x = mean if eps is None else mean + std * eps.to(mean.device, mean.dtype)
        if self.vae is None:
            return x
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (x - shift) * self.vae.config.scaling_factor

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = self.latent_posterior(pixels)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32) if self.vae is not None else None
        return self.latents_from_posterior(mean, std, eps)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents).sample

    # -- denoiser -------------------------------------------------------------------------------------
    def call_denoiser(self, model, noisy, t, cond: Conditioning):
        return model(noisy, t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]

    def frozen_modules(self) -> dict[str, nn.Module]:
        mods = {"text_encoder": self.text_encoder}
        if self.vae is not None:
            mods["vae"] = self.vae
        return mods

    def fingerprint(self) -> dict:
        return {
            "family": self.family,
            "vae": _module_digest(self.vae),
            "text_encoders": [_module_digest(m) for m in self._text_encoders()],
            "max_length": [t.model_max_length for t in self._tokenizers()],
        }

    def _text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder]

    def _tokenizers(self) -> list:
        return [self.tokenizer]

    def pipeline(self, unet: nn.Module | None = None):
        """A diffusers pipeline over this backbone's components (for validation images and export)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if self.vae is None:
            raise NotImplementedError("pixel-space backbones have no diffusers pipeline; sample with diffalign.toy.model.sample")
        return StableDiffusionPipeline(
            unet=unet or self.denoiser,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pretrained(self, path: str | Path, unet: nn.Module | None = None) -> Path:
        """Write a folder that `load_backbone` reads back: a diffusers pipeline, or for a pixel-space model
        the same layout without a VAE (unet/, text_encoder/, tokenizer/, scheduler/, model_index.json)."""
        path = Path(path)
        if self.vae is not None:
            self.pipeline(unet).save_pretrained(str(path), safe_serialization=True)
            return path
        import diffusers

        unet = unet if unet is not None else self.denoiser
        parts = {"unet": unet, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                 "scheduler": self.noise_scheduler}  # fmt: skip
        for name, part in parts.items():
            kw = {"safe_serialization": True} if isinstance(part, nn.Module) else {}
            part.save_pretrained(str(path / name), **kw)
        index = {"_class_name": PIXEL_CLASS_NAME, "_diffusers_version": diffusers.__version__}
        for name, part in parts.items():
            lib = "transformers" if type(part).__module__.startswith("transformers") else "diffusers"
            index[name] = [lib, type(part).__name__]
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return path
