"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction), and the same layout without a VAE
(pixel-space models such as the toy world's)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from diffalign.atomic import write_atomic
from diffalign.backbones.base import Backbone, Conditioning


def module_digest(module: nn.Module | None) -> str:
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


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


#: model_index.json `_class_name` of a pixel-space folder (diffusers has no pipeline class for it)
PIXEL_CLASS_NAME = "DiffalignPixelPipeline"


class StableDiffusionBackbone(Backbone):
    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"

    def __init__(self, unet, noise_scheduler, text_encoder, tokenizer, vae=None, prediction_type=None, source=""):
        super().__init__(unet, noise_scheduler, prediction_type, source)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae

    # -- text -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        device = self.text_encoder.device
        ids = tokenize(self.tokenizer, prompts).to(device)
        return {"prompt_embeds": self.text_encoder(ids)[0]}

    # -- images ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def latent_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] -> the VAE posterior's (mean, std), unscaled."""
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def _shift(self) -> float:
        return getattr(self.vae.config, "shift_factor", None) or 0.0

    def latents_from_posterior(self, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        """A posterior sample mean + std * eps (the reference DPO scripts take `latent_dist.sample()`),
        shifted and scaled by the VAE's config; eps None gives the mean."""
        x = mean if eps is None else mean + std * eps.to(mean.device, mean.dtype)
        return (x - self._shift()) * self.vae.config.scaling_factor

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = self.latent_posterior(pixels)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        return self.latents_from_posterior(mean, std, eps)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor + self._shift()
        return self.vae.decode(latents).sample

    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        s = self.vae_scale()
        return (self.denoiser.config.in_channels, height // s, width // s)

    def default_size(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale()

    # -- denoiser -------------------------------------------------------------------------------------
    def predict(self, model, x, t, cond: Conditioning):
        return model(x, t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "vae": self.vae}

    def apply_kernels(self) -> dict[str, int]:
        """GroupNorm+SiLU fused in the resnet blocks of the UNet and the VAE."""
        from diffalign.kernels.blocks import fuse_resnet_blocks

        return {name: fuse_resnet_blocks(m)[0] for name, m in (("unet", self.denoiser), ("vae", self.vae)) if m is not None}

    def fingerprint(self) -> dict:
        return {
            "family": self.family,
            "vae": module_digest(self.vae),
            "text_encoders": [module_digest(m) for m in self._text_encoders()],
            "max_length": [t.model_max_length for t in self._tokenizers()],
        }

    def _text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder]

    def _tokenizers(self) -> list:
        return [self.tokenizer]

    def pipeline(self, denoiser: nn.Module | None = None):
        """A StableDiffusionPipeline over this backbone's components, with the model's own scheduler."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            unet=denoiser if denoiser is not None else self.denoiser,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler=self.pipeline_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pretrained(self, path: str | Path, denoiser: nn.Module | None = None) -> Path:
        path = Path(path)
        self.pipeline(denoiser).save_pretrained(str(path), safe_serialization=True)
        return path


class PixelBackbone(StableDiffusionBackbone):
    """A Stable-Diffusion-layout model on pixels: no VAE (the toy world's). Its folder holds unet/,
    text_encoder/, tokenizer/, scheduler/ and a model_index.json naming PIXEL_CLASS_NAME."""

    family = "pixel"
    # no diffusers pipeline samples it, but a LoRA export uses StableDiffusionPipeline's format (unet.* keys)

    def __init__(self, unet, noise_scheduler, text_encoder, tokenizer, prediction_type=None, source=""):
        super().__init__(unet, noise_scheduler, text_encoder, tokenizer, None, prediction_type, source)

    @torch.no_grad()
    def latent_posterior(self, pixels):
        return pixels, torch.zeros_like(pixels)

    def latents_from_posterior(self, mean, std, eps):
        return mean

    def encode_images(self, pixels, generator=None):
        return pixels

    def decode(self, latents):
        return latents

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, height, width)

    def default_size(self) -> int:
        return self.denoiser.config.sample_size

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}

    def pipeline(self, denoiser=None):
        raise NotImplementedError("pixel-space models have no diffusers pipeline; sample with diffalign.sampling")

    def save_pretrained(self, path: str | Path, denoiser: nn.Module | None = None) -> Path:
        import diffusers

        path = Path(path)
        denoiser = denoiser if denoiser is not None else self.denoiser
        parts = {"unet": denoiser, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                 "scheduler": self.pipeline_scheduler}  # fmt: skip
        for name, part in parts.items():
            kw = {"safe_serialization": True} if isinstance(part, nn.Module) else {}
            part.save_pretrained(str(path / name), **kw)
        index = {"_class_name": PIXEL_CLASS_NAME, "_diffusers_version": diffusers.__version__}
        for name, part in parts.items():
            lib = "transformers" if type(part).__module__.startswith("transformers") else "diffusers"
            index[name] = [lib, type(part).__name__]
        write_atomic(path / "model_index.json", json.dumps(index, indent=2) + "\n")
        return path


# ---- loading ------------------------------------------------------------------------------------------


def load_components(path, revision=None, variant=None, vae=None, with_vae=True) -> dict:
    """The Stable Diffusion-layout parts of a folder or hub id (unet, scheduler, tokenizer, text_encoder,
    vae), frozen; `vae` (a path or hub id) replaces the folder's VAE. `scheduler` is the training schedule:
    DDPM over the folder's scheduler config, or FlowMatchEulerDiscreteScheduler when the folder's is a
    flow-matching one (the flow toy); `pipeline_scheduler` the class the folder names (export)."""
    import diffusers
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SchedulerMixin,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel

    from diffalign.backbones.processes import is_flow_scheduler

    kw = dict(revision=revision)
    scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler", **kw)
    train_cls = FlowMatchEulerDiscreteScheduler if is_flow_scheduler(scheduler_config) else DDPMScheduler
    own = getattr(diffusers, str(scheduler_config.get("_class_name")), None)  # a diffusers class, never a path
    own = own if isinstance(own, type) and issubclass(own, SchedulerMixin) else train_cls
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw),
        "scheduler": train_cls.from_config(scheduler_config),
        "pipeline_scheduler": own.from_config(scheduler_config),
        "tokenizer": AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw),
    }
    if with_vae:
        parts["vae"] = (AutoencoderKL.from_pretrained(vae) if vae
                        else AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw))  # fmt: skip
    for m in parts.values():
        if isinstance(m, nn.Module):
            m.requires_grad_(False)
    return parts


def load_sd(path, revision=None, variant=None, vae=None, prediction_type=None) -> StableDiffusionBackbone:
    c = load_components(path, revision, variant, vae)
    bb = StableDiffusionBackbone(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], c["vae"],
                                 prediction_type, source=path)  # fmt: skip
    bb.pipeline_scheduler = c["pipeline_scheduler"]
    return bb


def load_pixel(path, revision=None, variant=None, vae=None, prediction_type=None) -> PixelBackbone:
    if vae:
        raise ValueError(f"{path!r} is a pixel-space model; it takes no model.vae")
    c = load_components(path, revision, variant, with_vae=False)
    bb = PixelBackbone(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], prediction_type, source=path)
    bb.pipeline_scheduler = c["pipeline_scheduler"]
    return bb


def tiny_sd(prediction_type=None) -> StableDiffusionBackbone:
    from diffalign.backbones.tiny import tiny_sd_components

    c = tiny_sd_components(prediction_type=prediction_type or "epsilon")
    return StableDiffusionBackbone(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], c["vae"],
                                   source="tiny:sd")  # fmt: skip
