"""Image generation for evaluation, behind one small protocol so any generator can plug in.

    generator(prompts: list[str], seeds: list[int]) -> list[PIL.Image]   (one image per (prompt, seed))

Diffusers pipelines of every family diffalign trains load through `DiffusionPipeline` (SD, SDXL, SD3 / SD3.5,
FLUX.1), with an optional LoRA export; flow-matching pipelines keep their own scheduler, and FLUX.1-dev's
`guidance` is its embedded guidance scale.

Each image gets its own `torch.Generator` on the CPU seeded with its seed, so an image depends only on
its prompt, seed and model, not on batch size or on which other images are generated in the same run
(this is what makes resuming safe), and the initial noise is the same on CPU and GPU.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin", "adapter_model.safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(FileNotFoundError):
    """A checkpoint that is missing or not in a loadable layout."""


@runtime_checkable
class ImageGenerator(Protocol):
    name: str

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]: ...


def _scheduler_class(sampler: str):
    import diffusers

    table = {
        "ddim": ("DDIMScheduler", {}),
        "pndm": ("PNDMScheduler", {}),
        "ddpm": ("DDPMScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
        "unipc": ("UniPCMultistepScheduler", {}),
    }
    if sampler not in table:
        raise ValueError(f"unknown sampler {sampler!r}")
    cls_name, kwargs = table[sampler]
    return getattr(diffusers, cls_name), kwargs


def check_model_path(model: str) -> None:
    """Raise a clear error for a local path that is missing or not a diffusers pipeline folder."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"--model {model!r} is a file; expected a diffusers pipeline folder or a hub id")
        if not (p / "model_index.json").is_file():
            if any((p / f).is_file() for f in LORA_FILES):
                raise ModelLoadError(
                    f"{model!r} holds LoRA weights, not a whole pipeline: pass the base model with --model "
                    f"and this folder with --lora"
                )
            raise ModelLoadError(
                f"{model!r} is not a diffusers pipeline folder (no model_index.json); save one with "
                "pipeline.save_pretrained(...) or pass a hub id"
            )
        return
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise ModelLoadError(f"checkpoint {model!r} not found (no such folder, and not a hub id)")


def load_pipeline(
    model: str,
    lora: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    sampler: str = "default",
):
    """A diffusers pipeline from a hub id or folder, optionally with LoRA weights. Never runs remote code."""
    import torch
    from diffusers import DiffusionPipeline

    check_model_path(model)
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; the old name still works
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the pipeline {model!r}: {e}") from e
    if lora is not None:
        lp = Path(lora)
        if not lp.exists():
            raise ModelLoadError(f"LoRA folder {lora!r} not found")
        if lp.is_dir() and not any((lp / f).is_file() for f in LORA_FILES) and not any(lp.glob("*.safetensors")):
            raise ModelLoadError(f"{lora!r} has no LoRA weights (expected one of {', '.join(LORA_FILES)})")
        pipe.load_lora_weights(str(lp))
    if sampler != "default":
        if "FlowMatch" in type(pipe.scheduler).__name__:
            raise ModelLoadError(f"{model!r} is a flow-matching pipeline ({type(pipe).__name__}); it samples with its "
                                 f"own {type(pipe.scheduler).__name__}: use sampler 'default', not {sampler!r}")  # fmt: skip
        cls, kwargs = _scheduler_class(sampler)
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class DiffusersGenerator:
    """Generate with a diffusers text-to-image pipeline at fixed settings."""

    def __init__(
        self,
        pipe,
        steps: int = 50,
        guidance: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        batch_size: int = 4,
        name: str = "model",
    ):
        self.pipe = pipe
        self.steps = steps
        self.guidance = guidance
        self.height = height
        self.width = width
        self.negative_prompt = negative_prompt
        self.batch_size = batch_size
        self.name = name

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        import torch

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        out: list[Image.Image] = []
        for i in range(0, len(prompts), self.batch_size):
            p, s = prompts[i : i + self.batch_size], seeds[i : i + self.batch_size]
            kwargs = {}
            if self.negative_prompt:
                kwargs["negative_prompt"] = [self.negative_prompt] * len(p)
            with torch.no_grad():
                result = self.pipe(
                    prompt=list(p),
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance,
                    height=self.height,
                    width=self.width,
                    generator=[torch.Generator("cpu").manual_seed(int(x)) for x in s],
                    output_type="pil",
                    **kwargs,
                )
            out.extend(result.images)
        return out


class LazyDiffusersGenerator:
    """A DiffusersGenerator whose pipeline is loaded on the first call, so a resumed run with every image
    already on disk does not load the model at all. The path is checked at construction."""

    def __init__(self, model: str, lora: str | None = None, device: str = "cpu", dtype: str = "float32",
                 sampler: str = "default", name: str = "model", **generator_kwargs):  # fmt: skip
        check_model_path(model)
        if lora is not None and not Path(lora).exists():
            raise ModelLoadError(f"LoRA folder {lora!r} not found")
        self.load_args = dict(model=model, lora=lora, device=device, dtype=dtype, sampler=sampler)
        self.generator_kwargs = generator_kwargs
        self.name = name
        self._gen: DiffusersGenerator | None = None

    @property
    def loaded(self) -> bool:
        return self._gen is not None

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        if self._gen is None:
            self._gen = DiffusersGenerator(load_pipeline(**self.load_args), name=self.name, **self.generator_kwargs)
        return self._gen(prompts, seeds)


def is_pixel_folder(model: str) -> bool:
    """A local model folder without a VAE (model_index.json has no `vae`): the pixel-space family, such as
    the toy world's models, which diffusers has no pipeline class for."""
    import json

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
    process's deterministic step (DDIM with eta 0 for a DDPM folder, Euler for a flow-matching one, e.g.
    `diffalign demo --process flow`; sampler "ddim" or "default" means that step) and classifier-free
    guidance against the empty prompt. The initial noise of each image comes
    from a CPU generator seeded with its seed, as for diffusers models."""

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

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        from diffalign.sampling import sample_images

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if self._parts is None:
            self._load()
        bb = self._parts
        arr = sample_images(bb, bb.denoiser, list(prompts), [int(s) for s in seeds], steps=self.steps,
                            guidance=self.guidance, batch_size=self.batch_size, height=self.size)  # fmt: skip
        return [Image.fromarray(a) for a in arr]


def make_generator(model: str, lora: str | None = None, **kwargs):
    """The generator for a model: PixelGenerator for a pixel-space folder, else a LazyDiffusersGenerator.
    kwargs: device, dtype, sampler, name, steps, guidance, height, width, negative_prompt, batch_size."""
    if is_pixel_folder(model):
        return PixelGenerator(model, lora, **kwargs)
    return LazyDiffusersGenerator(model, lora, **kwargs)
