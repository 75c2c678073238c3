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
def validation_grid(trainer, step: int) -> Path | None:
    """Images at the config's fixed prompts and seeds: one row per prompt, one column per seed."""
    cfg = trainer.cfg.validation
    if not cfg.prompts:
        return None
    bb = trainer.backbone
    denoiser = trainer.acc.unwrap_model(trainer.unet)
    res = cfg.resolution or trainer.cfg.data.resolution
    images = []
    try:
        pipe = bb.pipeline(denoiser)
    except NotImplementedError:  # pixel-space: diffalign's own sampler (DDIM, the same seeds)
        from PIL import Image

        from diffalign.sampling import sample_images

        prompts = [p for p in cfg.prompts for _ in cfg.seeds]
        seeds = [s for _ in cfg.prompts for s in cfg.seeds]
        with trainer.acc.autocast():
            arr = sample_images(bb, denoiser, prompts, seeds, steps=cfg.steps, guidance=cfg.guidance, height=res)
        images = [Image.fromarray(a) for a in arr]
    else:
        from diffusers import DDIMScheduler

        if bb.process.kind == "ddpm":  # flow-matching pipelines keep their own Euler scheduler
            pipe.scheduler = DDIMScheduler.from_config(bb.noise_scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        for prompt in cfg.prompts:
            for seed in cfg.seeds:
                g = torch.Generator(device="cpu").manual_seed(seed)
                with trainer.acc.autocast():
                    images.append(pipe(prompt, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                                       height=res, width=res, generator=g).images[0])
    grid = image_grid(images, cols=len(cfg.seeds))
    out = trainer.out / "validation" / f"step-{step:07d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    for tracker in trainer.acc.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return out


def export_final(trainer, metrics: dict) -> Path:
    """LoRA runs write `pytorch_lora_weights.safetensors` (loadable with `pipe.load_lora_weights(dir)`);
    full runs write a complete diffusers pipeline folder (for pixel-space models the same layout without a
    VAE, which `load_backbone` reads back)."""
    out = trainer.out / "final"
    out.mkdir(parents=True, exist_ok=True)
    unet = trainer.acc.unwrap_model(trainer.unet)
    bb = trainer.backbone
    if trainer.cfg.lora is not None:
        from peft.utils import get_peft_model_state_dict

        layers = {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(unet).items()}
        bb.save_lora(out, layers)
        what = "LoRA adapter (diffusers format): `pipe.load_lora_weights(this_folder)`"
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
