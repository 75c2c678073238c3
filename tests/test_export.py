"""The final export: a LoRA diffusers loads at the strength it was trained at (alpha kept), a kohya /
ComfyUI copy, the model card, validation grids and pushing to the hub."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import run, tiny_config

VALIDATION = {"prompts": ["a red circle", "a blue square"], "seeds": [0, 1], "steps": 3, "guidance": 5.0}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One LoRA run with alpha != rank (rank 4, alpha 16: scale 4), reused by the tests of its export."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config(tmp, lora={"rank": 4, "alpha": 16}, optim={"lr": 1e-2}, train={"max_steps": 2},
                      validation={**VALIDATION, "every": 2})  # fmt: skip
    return run(cfg)


def _pipeline_with(final: Path | None, **load_kwargs):
    """The tiny base pipeline the run started from, with the exported LoRA loaded from `final` (None: none)."""
    from diffusers import DDIMScheduler

    from diffalign.backbones.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # validation samples with DDIM
    pipe.set_progress_bar_config(disable=True)
    if final is not None:
        pipe.load_lora_weights(str(final), **load_kwargs)
    return pipe


def _images(pipe) -> list[np.ndarray]:
    out = []
    for prompt in VALIDATION["prompts"]:
        for seed in VALIDATION["seeds"]:
            g = torch.Generator(device="cpu").manual_seed(seed)
            im = pipe(prompt, num_inference_steps=VALIDATION["steps"], guidance_scale=VALIDATION["guidance"],
                      height=32, width=32, generator=g).images[0]  # fmt: skip
            out.append(np.asarray(im))
    return out


def test_the_exported_lora_reproduces_the_trainers_validation_images_exactly(lora_run):
    from diffalign.training.export import validation_images

    trained = [np.asarray(im) for im in validation_images(lora_run, lora_run.acc.unwrap_model(lora_run.unet))]
    loaded = _images(_pipeline_with(lora_run.out / "final"))
    assert len(trained) == len(loaded) == 4
    for a, b in zip(trained, loaded):
        np.testing.assert_array_equal(a, b)
    # the LoRA is strong enough to matter, so the equality can fail
    base = _images(_pipeline_with(None))
    assert max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(trained, base)) > 0


def test_the_kohya_copy_loads_back_at_the_same_strength(lora_run):
    """final/lora_kohya.safetensors (AUTOMATIC1111 / ComfyUI key names, alpha tensors): diffusers reads it
    back through its own kohya conversion into the same images as the diffusers-format file."""
    from safetensors import safe_open

    final = lora_run.out / "final"
    with safe_open(str(final / "lora_kohya.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        meta = f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert alphas == {16.0} and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "16.0"
    diffusers_format = _images(_pipeline_with(final))
    kohya = _images(_pipeline_with(final, weight_name="lora_kohya.safetensors"))
    for a, b in zip(diffusers_format, kohya):
        np.testing.assert_array_equal(a, b)
