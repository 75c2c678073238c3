"""The toy world as Syn-Pic generators (`type: toy_render` / `type: toy_sampler` in a synpic config, found
through diffalign.synpic.generators.GENERATORS).

- `ToyRenderGenerator`: the toy renderer itself, drawing a wrong caption with probability `corrupt_p`
  (seed-dependent): a free, exact generator for tests and demos.
- `ToySamplerGenerator`: the toy world's pixel-space UNet sampled by `diffalign.sampling` (DDIM for the DDPM
  base, Euler for the flow-matching one).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from diffalign.synpic.generators import check_seeds, default_device


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

        check_seeds(prompts, seeds)
        out = []
        for p, s in zip(prompts, seeds, strict=True):
            rng = np.random.default_rng(int(s))
            caption = corrupt_caption(p, rng, self.corrupt_p)
            out.append(Image.fromarray(render(sample_scene(rng, parse_prompt(caption), size=self.size))))
        return out


class ToySamplerGenerator:
    """The toy pixel-space model sampled with its process's deterministic step (DDIM, or Euler for a
    flow-matching folder) + CFG (`diffalign.sampling`).

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
        if unet is not None and unet_model is None and not Path(unet).exists():
            from diffalign.errors import MissingFile
            from diffalign.toy.recipes import DEFAULT_OUT, paths

            raise MissingFile(f"toy generator {name!r}: model folder {unet} does not exist. The toy configs read "
                              f"the base model `diffalign demo` writes to {paths(DEFAULT_OUT)['base']}: run "
                              "`diffalign demo` (or `diffalign demo --quick`) first, or point `unet` at a model folder")  # fmt: skip

    def _load(self):
        from pathlib import Path

        from diffalign.toy.model import build_scheduler, build_unet
        from diffalign.toy.text import build_text_encoder, build_tokenizer

        device = default_device(self.device)
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
            # a model folder's own schedule (its prediction type, or flow matching)
            from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

            from diffalign.backbones.processes import is_flow_scheduler

            config = DDPMScheduler.load_config(str(self.unet_path), subfolder="scheduler")
            cls = FlowMatchEulerDiscreteScheduler if is_flow_scheduler(config) else DDPMScheduler
            scheduler = cls.from_pretrained(str(self.unet_path), subfolder="scheduler")
        from diffalign.backbones import PixelBackbone

        tok = build_tokenizer()
        te = build_text_encoder(tok, seed=self.text_encoder_seed).to(device)
        self._parts = PixelBackbone(unet.eval().to(device), scheduler, te, tok, source=str(self.unet_path))

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        from diffalign.sampling import sample_images

        check_seeds(prompts, seeds)
        if self._parts is None:
            self._load()
        bb = self._parts
        arr = sample_images(bb, bb.denoiser, list(prompts), list(seeds), steps=self.steps, guidance=self.guidance,
                            batch_size=self.batch_size)  # fmt: skip
        return [Image.fromarray(a) for a in arr]
