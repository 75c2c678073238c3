"""Backbones: the only code that knows a model family. `load_backbone` picks the family from the
checkpoint's model_index.json (or `family=`), from a hub id, a local diffusers folder, or `tiny:<family>`."""

from __future__ import annotations

from pathlib import Path

from diffalign.backbones.base import Backbone, Conditioning
from diffalign.backbones.sd import StableDiffusionBackbone
from diffalign.backbones.sdxl import StableDiffusionXLBackbone

FAMILIES = ("sd", "sdxl", "pixel")
_PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}

__all__ = ["FAMILIES", "Backbone", "Conditioning", "load_backbone", "StableDiffusionBackbone", "StableDiffusionXLBackbone"]


def _detect_family(pretrained: str, revision: str | None) -> tuple[str, dict]:
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(pretrained, revision=revision)
    except Exception as err:  # a clear message instead of a hub traceback
        where = "local folder" if Path(pretrained).exists() else "hub id"
        raise FileNotFoundError(
            f"could not read model_index.json from {where} {pretrained!r}: {err}. Give a diffusers pipeline "
            "folder or hub id, or `tiny:sd` / `tiny:sdxl` for tiny random models."
        ) from err
    if "text_encoder_2" in index:
        return "sdxl", index
    if "vae" not in index:
        return "pixel", index
    name = index.get("_class_name", "")
    return _PIPELINE_FAMILY.get(name, "sd"), index


def load_backbone(
    pretrained: str,
    family: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
    prediction_type: str | None = None,
) -> Backbone:
    """Build the backbone for `pretrained`: a hub id, a local folder, `tiny:sd` / `tiny:sdxl` (tiny random
    models), or `random:sdxl` (the full-size SDXL architecture with random weights, for benchmarks)."""
    if pretrained == "random:sdxl":  # full-size SDXL architecture, random weights: for benchmarks
        from diffalign.backbones.tiny import random_sdxl_components

        c = random_sdxl_components()
        return StableDiffusionXLBackbone(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"],
                                         c["text_encoder_2"], c["tokenizer_2"], c["vae"], source=pretrained)
    if pretrained.startswith("tiny:"):
        from diffalign.backbones import tiny

        fam = pretrained.split(":", 1)[1]
        if fam == "sd":
            c = tiny.tiny_sd_components(prediction_type=prediction_type or "epsilon")
            return StableDiffusionBackbone(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], c["vae"],
                                           source=pretrained)
        if fam == "sdxl":
            c = tiny.tiny_sdxl_components(prediction_type=prediction_type or "epsilon")
            return StableDiffusionXLBackbone(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"],
                                             c["text_encoder_2"], c["tokenizer_2"], c["vae"], source=pretrained)
        raise ValueError(f"unknown tiny family {fam!r}; use tiny:sd or tiny:sdxl")

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    detected, index = _detect_family(pretrained, revision)
    fam = detected if family == "auto" else family
    if fam not in FAMILIES:
        raise ValueError(f"model.family must be one of {('auto',) + FAMILIES}, got {family!r}")
    kw = dict(revision=revision)
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **kw)
    scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
    tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **kw)
    if vae is not None:
        vae_model = AutoencoderKL.from_pretrained(vae)
    elif fam == "pixel":
        vae_model = None
    else:
        vae_model = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **kw)
    for m in (unet, text_encoder, vae_model):
        if m is not None:
            m.requires_grad_(False)
    if fam == "sdxl":
        tokenizer_2 = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            pretrained, subfolder="text_encoder_2", variant=variant, **kw
        ).requires_grad_(False)
        return StableDiffusionXLBackbone(unet, scheduler, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                                         vae_model, prediction_type, source=pretrained)
    return StableDiffusionBackbone(unet, scheduler, text_encoder, tokenizer, vae_model, prediction_type,
                                   source=pretrained)
