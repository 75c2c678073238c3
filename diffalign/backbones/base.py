"""What every backbone provides, and the noising / energy math shared by the DDPM-family backbones.

The trainer never touches a model family directly: it asks a backbone to encode text and images, and for
per-candidate energies (denoising errors) of a batch of items that share noise and timestep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Conditioning = dict[str, torch.Tensor]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Backbone:
    """A diffusion model family: text/image encoders, noise schedule, denoiser call and sampling."""

    family: str = "base"

    def __init__(self, denoiser: nn.Module, noise_scheduler, prediction_type: str | None = None):
        self.denoiser = denoiser
        self.noise_scheduler = noise_scheduler
        self.prediction_type = prediction_type or noise_scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)

    # ---- family-specific pieces (subclasses) ----------------------------------------------------
    def encode_text(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def latent_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] -> (mean, std) of the latent posterior (std 0 for pixel-space models)."""
        raise NotImplementedError

    def latents_from_posterior(self, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        """The training latents for a posterior and its noise eps (None: the mean)."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def micro_conditioning(self, original_size, crop_top_left, resolution: int) -> Conditioning:
        """Extra per-candidate conditioning from the data (SDXL's size/crop ids); none by default."""
        return {}

    def call_denoiser(self, model: nn.Module, noisy, t, cond: Conditioning):
        raise NotImplementedError

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules that never train (VAE, text encoders), by name, for device/dtype placement."""
        return {}

    def place(self, device, dtype: torch.dtype, vae_fp32: bool = True) -> None:
        """Put the frozen modules where training runs them: text encoders in `dtype`, the VAE in fp32
        unless vae_fp32 is off. The trainer and the cache builder both call this, so cached conditioning is
        computed at the precision training would use."""
        for name, module in self.frozen_modules().items():
            target = torch.float32 if (name == "vae" and vae_fp32) else dtype
            module.requires_grad_(False).to(device)
            if next(module.parameters()).dtype != target:
                module.to(target)

    def save_pretrained(self, path, unet: nn.Module | None = None):
        """Write a folder that `load_backbone` reads back, with `unet` (default: the denoiser) in it."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What a latent/text cache depends on; a cache made with a different value is refused."""
        raise NotImplementedError

    # ---- shared DDPM math --------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps in [0, T), as every reference Diffusion-DPO script draws them."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        return x0

    def energies(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
    ) -> torch.Tensor:
        """Per-candidate denoising error, mean over C, H, W.

        x0 [B, K, C, H, W] (latents, or pixels for a pixel-space model); noise [B, C, H, W] and t [B] are
        shared by the K candidates of an item; cond holds B*K rows in item-major order.
        Returns [B, K] in float32.
        """
        B, K = x0.shape[:2]
        x0_flat = x0.flatten(0, 1)
        noise_flat = noise.unsqueeze(1).expand(B, K, *noise.shape[1:]).flatten(0, 1)
        t_flat = t.to(x0.device).repeat_interleave(K)
        noisy = self.add_noise(x0_flat, noise_flat, t_flat)
        target = self.target(x0_flat, noise_flat, t_flat)
        pred = self.call_denoiser(model, noisy, t_flat, cond)
        err = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return err.view(B, K)
