"""The guided sampling loop, over any backbone (its conditioning and denoiser call) and its noise process
(its schedule and step).

Determinism: image i's initial noise comes from a CPU generator seeded with seeds[i], and with eta > 0
each step's noise continues that image's generator, so an image depends on its prompt, seed and model
only, not on the batch it is generated in or the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from diffalign.backbones.base import Backbone, Conditioning
from diffalign.backbones.processes import StepResult, gaussian_log_prob


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device="cpu", dtype=torch.float32,
                  generators: list[torch.Generator] | None = None) -> torch.Tensor:  # fmt: skip
    """[N, *shape] standard normal noise, row i drawn from a CPU generator seeded with seeds[i] (or from
    generators[i], which then continues for the step noise)."""
    gens = generators or [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    rows = [torch.randn(shape, generator=g) for g in gens]
    return torch.stack(rows).to(device=device, dtype=dtype)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _model_dtype(model) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(model.parameters()).dtype


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def guided_output(backbone: Backbone, model, x: torch.Tensor, t, cond: Conditioning,
                  uncond: Conditioning | None = None, guidance: float = 1.0) -> torch.Tensor:  # fmt: skip
    """The model output a guided step takes: the backbone's (CFG) prediction, made safe by the process."""
    pred = backbone.guided_prediction(model, x, t, cond, uncond, guidance)
    if uncond is not None and guidance > 1.0:
        pred = backbone.process.clip_guided_output(pred)
    return pred


def denoise_step(backbone: Backbone, model, x: torch.Tensor, t, t_prev, cond: Conditioning,
                 uncond: Conditioning | None = None, guidance: float = 1.0, eta: float = 0.0,
                 noise: torch.Tensor | None = None) -> StepResult:  # fmt: skip
    """One guided step x_t -> x_prev: the backbone's (CFG) prediction, then the process's step."""
    pred = guided_output(backbone, model, x, t, cond, uncond, guidance)
    return backbone.process.step(pred, t, t_prev, x, eta, noise)


def transition_log_prob(backbone: Backbone, model, x: torch.Tensor, x_prev: torch.Tensor, t, t_prev,
                        cond: Conditioning, uncond: Conditioning | None = None, guidance: float = 1.0,
                        eta: float = 1.0) -> torch.Tensor:  # fmt: skip
    """log p(x_prev | x_t) under `model` [N], averaged over the latent dimensions (the Gaussian of the
    process's stochastic step: DDIM with eta, or the flow SDE)."""
    if eta <= 0:
        raise ValueError("a deterministic step (eta = 0) has no transition density; use eta > 0")
    step = denoise_step(backbone, model, x, t, t_prev, cond, uncond, guidance, eta, torch.zeros_like(x))
    if not bool((torch.as_tensor(step.std) > 0).all()):
        raise ValueError(f"the step at t={t} has zero variance (deterministic); it has no transition density")
    return gaussian_log_prob(x_prev, step.mean, step.std)


def sampling_conditions(backbone: Backbone, prompts: Sequence[str], height: int, width: int, guidance: float,
                        device, dtype) -> tuple[Conditioning, Conditioning | None]:  # fmt: skip
    """(cond, uncond) for generating one image per prompt at height x width: the prompts' text conditioning and,
    with guidance > 1 on a family that uses classifier-free guidance, the empty prompt's, each with the
    sampler's micro-conditioning."""
    n = len(prompts)
    micro = {k: v.to(device) for k, v in backbone.sampling_conditioning(n, height, width).items()}
    cond = {k: v.to(device, dtype) for k, v in backbone.encode_text(list(prompts)).items()} | micro
    if guidance <= 1.0 or not backbone.classifier_free_guidance:  # FLUX.1-dev: guidance is an embedding
        return cond, None
    return cond, {k: v.to(device, dtype) for k, v in backbone.empty_conditioning(n).items()} | micro


