"""Text-to-image generators for evaluation and Syn-Pic: `generator(prompts, seeds) -> list[PIL.Image]`,
one image per (prompt, seed).

Each image gets its own `torch.Generator` on the CPU seeded with its seed, so an image depends only on its
prompt, seed and model, not on the batch size or on the other images of the run (what makes resuming
safe), and its initial noise is the same on CPU and GPU. Models load on the first call, so a resumed run
with every image already on disk loads nothing.

- `PipelineGenerator`: any diffusers text-to-image pipeline of the families diffalign trains (SD, SDXL,
  SD3 / SD3.5, FLUX.1) from a hub id or folder, optionally with a LoRA export; flow-matching pipelines keep
  their own scheduler, and FLUX.1-dev's `guidance` is its embedded guidance scale.
- `PixelGenerator`: a pixel-space model folder (no VAE; the toy world's models), which diffusers has no
  pipeline class for, sampled by `diffalign.sampling`.
- `make_generator(model, ...)`: the right one for a model.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from diffalign.errors import UserError

LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin", "adapter_model.safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

#: sampler name -> (diffusers scheduler class, its options); a diffusers scheduler class name also works
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


class ModelLoadError(UserError, FileNotFoundError):
    """A checkpoint that is missing or not in a loadable layout."""


def check_seeds(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")


def default_device(device: str | None):
    """`device`, or this process's accelerate device when None."""
    if device is not None:
        return device
    from accelerate import PartialState

    return PartialState().device


def check_model_path(model: str) -> None:
    """Raise a clear error for a local path that is missing or not a diffusers pipeline folder."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"--model {model!r} is a file; expected a diffusers pipeline folder or a hub id")
        if not (p / "model_index.json").is_file():
            if any((p / f).is_file() for f in LORA_FILES):
                raise ModelLoadError(f"{model!r} holds LoRA weights, not a whole pipeline: pass the base model with "
                                     f"--model and this folder with --lora (in a Syn-Pic config: model and lora)")  # fmt: skip
            raise ModelLoadError(f"{model!r} is not a diffusers pipeline folder (no model_index.json); save one with "
                                 "pipeline.save_pretrained(...) or pass a hub id")  # fmt: skip
        return
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise ModelLoadError(f"checkpoint {model!r} not found (no such folder, and not a hub id)")


def check_lora_path(lora: str) -> None:
    lp = Path(lora)
    if not lp.exists():
        raise ModelLoadError(f"LoRA folder {lora!r} not found")
    if lp.is_dir() and not any((lp / f).is_file() for f in LORA_FILES) and not any(lp.glob("*.safetensors")):
        raise ModelLoadError(f"{lora!r} has no LoRA weights (expected one of {', '.join(LORA_FILES)})")


def _scheduler(pipe, model: str, sampler: str, options: dict):
    import diffusers

    if "FlowMatch" in type(pipe.scheduler).__name__:
        raise ModelLoadError(f"{model!r} is a flow-matching pipeline ({type(pipe).__name__}); it samples with its "
                             f"own {type(pipe.scheduler).__name__}: use sampler 'default', not {sampler!r}")  # fmt: skip
    name, kwargs = SAMPLERS.get(sampler, (sampler, {}))
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ModelLoadError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}, 'default' or a "
                             "diffusers scheduler class name")  # fmt: skip
    return cls.from_config(pipe.scheduler.config, **kwargs, **options)


def load_pipeline(model: str, lora: str | None = None, device: str | None = "cpu", dtype: str = "float32",
                  sampler: str = "default", scheduler_kwargs: dict | None = None, revision: str | None = None,
                  variant: str | None = None):  # fmt: skip
    """A diffusers pipeline from a hub id or folder, optionally with LoRA weights and another scheduler
    (`sampler`: a name from SAMPLERS or a diffusers class, built from the pipeline's scheduler config plus
    `scheduler_kwargs`). Never runs remote code."""
    import torch
    from diffusers import DiffusionPipeline

    check_model_path(model)
    if lora is not None:
        check_lora_path(lora)
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; the old name still works
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            # diffusers prefers a folder's safetensors and reads .bin weights with torch.load(weights_only=True)
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype), revision=revision,
                                                     variant=variant)  # fmt: skip
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the pipeline {model!r}: {e}") from e
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    if sampler != "default":
        pipe.scheduler = _scheduler(pipe, model, sampler, dict(scheduler_kwargs or {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(default_device(device))


class PipelineGenerator:
    """A diffusers text-to-image pipeline sampled at fixed settings, loaded on the first call (pass `pipe`
    to use one already built). `pipeline_kwargs` go to every pipeline call."""

    def __init__(self, model: str | None = None, lora: str | None = None, *, pipe=None, name: str | None = None,
                 device: str | None = "cpu", dtype: str = "float32", sampler: str = "default",
                 scheduler_kwargs: dict | None = None, revision: str | None = None, variant: str | None = None,
                 steps: int = 50, guidance: float = 7.5, height: int | None = None, width: int | None = None,
                 negative_prompt: str | None = None, batch_size: int = 4, pipeline_kwargs: dict | None = None,
                 images_per_prompt: int = 1):  # fmt: skip
        if pipe is None:
            if model is None:
                raise ValueError("PipelineGenerator needs a model or a pipe")
            check_model_path(model)
            if lora is not None:
                check_lora_path(lora)
        self.load_args = dict(model=model, lora=lora, device=device, dtype=dtype, sampler=sampler,
                              scheduler_kwargs=scheduler_kwargs, revision=revision, variant=variant)  # fmt: skip
        self.pipe, self.name = pipe, name or model or "model"
        self.steps, self.guidance, self.height, self.width = steps, guidance, height, width
        self.negative_prompt, self.batch_size = negative_prompt, batch_size
        self.pipeline_kwargs, self.images_per_prompt = dict(pipeline_kwargs or {}), images_per_prompt

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        import torch

        check_seeds(prompts, seeds)
        if self.pipe is None:
            self.pipe = load_pipeline(**self.load_args)
        out: list[Image.Image] = []
        for i in range(0, len(prompts), self.batch_size):
            ps, ss = list(prompts[i : i + self.batch_size]), seeds[i : i + self.batch_size]
            neg = {"negative_prompt": [self.negative_prompt] * len(ps)} if self.negative_prompt else {}
            images = self.pipe(prompt=ps, num_inference_steps=self.steps, guidance_scale=self.guidance,
                               height=self.height, width=self.width, output_type="pil",
                               generator=[torch.Generator("cpu").manual_seed(int(s)) for s in ss],
                               **neg, **self.pipeline_kwargs).images  # fmt: skip
            out.extend(images)
        return out

    generate = __call__  # Syn-Pic's name for it


def is_pixel_folder(model: str) -> bool:
    """A local model folder without a VAE (model_index.json has no `vae`): the pixel-space family, such as
    the toy world's models, which diffusers has no pipeline class for."""
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        return False
    try:
        return "vae" not in json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


