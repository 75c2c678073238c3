"""Validation image grids during training, and the final export with a model card."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffalign.config import dump_config


def image_grid(images, cols: int | None = None):
    from PIL import Image

    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def validation_images(trainer, denoiser) -> list:
    """The config's validation prompts x seeds (prompt-major) sampled from `denoiser`: with the backbone's
    diffusers pipeline and DDIM for latent models, with diffalign.sampling (DDIM, the same seeds) for
    pixel-space models. PIL images."""
    cfg = trainer.cfg.validation
    bb = trainer.backbone
    res = cfg.resolution or trainer.cfg.data.resolution
    try:
        pipe = bb.pipeline(denoiser)
    except NotImplementedError:  # pixel-space: diffalign's own sampler
        from PIL import Image

        from diffalign.sampling import sample_images

        prompts = [p for p in cfg.prompts for _ in cfg.seeds]
        seeds = [s for _ in cfg.prompts for s in cfg.seeds]
        with trainer.acc.autocast():
            arr = sample_images(bb, denoiser, prompts, seeds, steps=cfg.steps, guidance=cfg.guidance, height=res)
        return [Image.fromarray(a) for a in arr]
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(bb.noise_scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in cfg.prompts:
        for seed in cfg.seeds:
            g = torch.Generator(device="cpu").manual_seed(seed)
            with trainer.acc.autocast():
                images.append(pipe(prompt, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                                   height=res, width=res, generator=g).images[0])  # fmt: skip
    return images


@torch.no_grad()
def validation_grid(trainer, step: int) -> Path | None:
    """Images at the config's fixed prompts and seeds: one row per prompt, one column per seed."""
    cfg = trainer.cfg.validation
    if not cfg.prompts:
        return None
    images = validation_images(trainer, trainer.acc.unwrap_model(trainer.unet))
    grid = image_grid(images, cols=len(cfg.seeds))
    out = trainer.out / "validation" / f"step-{step:07d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    for tracker in trainer.acc.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return out


#: the LoRA in kohya's key format (AUTOMATIC1111, ComfyUI, SD.Next), beside diffusers' own file
KOHYA_FILE = "lora_kohya.safetensors"


def save_kohya_lora(path: Path, peft_layers: dict[str, torch.Tensor], prefix: str, peft_config) -> None:
    """Write a PEFT-format LoRA state dict in kohya's format with diffusers' converter, with each module's
    `.alpha` set to the trained lora_alpha (the converter writes the rank there, which loads at the wrong
    strength when alpha != rank)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    layers = {f"{prefix}.{k}": v.detach().float().cpu().contiguous() for k, v in peft_layers.items()}
    kohya = convert_state_dict_to_kohya(layers)
    alpha = float(peft_config.lora_alpha)
    kohya = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v) for k, v in kohya.items()}
    meta = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(peft_config.r),
            "ss_network_alpha": str(alpha)}  # fmt: skip
    save_file(kohya, str(path), metadata=meta)


def export_final(trainer, metrics: dict) -> Path:
    """LoRA runs write `pytorch_lora_weights.safetensors` (loadable with `pipe.load_lora_weights(dir)`);
    full runs write a complete diffusers pipeline folder (for pixel-space models the same layout without a
    VAE, which `load_backbone` reads back)."""
    out = trainer.out / "final"
    out.mkdir(parents=True, exist_ok=True)
    unet = trainer.acc.unwrap_model(trainer.unet)
    bb = trainer.backbone
    if trainer.cfg.lora is not None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        layers = {k: v.detach().float().contiguous().cpu() for k, v in layers.items()}
        # the adapter's LoraConfig (rank, lora_alpha, targets) travels in the file's metadata: without it
        # diffusers assumes alpha = rank and loads the adapter at rank / alpha of its trained strength
        peft_config = unet.peft_config["default"]
        bb.save_lora(out, layers, metadata=peft_config.to_dict())
        save_kohya_lora(out / KOHYA_FILE, get_peft_model_state_dict(unet), bb.lora_prefix, peft_config)
        what = (f"LoRA adapter in diffusers format (`pipe.load_lora_weights(this_folder)`) and in kohya format "
                f"for AUTOMATIC1111 / ComfyUI ({KOHYA_FILE})")
    else:
        if unet.dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op one
            unet = unet.to(torch.float32)
        bb.save_pretrained(out, unet)
        if bb.family == "pixel":
            what = ("pixel-space model (unet/, text_encoder/, tokenizer/, scheduler/; no VAE): "
                    "`diffalign.backbones.load_backbone(this_folder)`, `diffalign eval --model this_folder`")
        else:
            what = "full diffusers pipeline: `DiffusionPipeline.from_pretrained(this_folder)`"
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "README.md").write_text(model_card(trainer, metrics, what))
    return out


def model_card(trainer, metrics: dict, what: str) -> str:
    cfg = trainer.cfg
    rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    return f"""---
library_name: diffusers
base_model: {cfg.model.pretrained}
tags: [diffalign, {cfg.objective.name}, text-to-image, preference-alignment]
---
# {cfg.objective.name} fine-tune of `{cfg.model.pretrained}`

Trained with [diffalign](https://pypi.org/project/diffalign/) for {trainer.step} steps.
This folder holds the {what}.

## Final training metrics (mean over the last logging window)
| metric | value |
|---|---|
{rows}

## Config
```yaml
{dump_config(cfg)}```
"""
