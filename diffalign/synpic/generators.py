"""Image generators for Syn-Pic: anything with a `name` and `generate(prompts, seeds) -> list[PIL.Image]`.

`generate` gets one seed per image and must be deterministic in (prompt, seed) for a run to be
resumable. It is called once per shard with all of that shard's prompts (so the batch composition does
not depend on how many processes share the work). An optional attribute `images_per_prompt` (default 1)
says how many images of each prompt the generator contributes; k = the sum over generators.

Adapters:
- `DiffusersGenerator`: any diffusers text-to-image pipeline (hub id or local folder) with sampler
  settings (steps, guidance, resolution, scheduler class); loaded lazily, on the process's device.
- `ToySamplerGenerator`: the toy world's pixel-space UNet with `diffalign.toy.model.sample`.
- `ToyRenderGenerator`: the toy renderer itself, drawing a wrong caption with probability
  `corrupt_p` (seed-dependent): a free, exact generator for tests and demos.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image


@runtime_checkable
class Generator(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]: ...


def _check(prompts, seeds):
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")


class ToyRenderGenerator:
    """Ground-truth renders of the toy world; with probability `corrupt_p` (drawn from the image's
    seed) the render follows a corrupted caption (wrong colour or wrong shape) instead."""

    def __init__(
        self, name: str = "toy-render", size: int = 16, corrupt_p: float = 0.0, images_per_prompt: int = 1
    ):
        self.name, self.size, self.corrupt_p, self.images_per_prompt = (
            name,
            size,
            corrupt_p,
            images_per_prompt,
        )

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        from diffalign.toy.world import corrupt_caption, parse_prompt, render, sample_scene

        _check(prompts, seeds)
        out = []
        for p, s in zip(prompts, seeds, strict=True):
            rng = np.random.default_rng(int(s))
            caption = corrupt_caption(p, rng, self.corrupt_p)
            out.append(Image.fromarray(render(sample_scene(rng, parse_prompt(caption), size=self.size))))
        return out


def _device(device: str | None) -> Any:
    if device is not None:
        return device
    from accelerate import PartialState

    return PartialState().device


class ToySamplerGenerator:
    """The toy pixel-space model sampled with DDIM + CFG (`diffalign.toy.model.sample`).

    `unet`: a diffusers UNet folder (config.json + safetensors) or a folder holding one under `unet/`
    (and then its noise schedule under `scheduler/`, if there is one);
    None builds a randomly initialised one (seed `init_seed`, for tests). The text encoder and
    tokenizer are rebuilt by code (seed `text_encoder_seed`), as in training. An already built
    UNet2DConditionModel can be passed as `unet_model`."""

    def __init__(
        self,
        name: str = "toy-sampler",
        unet: str | None = None,
        width: int = 32,
        size: int = 16,
        init_seed: int = 0,
        text_encoder_seed: int = 0,
        steps: int = 20,
        guidance: float = 5.0,
        batch_size: int = 256,
        device: str | None = None,
        images_per_prompt: int = 1,
        unet_model=None,
    ):
        self.name, self.images_per_prompt = name, images_per_prompt
        self.unet_path, self.width, self.size, self.init_seed = unet, width, size, init_seed
        self.text_encoder_seed, self.steps, self.guidance, self.batch_size = (
            text_encoder_seed,
            steps,
            guidance,
            batch_size,
        )
        self.device = device
        self._unet = unet_model
        self._parts = None

    def _load(self):
        from pathlib import Path

        from diffalign.toy.model import build_scheduler, build_unet
        from diffalign.toy.text import build_text_encoder, build_tokenizer

        device = _device(self.device)
        unet = self._unet
        if unet is None and self.unet_path is None:
            unet = build_unet(width=self.width, sample_size=self.size, seed=self.init_seed)
        elif unet is None:
            from diffusers import UNet2DConditionModel

            path = Path(self.unet_path)
            sub = "unet" if (path / "unet" / "config.json").exists() else None
            unet = UNet2DConditionModel.from_pretrained(str(path), subfolder=sub, use_safetensors=True)
        scheduler = build_scheduler()
        if self.unet_path is not None and (Path(self.unet_path) / "scheduler" / "scheduler_config.json").is_file():
            from diffusers import DDPMScheduler  # a model folder's own schedule (e.g. its prediction type)

            scheduler = DDPMScheduler.from_pretrained(str(self.unet_path), subfolder="scheduler")
        tok = build_tokenizer()
        te = build_text_encoder(tok, seed=self.text_encoder_seed).to(device)
        self._parts = (unet.eval().to(device), te, tok, scheduler)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        from diffalign.toy.model import sample

        _check(prompts, seeds)
        if self._parts is None:
            self._load()
        unet, te, tok, sched = self._parts
        arr = sample(
            unet, te, tok, sched, list(prompts), list(seeds), self.steps, self.guidance, self.batch_size
        )
        return [Image.fromarray(a) for a in arr]


class DiffusersGenerator:
    """A diffusers text-to-image pipeline (hub id or local folder), sampled with fixed settings.

    One CPU `torch.Generator` per image, seeded with its seed, so an image does not depend on the
    device or on the other images of its batch's noise. `scheduler` is a diffusers scheduler class name
    (e.g. "DPMSolverMultistepScheduler") built from the pipeline's scheduler config plus
    `scheduler_kwargs`; `resolution` sets height = width (None: the pipeline's default)."""

    def __init__(
        self,
        model: str,
        name: str | None = None,
        steps: int = 30,
        guidance: float = 7.5,
        resolution: int | None = None,
        scheduler: str | None = None,
        scheduler_kwargs: dict | None = None,
        negative_prompt: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int = 8,
        revision: str | None = None,
        variant: str | None = None,
        pipeline_kwargs: dict | None = None,
        images_per_prompt: int = 1,
    ):
        self.model, self.name = model, name or model
        self.steps, self.guidance, self.resolution = steps, guidance, resolution
        self.scheduler, self.scheduler_kwargs = scheduler, dict(scheduler_kwargs or {})
        self.negative_prompt, self.dtype, self.device, self.batch_size = (
            negative_prompt,
            dtype,
            device,
            batch_size,
        )
        self.revision, self.variant = revision, variant
        self.pipeline_kwargs, self.images_per_prompt = dict(pipeline_kwargs or {}), images_per_prompt
        self._pipe = None

    def _load(self):
        import diffusers
        import torch

        # newer diffusers take `dtype` and deprecate `torch_dtype`; older ones know only `torch_dtype`
        from diffusers.utils import deprecation_utils

        dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            self.model,
            **{dtype_key: getattr(torch, self.dtype)},
            use_safetensors=True,
            revision=self.revision,
            variant=self.variant,
        )
        if self.scheduler:
            cls = getattr(diffusers, self.scheduler, None)
            if cls is None or not hasattr(cls, "from_config"):
                raise ValueError(f"unknown diffusers scheduler class {self.scheduler!r}")
            pipe.scheduler = cls.from_config(pipe.scheduler.config, **self.scheduler_kwargs)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe.to(_device(self.device))

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        import torch

        _check(prompts, seeds)
        if self._pipe is None:
            self._load()
        size = {} if self.resolution is None else {"height": self.resolution, "width": self.resolution}
        out: list[Image.Image] = []
        for i in range(0, len(prompts), self.batch_size):
            ps, ss = list(prompts[i : i + self.batch_size]), seeds[i : i + self.batch_size]
            neg = None if self.negative_prompt is None else [self.negative_prompt] * len(ps)
            images = self._pipe(
                prompt=ps,
                negative_prompt=neg,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in ss],
                output_type="pil",
                **size,
                **self.pipeline_kwargs,
            ).images
            out.extend(images)
        return out