class PixelGenerator:
    """A pixel-space model folder (unet/, text_encoder/, tokenizer/, scheduler/; no VAE) loaded with
    `diffalign.backbones.load_backbone` on the first call and sampled by `diffalign.sampling` with its noise
    process's deterministic step (DDIM with eta 0 for a DDPM folder, Euler for a flow-matching one; sampler
    "ddim" or "default" means that step) and classifier-free guidance against the empty prompt."""

    def __init__(self, model: str, lora: str | None = None, device: str = "cpu", dtype: str = "float32",
                 sampler: str = "default", name: str = "model", steps: int = 20, guidance: float = 5.0,
                 height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                 batch_size: int = 256):  # fmt: skip
        check_model_path(model)
        if lora is not None:
            raise ModelLoadError("LoRA weights on a pixel-space model are not supported by diffalign eval yet")
        if sampler not in ("default", "ddim"):
            raise ModelLoadError(f"pixel-space models are sampled with their process's own step (DDIM, or Euler for "
                                 f"flow matching); sampler {sampler!r} is not supported")  # fmt: skip
        if negative_prompt:
            raise ModelLoadError("pixel-space models take no negative prompt (guidance is against the empty prompt)")
        if height is not None and width is not None and height != width:
            raise ModelLoadError(f"pixel-space models make square images, got {height}x{width}")
        self.model, self.device, self.dtype, self.name = model, device, dtype, name
        self.steps, self.guidance, self.size, self.batch_size = steps, guidance, height, batch_size
        self._parts = None

    @property
    def loaded(self) -> bool:
        return self._parts is not None

    def _load(self):
        import torch

        from diffalign.backbones import load_backbone

        try:
            bb = load_backbone(self.model, family="pixel")
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load the pixel-space model {self.model!r}: {e}") from e
        bb.denoiser.eval().to(self.device)
        bb.text_encoder.to(self.device)
        if self.dtype != "float32":  # diffusers warns on any dtype cast, even a no-op one
            bb.denoiser.to(getattr(torch, self.dtype))
            bb.text_encoder.to(getattr(torch, self.dtype))
        self._parts = bb

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        from diffalign.sampling.loop import sample_images

        check_seeds(prompts, seeds)
        if self._parts is None:
            self._load()
        bb = self._parts
        arr = sample_images(bb, bb.denoiser, list(prompts), [int(s) for s in seeds], steps=self.steps,
                            guidance=self.guidance, batch_size=self.batch_size, height=self.size)  # fmt: skip
        return [Image.fromarray(a) for a in arr]

    generate = __call__


def make_generator(model: str, lora: str | None = None, **kwargs):
    """PixelGenerator for a pixel-space folder, else a PipelineGenerator. kwargs: device, dtype, sampler,
    name, steps, guidance, height, width, negative_prompt, batch_size."""
    if is_pixel_folder(model):
        return PixelGenerator(model, lora, **kwargs)
    return PipelineGenerator(model, lora, **kwargs)
