"""Noise processes: the math between clean data and noise, shared by training and sampling.

A backbone knows a model family (encoders, denoiser call, decode); its `process` knows how the family
noises data and how one denoising step goes. Two implementations of one small interface:

- `DDPMProcess`: variance-preserving diffusion on a discrete schedule (alphas_cumprod), with an
  epsilon / v / sample (x0) prediction target. Training draws integer t uniformly in [0, T), as every
  reference Diffusion-DPO script does; a step is DDIM with `eta` (eta = 0 deterministic, eta > 0 the
  stochastic DDIM posterior that SPO takes transition log-probabilities of).
- `FlowMatchingProcess`: rectified flow, x_t = (1 - sigma) x0 + sigma eps, velocity target eps - x0,
  with the scheduler's (shifted) sigma table; training samples sigma by a density (uniform, logit-normal,
  mode) as diffusers' SD3 / FLUX scripts do; a step is the Euler ODE step, or with `eta` > 0 the SDE step
  of Flow-GRPO (Liu et al. 2025, `sde_step_with_logprob`), eta playing its `noise_level`.

Timesteps are in the denoiser's own units: an integer index for DDPM, sigma * T for flow matching (what
`FlowMatchEulerDiscreteScheduler.timesteps` holds). `step` returns the next latent together with the
transition's Gaussian mean and std, so one piece of math serves sampling and log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")


@dataclass
class StepResult:
    """One denoising transition x_t -> x_prev ~ N(mean, std^2 I); std is 0 for a deterministic step."""

    prev: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor  # broadcastable to mean
    x0: torch.Tensor  # the step's predicted clean sample


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of x under N(mean, std^2) per element, averaged over all but the first dimension
    (as SPO and Flow-GRPO reduce it). Computed in float32."""
    x, mean, std = x.float(), mean.float(), torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    logp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.mean(dim=tuple(range(1, logp.ndim)))


