"""Image generators for Syn-Pic: anything with a `name` and `generate(prompts, seeds) -> list[PIL.Image]`.

`generate` gets one seed per image and must be deterministic in (prompt, seed) for a run to be
resumable. It is called once per shard with all of that shard's prompts (so the batch composition does
not depend on how many processes share the work). An optional attribute `images_per_prompt` (default 1)
says how many images of each prompt the generator contributes; k = the sum over generators.

Adapters:
- `diffusers_generator` (config type `diffusers`): any diffusers text-to-image pipeline (hub id or local
  folder) with sampler settings, loaded lazily on the process's device: diffalign.sampling.generators'
  `PipelineGenerator`, the one evaluation uses too.
- `ToySamplerGenerator`, `ToyRenderGenerator` (config types `toy_sampler`, `toy_render`): the toy world's
  model and renderer, defined in diffalign.toy.generators (the toy sits above Syn-Pic).

GENERATORS maps each config `type` to its factory as a "package.module:attr" string, imported when a run
builds its generators.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from PIL import Image

from diffalign.sampling.generators import PipelineGenerator, check_seeds, default_device

__all__ = ["GENERATORS", "Generator", "check_seeds", "default_device", "diffusers_generator"]

#: config `type` -> generator factory ("package.module:attr", imported when used)
GENERATORS = {
    "toy_render": "diffalign.toy.generators:ToyRenderGenerator",
    "toy_sampler": "diffalign.toy.generators:ToySamplerGenerator",
    "diffusers": "diffalign.synpic.generators:diffusers_generator",
}


@runtime_checkable
class Generator(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]: ...


def diffusers_generator(model: str, resolution: int | None = None, scheduler: str | None = None,
                        device: str | None = None, **options) -> PipelineGenerator:  # fmt: skip
    """A `type: diffusers` generator: the pipeline `model` (hub id or folder) with a LoRA export if `lora` is
    set (any family: SD, SDXL, SD3, FLUX), sampled at `resolution` x `resolution` (None: the pipeline's
    default) with `scheduler`, a diffusers scheduler class name built from the pipeline's scheduler config
    plus `scheduler_kwargs`, on `device` (None: this process's accelerate device). For FLUX.1-dev, `guidance`
    is the guidance embedding (FluxPipeline's guidance_scale), not classifier-free guidance."""
    return PipelineGenerator(model, height=resolution, width=resolution, sampler=scheduler or "default",
                             device=device, **options)  # fmt: skip
