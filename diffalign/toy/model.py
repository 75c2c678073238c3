"""The toy world's pixel-space denoiser, its noise schedule, and a self-contained sampler.

The denoiser is a diffusers `UNet2DConditionModel` on RGB pixels in [-1, 1] (3 -> 3 channels, no VAE):
block_out_channels (w, 2w, 4w) with w = 16 by default (0.98 M parameters), one layer per block,
Down / Down / CrossAttnDown (cross-attention only at 4x4 and in the mid block), attention_head_dim 8,
cross_attention_dim 32 (the toy text encoder's width), norm_num_groups 8, and the prompt also pooled into
the timestep embedding (`addition_embed_type="text"`). It predicts the clean image (x0, "sample") on a
1000-step linear DDPM schedule.

Why this and not the prototype's (docs/toyworld.md: width 32 at every level with cross-attention at 8x8,
epsilon prediction), measured on this machine kind with the same data and 1000 steps (docs/demo.md):
cross-attention at 8x8 cost half of each step; without the pooled prompt the colour was near chance; and
with epsilon prediction the colours came out shifted (green as cyan, red as orange) with tinted
backgrounds, while x0 prediction gave clean backgrounds and the colour the caption asked for.

`sample` is DDIM (eta 0) with optional classifier-free guidance against the empty prompt, one seed per
image (the initial noise of image i depends only on seeds[i], not on the batch it is in). It is kept
self-contained so the backbone can take it over later.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffalign.toy.text import TOY_HIDDEN, encode_prompts
from diffalign.toy.world import DEFAULT_SIZE

TOY_NUM_TRAIN_TIMESTEPS = 1000


def build_unet(
    width: int = 16, sample_size: int = DEFAULT_SIZE, cross_attention_dim: int = TOY_HIDDEN, seed: int = 0
):
    """A freshly initialised toy denoiser (initialised under a forked RNG seeded with `seed`)."""
    from diffusers import UNet2DConditionModel

    if width % 8:
        raise ValueError(
            f"width must be a multiple of 8 (norm_num_groups and attention_head_dim), got {width}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(width, 2 * width, 4 * width),
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=8,
            addition_embed_type="text",
            addition_embed_type_num_heads=4,
        )


def scheduler_config() -> dict:
    """The training noise schedule (DDPMScheduler kwargs): 1000 steps, linear betas, x0 ("sample") target.

    clip_sample=True: samplers built from this config clip the predicted x0 to [-1, 1], which is right
    in pixel space."""
    return dict(
        num_train_timesteps=TOY_NUM_TRAIN_TIMESTEPS,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="sample",
        clip_sample=True,
        clip_sample_range=1.0,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config())


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def initial_noise(
    seeds: Sequence[int], shape: tuple[int, int, int], device="cpu", dtype=torch.float32
) -> torch.Tensor:
    """[N, *shape] standard normal noise, row i drawn from a CPU generator seeded with seeds[i]."""
    rows = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


@torch.no_grad()
def sample(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance: float = 5.0,
    batch_size: int = 256,
    size: int | None = None,
) -> np.ndarray:
    """DDIM (eta 0) + classifier-free guidance; returns uint8 [N, H, W, 3].

    `scheduler` is any diffusers scheduler (or its config); a DDIMScheduler is built from its config.
    guidance <= 1 skips the unconditional pass. Runs on the unet's device and dtype.

    For an x0-predicting model the guided x0 is clipped here, before the DDIM step: diffusers' step derives
    the noise from the x0 it is given and only then clips, so a guided x0 far outside [-1, 1] would put the
    overshoot into the noise and flip colours to their complements (measured: red prompts drawn cyan)."""
    from diffusers import DDIMScheduler

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    config = scheduler if isinstance(scheduler, dict) else scheduler.config
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(steps)
    clip_x0 = ddim.config.prediction_type == "sample" and ddim.config.clip_sample
    device, dtype = unet.device, unet.dtype
    size = size or unet.config.sample_size
    out = []
    for start in range(0, len(prompts), batch_size):
        ps = list(prompts[start : start + batch_size])
        cond = encode_prompts(tokenizer, text_encoder, ps).to(device, dtype)
        use_cfg = guidance > 1.0
        if use_cfg:
            uncond = encode_prompts(tokenizer, text_encoder, [""]).to(device, dtype).expand_as(cond)
            context = torch.cat([uncond, cond])
        x = initial_noise(
            seeds[start : start + batch_size], (unet.config.in_channels, size, size), device, dtype
        )
        x = x * ddim.init_noise_sigma
        for t in ddim.timesteps:
            if use_cfg:
                pred_u, pred_c = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
                pred = pred_u + guidance * (pred_c - pred_u)
                if clip_x0:
                    pred = pred.clamp(-ddim.config.clip_sample_range, ddim.config.clip_sample_range)
            else:
                pred = unet(x, t, encoder_hidden_states=cond).sample
            x = ddim.step(pred, t, x, eta=0.0).prev_sample
        out.append(to_uint8(x))
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), dtype=np.uint8)