class NoiseProcess:
    """Interface. `t` tensors are one entry per row of `x` (or a scalar)."""

    kind = "base"
    num_train_timesteps: int
    #: the model's output target name, for summaries
    prediction_type: str

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def schedule(self, steps: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The sampling schedule: (t, t_prev) of every step, from pure noise towards data."""
        raise NotImplementedError

    def step(self, output: torch.Tensor, t, t_prev, x: torch.Tensor, eta: float = 0.0,
             noise: torch.Tensor | None = None) -> StepResult:  # fmt: skip
        raise NotImplementedError

    def clip_guided_output(self, output: torch.Tensor) -> torch.Tensor:
        """A guided model output made safe before the step (identity unless the process clips)."""
        return output

    def loss_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the training loss compares with `target`: the raw model output, unless the process
        preconditions it (flow matching with `precondition_outputs`)."""
        return output

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def describe(self) -> str:
        return f"{self.kind} ({self.prediction_type})"


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row scalars [N] (or a scalar) shaped to broadcast against [N, ...]."""
    values = values.to(like.device)
    if values.ndim == 0:
        return values
    return values.view(-1, *([1] * (like.ndim - 1)))


class DDPMProcess(NoiseProcess):
    """Variance-preserving diffusion from a diffusers DDPM-style scheduler config."""

    kind = "ddpm"

    def __init__(self, scheduler, prediction_type: str | None = None):
        from diffusers import DDIMScheduler, DDPMScheduler

        config = dict(scheduler.config)
        self.prediction_type = prediction_type or config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if config.get("thresholding"):
            raise NotImplementedError("schedulers with dynamic thresholding are not supported")
        # own copies: a pipeline that shares the model's scheduler object may call set_timesteps on it
        self.train_scheduler = DDPMScheduler.from_config(config)
        self.config = config
        self.num_train_timesteps = int(config["num_train_timesteps"])
        # The sampler's constants (alphas_cumprod, final alpha) as DDIMScheduler computes them, so eta = 0
        # steps equal diffusers' DDIMScheduler.step bit for bit.
        self.ddim = DDIMScheduler.from_config(config, prediction_type=self.prediction_type)

    # ---- training -----------------------------------------------------------------------------------
    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps in [0, T), as every reference Diffusion-DPO script draws them."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, x0, noise, t):
        return self.train_scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.train_scheduler.get_velocity(x0, noise, t)
        return x0

    # ---- sampling -----------------------------------------------------------------------------------
    def schedule(self, steps: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """DDIMScheduler's timesteps for `steps` (its timestep_spacing and steps_offset); t_prev = t - T // steps
        (negative at the last step: the final alpha is then used), as DDIMScheduler.step computes it."""
        self.ddim.set_timesteps(steps)
        stride = self.num_train_timesteps // steps
        return [(t, t - stride) for t in self.ddim.timesteps]

    def _alphas(self, t, t_prev, like: torch.Tensor):
        ac = self.ddim.alphas_cumprod
        t = torch.as_tensor(t)
        t_prev = torch.as_tensor(t_prev)
        if t.ndim == 0:
            a_t = ac[t]
            a_prev = ac[t_prev] if t_prev >= 0 else self.ddim.final_alpha_cumprod
            return a_t, a_prev
        a_t = ac[t.cpu()]
        a_prev = torch.where(t_prev.cpu() >= 0, ac[t_prev.clamp_min(0).cpu()], self.ddim.final_alpha_cumprod)
        return _rows(a_t, like), _rows(a_prev, like)

    def clip_guided_output(self, output):
        """An x0-predicting model with clip_sample: clip a guided x0 before the step. DDIM derives the noise
        from the x0 it is given and only then clips, so a guided x0 far outside the range would put the
        overshoot into the noise (measured in the toy world: red prompts drawn cyan)."""
        if self.prediction_type == "sample" and self.config.get("clip_sample", False):
            r = self.config.get("clip_sample_range", 1.0)
            return output.clamp(-r, r)
        return output

    def step(self, output, t, t_prev, x, eta: float = 0.0, noise=None) -> StepResult:
        """DDIM (Song et al. 2021, eq. 12) with eta; the arithmetic of diffusers' DDIMScheduler.step.

        std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)); x_prev = mean + std * noise."""
        alpha_prod_t, alpha_prod_t_prev = self._alphas(t, t_prev, x)
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction_type == "epsilon":
            x0 = (x - beta_prod_t ** (0.5) * output) / alpha_prod_t ** (0.5)
            eps = output
        elif self.prediction_type == "sample":
            x0 = output
            eps = (x - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
        else:
            x0 = (alpha_prod_t**0.5) * x - (beta_prod_t**0.5) * output
            eps = (alpha_prod_t**0.5) * output + (beta_prod_t**0.5) * x
        if self.config.get("clip_sample", False):
            r = self.config.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-r, r)
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std = eta * variance ** (0.5)
        direction = (1 - alpha_prod_t_prev - std**2) ** (0.5) * eps
        mean = alpha_prod_t_prev ** (0.5) * x0 + direction
        if eta > 0:
            if noise is None:
                raise ValueError("a stochastic step (eta > 0) needs its noise")
            prev = mean + std * noise
        else:
            prev = mean
        return StepResult(prev=prev, mean=mean, std=torch.as_tensor(std), x0=x0)

    def pred_x0(self, output, t, x):
        """The clean sample a model output implies at x_t."""
        a_t, _ = self._alphas(t, t, x)
        if self.prediction_type == "epsilon":
            return (x - (1 - a_t) ** 0.5 * output) / a_t**0.5
        if self.prediction_type == "sample":
            return output
        return a_t**0.5 * x - (1 - a_t) ** 0.5 * output


class FlowMatchingProcess(NoiseProcess):
    """Rectified flow from a diffusers FlowMatchEulerDiscreteScheduler config (its shift included)."""

    kind = "flow"
    prediction_type = "velocity"

    def __init__(self, scheduler, density: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, precondition_outputs: bool = False):  # fmt: skip
        from diffusers import FlowMatchEulerDiscreteScheduler

        if density not in TIMESTEP_DENSITIES:
            raise ValueError(f"timestep density must be one of {TIMESTEP_DENSITIES}, got {density!r}")
        self.scheduler = (
            scheduler if isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
            else FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler.config))
        )  # fmt: skip
        self.config = dict(self.scheduler.config)
        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        self.density, self.logit_mean, self.logit_std, self.mode_scale = density, logit_mean, logit_std, mode_scale
        self.precondition_outputs = precondition_outputs
        # the training table: the scheduler's sigmas before any set_timesteps (shifted unless dynamic)
        fresh = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        self.train_sigmas = fresh.sigmas.clone().float()  # [T] from ~1 down
        self.train_timesteps = fresh.timesteps.clone().float()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float32) / self.num_train_timesteps

    # ---- training -----------------------------------------------------------------------------------
    def sample_u(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """u in [0, 1) from the density (diffusers' compute_density_for_timestep_sampling)."""
        if self.density == "logit_normal":
            return torch.sigmoid(torch.randn(n, generator=generator) * self.logit_std + self.logit_mean)
        u = torch.rand(n, generator=generator)
        if self.density == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """t = the scheduler's training timestep at index floor(u * T), as the diffusers SD3/FLUX scripts
        draw it; sigma = t / T."""
        index = (self.sample_u(n, generator) * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.train_timesteps[index]

    def add_noise(self, x0, noise, t):
        s = _rows(self.sigma(t), x0).to(x0.dtype)
        return (1.0 - s) * x0 + s * noise

    def target(self, x0, noise, t):
        """The velocity eps - x0; with `precondition_outputs`, x0 (diffusers' SD3 scripts' option)."""
        return x0 if self.precondition_outputs else noise - x0

    def loss_output(self, output, x_t, t):
        """With `precondition_outputs` the loss compares x_t - sigma v with x0, as diffusers' SD3 scripts do
        with `--precondition_outputs 1`: (x_t - sigma v) - x0 = sigma ((eps - x0) - v), so the error is the
        velocity error weighted by sigma^2. Off by default: a DPO built on it silently reweights timesteps."""
        if not self.precondition_outputs:
            return output
        return x_t - _rows(self.sigma(t), x_t).to(output.dtype) * output

    def with_options(self, **options) -> FlowMatchingProcess:
        """The same schedule with other training options (density, logit_mean, logit_std, mode_scale,
        precondition_outputs); None keeps this process's value."""
        current = dict(density=self.density, logit_mean=self.logit_mean, logit_std=self.logit_std,
                       mode_scale=self.mode_scale, precondition_outputs=self.precondition_outputs)  # fmt: skip
        unknown = sorted(set(options) - set(current))
        if unknown:
            raise ValueError(f"unknown flow-matching option(s) {unknown}; known: {sorted(current)}")
        return FlowMatchingProcess(self.scheduler, **(current | {k: v for k, v in options.items() if v is not None}))

    def describe(self) -> str:
        extra = f", {self.density} timesteps" + (", preconditioned outputs" if self.precondition_outputs else "")
        return f"{self.kind} ({self.prediction_type}{extra})"

    # ---- sampling -----------------------------------------------------------------------------------
    def schedule(self, steps: int, mu: float | None = None, sigmas=None, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The scheduler's sampling sigmas for `steps` (with dynamic shifting, `mu` is required, as the
        FLUX pipeline computes it from the image sequence length; `sigmas`, the unshifted sigmas a pipeline
        passes, e.g. FluxPipeline's linspace(1, 1/steps, steps)); t = sigma * T, the last t_prev is 0."""
        if sigmas is not None:
            sigmas = [float(s) for s in sigmas]
            if len(sigmas) != steps:
                raise ValueError(f"got {len(sigmas)} sigmas for {steps} steps")
        self.scheduler.set_timesteps(None if sigmas is not None else steps, sigmas=sigmas, mu=mu)
        ts = (self.scheduler.sigmas.float() * self.num_train_timesteps).tolist()
        return [(torch.tensor(a), torch.tensor(b)) for a, b in zip(ts[:-1], ts[1:])]

    def step(self, output, t, t_prev, x, eta: float = 0.0, noise=None) -> StepResult:
        """Euler ODE step x_prev = x + (sigma_prev - sigma) v when eta = 0; with eta > 0, Flow-GRPO's SDE step:

            std_t = eta * sqrt(sigma / (1 - sigma))   (sigma = 1 replaced by the table's second sigma)
            mean  = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt,  dt = sigma_prev - sigma
            x_prev = mean + std_t sqrt(-dt) noise
        computed in float32 (Flow-GRPO notes bf16 overflows here)."""
        out, xf = output.float(), x.float()
        sigma = _rows(self.sigma(t), xf)
        sigma_prev = _rows(self.sigma(t_prev), xf)
        dt = sigma_prev - sigma
        x0 = xf - sigma * out
        if eta <= 0:
            prev = xf + dt * out
            return StepResult(prev=prev, mean=prev, std=torch.zeros(()), x0=x0)
        sigma_max = float(self.train_sigmas[1]) if len(self.train_sigmas) > 1 else 1.0
        safe = torch.where(sigma >= 1.0, torch.full_like(sigma, sigma_max), sigma)
        std_t = torch.sqrt(sigma / (1 - safe)) * eta
        mean = xf * (1 + std_t**2 / (2 * sigma) * dt) + out * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_t * torch.sqrt(-dt)
        if noise is None:
            raise ValueError("a stochastic step (eta > 0) needs its noise")
        return StepResult(prev=mean + std * noise.float(), mean=mean, std=std, x0=x0)

    def pred_x0(self, output, t, x):
        return x.float() - _rows(self.sigma(t), x) * output.float()


def is_flow_scheduler(scheduler) -> bool:
    """Whether a diffusers scheduler (or its config) is a flow-matching one (FlowMatch* class)."""
    config = scheduler if isinstance(scheduler, dict) else dict(scheduler.config)
    return "FlowMatch" in config.get("_class_name", type(scheduler).__name__)


def make_process(scheduler, prediction_type: str | None = None, **flow_options) -> NoiseProcess:
    """The process a diffusers scheduler config describes: flow matching for FlowMatch* schedulers,
    DDPM-family (epsilon / v / sample) otherwise."""
    if is_flow_scheduler(scheduler):
        if prediction_type is not None:
            raise ValueError(f"model.prediction_type={prediction_type!r}: a flow-matching model predicts the "
                             "velocity; leave prediction_type unset")  # fmt: skip
        return FlowMatchingProcess(scheduler, **{k: v for k, v in flow_options.items() if v is not None})
    given = {k: v for k, v in flow_options.items() if v is not None}
    if given:
        raise ValueError(f"flow-matching options {sorted(given)} given for a {type(scheduler).__name__} model; "
                         "they apply to flow-matching models only (SD3, FLUX, the flow toy)")  # fmt: skip
    return DDPMProcess(scheduler, prediction_type)
