"""Image generators for Syn-Pic: anything with a `name` and `generate(prompts, seeds) -> list[PIL.Image]`.

`generate` gets one seed per image and must be deterministic in (prompt, seed) for a run to be
resumable. It is called once per shard with all of that shard's prompts (so the batch composition does
not depend on how many processes share the work). An optional attribute `images_per_prompt` (default 1)
says how many images of each prompt the generator contributes; k = the sum over generators.

Adapters:
- `DiffusersGenerator`: any diffusers text-to-image pipeline (hub id or local folder) with sampler
  settings (steps, guidance, resolution, scheduler class); loaded lazily, on the process's device.
- `ToySamplerGenerator`, `ToyRenderGenerator` (config types `toy_sampler`, `toy_render`): the toy world's
  model and renderer, defined in diffalign.toy.generators (the toy sits above Syn-Pic).

GENERATORS maps each config `type` to its class as a "package.module:attr" string, imported when a run
builds its generators.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from PIL import Image

#: config `type` -> generator class ("package.module:attr", imported when used)
GENERATORS = {
    "toy_render": "diffalign.toy.generators:ToyRenderGenerator",
    "toy_sampler": "diffalign.toy.generators:ToySamplerGenerator",
    "diffusers": "diffalign.synpic.generators:DiffusersGenerator",
}


@runtime_checkable
class Generator(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]: ...


def check_seeds(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    """One seed per prompt, or a ValueError."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")


def default_device(device: str | None) -> Any:
    """`device`, or this process's accelerate device when None."""
    if device is not None:
        return device
    from accelerate import PartialState

    return PartialState().device


class DiffusersGenerator:
    """A diffusers text-to-image pipeline (hub id or local folder), sampled with fixed settings.

    One CPU `torch.Generator` per image, seeded with its seed, so an image does not depend on the
    device or on the other images of its batch's noise. `scheduler` is a diffusers scheduler class name
    (e.g. "DPMSolverMultistepScheduler") built from the pipeline's scheduler config plus
    `scheduler_kwargs`; `resolution` sets height = width (None: the pipeline's default); `lora` a LoRA folder
    loaded with the pipeline's `load_lora_weights` (any family: SD, SDXL, SD3, FLUX). For FLUX.1-dev,
    `guidance` is the guidance embedding (FluxPipeline's guidance_scale), not classifier-free guidance."""

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
        lora: str | None = None,
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
        self.lora = lora
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
        if self.lora is not None:
            pipe.load_lora_weights(self.lora)
        if self.scheduler:
            cls = getattr(diffusers, self.scheduler, None)
            if cls is None or not hasattr(cls, "from_config"):
                raise ValueError(f"unknown diffusers scheduler class {self.scheduler!r}")
            pipe.scheduler = cls.from_config(pipe.scheduler.config, **self.scheduler_kwargs)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe.to(default_device(self.device))

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        import torch

        check_seeds(prompts, seeds)
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