def sampling_schedule(backbone: Backbone, steps: int, height: int, width: int, schedule_kwargs: dict | None = None):
    """The process's `steps`-step sampling schedule for height x width images, with the family's own
    arguments (FLUX: sigmas and the dynamic shift) under any given `schedule_kwargs`."""
    return backbone.process.schedule(steps, **(backbone.schedule_kwargs(height, width, steps) | (schedule_kwargs or {})))


@dataclass
class Trajectory:
    """Per step i: x[i] -> x[i + 1] at (t[i], t_prev[i]); log_prob[i] of that transition under the sampling
    model ([N]; None for a deterministic step, e.g. DDIM's last step when the final alpha is 1). x has
    steps + 1 entries."""

    x: list[torch.Tensor] = field(default_factory=list)
    t: list[torch.Tensor] = field(default_factory=list)
    t_prev: list[torch.Tensor] = field(default_factory=list)
    log_prob: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class SampleOutput:
    latents: torch.Tensor  # [N, *latent_shape] the final samples, in the backbone's latent space
    trajectories: Trajectory | None = None


@torch.no_grad()
def sample(backbone: Backbone, model, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20,
           guidance: float = 5.0, eta: float = 0.0, height: int | None = None, width: int | None = None,
           batch_size: int = 256, trajectory: bool = False, dtype: torch.dtype | None = None,
           schedule_kwargs: dict | None = None) -> SampleOutput:  # fmt: skip
    """Sample one image per (prompt, seed) with `steps` steps of the backbone's process, classifier-free
    guidance against the empty prompt (guidance <= 1: none) and stochasticity `eta`. Runs on the model's
    device and dtype. With `trajectory`, also returns every intermediate latent and transition log-prob
    (only for batch_size >= len(prompts): one batch)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    device, dtype = _model_device(model), dtype or _model_dtype(model)
    height = height or width or backbone.default_size()
    width = width or height
    shape = backbone.latent_shape(height, width)
    process = backbone.process
    schedule = sampling_schedule(backbone, steps, height, width, schedule_kwargs)
    if trajectory and len(prompts) > batch_size:
        raise ValueError("trajectory=True needs all prompts in one batch (batch_size >= len(prompts))")
    traj = Trajectory() if trajectory else None
    out = []
    for start in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[start : start + batch_size]), seeds[start : start + batch_size]
        cond, uncond = sampling_conditions(backbone, ps, height, width, guidance, device, dtype)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in ss]
        x = initial_noise(ss, shape, device, dtype, generators=gens) * process.init_noise_sigma
        if traj is not None:
            traj.x.append(x)
        for t, t_prev in schedule:
            noise = initial_noise(ss, shape, device, dtype, generators=gens) if eta > 0 else None
            res = denoise_step(backbone, model, x, t, t_prev, cond, uncond, guidance, eta, noise)
            if traj is not None:
                traj.x.append(res.prev)
                traj.t.append(torch.as_tensor(t))
                traj.t_prev.append(torch.as_tensor(t_prev))
                stochastic = eta > 0 and bool((torch.as_tensor(res.std) > 0).all())
                traj.log_prob.append(gaussian_log_prob(res.prev, res.mean, res.std) if stochastic else None)
            x = res.prev.to(dtype)
        out.append(x)
    latents = torch.cat(out) if out else torch.zeros((0, *shape), device=device, dtype=dtype)
    return SampleOutput(latents=latents, trajectories=traj)


@torch.no_grad()
def sample_images(backbone: Backbone, model, prompts: Sequence[str], seeds: Sequence[int], **kwargs) -> np.ndarray:
    """`sample`, decoded to uint8 [N, H, W, 3] images."""
    latents = sample(backbone, model, prompts, seeds, **kwargs).latents
    if len(latents) == 0:
        h = kwargs.get("height") or backbone.default_size()
        return np.zeros((0, h, kwargs.get("width") or h, 3), dtype=np.uint8)
    return to_uint8(backbone.decode(latents))
