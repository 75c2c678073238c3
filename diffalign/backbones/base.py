"""What every backbone provides: the facts of one model family, nothing about training or losses.

A backbone encodes text and images, calls its denoiser (with classifier-free guidance on request),
decodes, builds micro-conditioning, names its LoRA target modules and export format, and builds its
diffusers pipeline. How data is noised and how a denoising step goes is its `process`
(diffalign/backbones/processes.py), chosen from the scheduler config. The trainer and the sampler talk to
backbones and processes only through these methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffalign.backbones.processes import NoiseProcess, make_process

Conditioning = dict[str, torch.Tensor]

#: LoRA targets of the attention projections (the diffusers DPO scripts' choice)
ATTENTION_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def select_rows(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    return {k: v[index.to(v.device)] for k, v in cond.items()}


def concat(conds: list[Conditioning]) -> Conditioning:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


@dataclass(frozen=True)
class Family:
    """How to find and build one family's backbones (diffalign/backbones/registry.py)."""

    name: str
    #: model_index.json `_class_name`s that mean this family
    class_names: tuple[str, ...]
    #: load(path, revision=, variant=, vae=, prediction_type=) -> Backbone
    load: Callable[..., Backbone]
    #: builders by kind ("tiny", "random", "small"): builder(prediction_type=, **options) -> Backbone
    builders: dict[str, Callable[..., Backbone]] = field(default_factory=dict)
    #: family-specific model options its loader and builders take (ModelConfig fields, e.g. "t5")
    options: tuple[str, ...] = ()


class Backbone:
    """A diffusion model family. Subclasses fill in the family-specific methods."""

    family: str = "base"
    #: the diffusers pipeline class a full export or validation uses
    pipeline_class_name: str = ""
    #: where `load_lora_weights` finds the denoiser's adapter in an export (diffusers' prefix)
    lora_prefix: str = "unet"
    #: LoRA layers are exported in diffusers' own key format (convert_state_dict_to_diffusers), as the
    #: diffusers SD / SDXL DPO scripts do; False keeps peft's keys, as its SD3 / FLUX scripts save them
    #: (the converter knows only the to_q/k/v/out names: MMDiT's context projections would stay in peft's
    #: format, and a key set mixing both is only partly loaded by StableDiffusion3Pipeline)
    lora_keys_diffusers: bool = True
    #: a LoRA export also writes a kohya-format copy (diffusers' convert_state_dict_to_kohya, which maps
    #: the SD / SDXL UNet's keys)
    kohya_lora: bool = True
    #: sampling guidance is classifier-free (a conditional and an unconditional branch); False for
    #: guidance-distilled models (FLUX.1-dev takes the scale as an input)
    classifier_free_guidance: bool = True

    def __init__(self, denoiser: nn.Module, noise_scheduler, prediction_type: str | None = None, source: str = "",
                 **process_options):  # fmt: skip
        self.denoiser = denoiser
        self.noise_scheduler = noise_scheduler
        #: the scheduler the model folder names (Euler for SDXL base); pipelines and full exports carry it,
        #: while training draws its noise from `noise_scheduler` (DDPM-family, as the reference scripts do)
        self.pipeline_scheduler = noise_scheduler
        self.process: NoiseProcess = make_process(noise_scheduler, prediction_type, **process_options)
        self.source = source

    @property
    def prediction_type(self) -> str:
        return self.process.prediction_type

    @property
    def lora_target_modules(self) -> list[str]:
        return list(ATTENTION_LORA_TARGETS)

    # ---- text -----------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def empty_conditioning(self, n: int) -> Conditioning:
        """The conditioning of the empty prompt, encoded once and repeated to n rows (classifier-free
        guidance's unconditional branch)."""
        one = self.encode_text([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}

    # ---- images ---------------------------------------------------------------------------------------
    def latent_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] -> (mean, std) of the latent posterior (std 0 for pixel-space models)."""
        raise NotImplementedError

    def latents_from_posterior(self, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        """The training latents for a posterior and its noise eps (None: the mean)."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [-1, 1]."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one latent for an image of height x width (without the batch dimension)."""
        raise NotImplementedError

    def default_size(self) -> int:
        """The image side the model was built for (its pipeline's default height and width)."""
        raise NotImplementedError

    def micro_conditioning(self, original_size, crop_top_left, resolution: int) -> Conditioning:
        """Extra per-candidate conditioning from the data (SDXL's size/crop ids); none by default."""
        return {}

    def sampling_conditioning(self, n: int, height: int, width: int) -> Conditioning:
        """Micro-conditioning for generating n images of height x width (the pipeline's defaults)."""
        return {}

    # ---- denoiser -------------------------------------------------------------------------------------
    def predict(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw output at x_t (what `process.target` is compared with)."""
        raise NotImplementedError

    def schedule_kwargs(self, height: int, width: int, steps: int) -> dict:
        """Extra arguments of `process.schedule` for an image of height x width, as the family's pipeline
        computes them (FLUX: sigmas and the dynamic shift `mu`); none by default."""
        return {}

    def guided_prediction(self, model: nn.Module, x: torch.Tensor, t, cond: Conditioning,
                          uncond: Conditioning | None, guidance: float) -> torch.Tensor:  # fmt: skip
        """Classifier-free guidance u + g (c - u), both branches in one batch [uncond; cond]; guidance <= 1
        (or no uncond) is the plain conditional prediction."""
        if uncond is None or guidance <= 1.0:
            return self.predict(model, x, t, cond)
        both = concat([uncond, cond])
        if torch.is_tensor(t) and t.ndim > 0:
            t = torch.cat([t, t])
        pred_u, pred_c = self.predict(model, torch.cat([x, x]), t, both).chunk(2)
        return pred_u + guidance * (pred_c - pred_u)

    # ---- kernels --------------------------------------------------------------------------------------
    def apply_kernels(self) -> dict[str, int]:
        """Swap this family's blocks for fused-kernel versions in place (diffalign/kernels), without
        changing parameters or their names. Returns the number of blocks fused per module. The default
        fuses nothing (transformer families have no GroupNorm)."""
        return {}

    # ---- placement ------------------------------------------------------------------------------------
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

    # ---- saving and export ----------------------------------------------------------------------------
    def save_pretrained(self, path, denoiser: nn.Module | None = None) -> Path:
        """Write a folder that `load_backbone` reads back, with `denoiser` (default: this one) in it."""
        raise NotImplementedError

    def pipeline(self, denoiser: nn.Module | None = None):
        """A diffusers pipeline over this backbone's components (validation images, export)."""
        raise NotImplementedError

    def save_lora(self, path, lora_layers: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        """Write the denoiser's LoRA (peft's state dict, get_peft_model_state_dict) in the format the
        family's pipeline loads with load_lora_weights."""
        import diffusers

        if self.lora_keys_diffusers:
            from diffusers.utils import convert_state_dict_to_diffusers

            lora_layers = convert_state_dict_to_diffusers(lora_layers)
        cls = getattr(diffusers, self.pipeline_class_name)
        kwargs = {f"{self.lora_prefix}_lora_layers": lora_layers}
        if metadata is not None:
            kwargs[f"{self.lora_prefix}_lora_adapter_metadata"] = metadata
        cls.save_lora_weights(str(path), safe_serialization=True, **kwargs)

    def fingerprint(self) -> dict:
        """What a latent/text cache depends on; a cache made with a different value is refused."""
        raise NotImplementedError
