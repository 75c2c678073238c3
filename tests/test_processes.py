"""Noise processes and the sampling loop, against independent computations: closed-form Gaussians in
float64 numpy, diffusers' own DDIM step and a diffusers-scheduler sampling loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffalign.backbones.processes import DDPMProcess, FlowMatchingProcess, gaussian_log_prob

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ddpm(prediction_type="epsilon", **kw):
    from diffusers import DDPMScheduler

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               prediction_type=prediction_type, clip_sample=False, steps_offset=1) | kw  # fmt: skip
    return DDPMProcess(DDPMScheduler(**cfg))


def _alphas_cumprod_f64(beta_start=0.00085, beta_end=0.012, n=1000):
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2  # scaled_linear
    return np.cumprod(1.0 - betas)


def _sd3_flow(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchingProcess(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), **kw)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_with_eta_zero_is_diffusers_ddim_bit_for_bit(prediction_type):
    from diffusers import DDIMScheduler

    proc = _ddpm(prediction_type, clip_sample=prediction_type == "sample")
    ref = DDIMScheduler.from_config(proc.config)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for t, t_prev in proc.schedule(10):
        out = torch.randn(3, 4, 8, 8, generator=g) * 2
        mine = proc.step(out, t, t_prev, x)
        theirs = ref.step(out, t, x, eta=0.0)
        assert torch.equal(mine.prev, theirs.prev_sample) and torch.equal(mine.x0, theirs.pred_original_sample)
        x = mine.prev


def test_ddim_transition_log_prob_is_the_closed_form_gaussian():
    proc = _ddpm("epsilon")
    abar = _alphas_cumprod_f64()
    eta = 1.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    eps_hat = torch.randn(2, 4, 8, 8, generator=g)
    for t, t_prev in ((981, 931), (481, 431), (31, -19)):
        noise = torch.randn(2, 4, 8, 8, generator=g)
        step = proc.step(eps_hat, torch.tensor(t), torch.tensor(t_prev), x, eta=eta, noise=noise)
        a, ap = abar[t], (abar[t_prev] if t_prev >= 0 else 1.0)  # set_alpha_to_one: final alpha 1
        xn, en = x.double().numpy(), eps_hat.double().numpy()
        x0 = (xn - math.sqrt(1 - a) * en) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        mean = math.sqrt(ap) * x0 + math.sqrt(max(1 - ap - sigma**2, 0.0)) * en
        np.testing.assert_allclose(step.mean.double().numpy(), mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(float(step.std), sigma, rtol=1e-5, atol=1e-7)
        expected = stats.norm.logpdf(step.prev.double().numpy(), loc=mean, scale=max(sigma, 1e-300))
        got = gaussian_log_prob(step.prev, step.mean, step.std)
        if sigma > 0:
            np.testing.assert_allclose(got.numpy(), expected.reshape(2, -1).mean(1), rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(step.prev, step.mean + step.std * noise)


def test_flow_noising_target_and_timesteps_are_the_closed_form():
    proc = _sd3_flow(density="uniform")
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1000.0, 500.0, 10.0])
    s = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(proc.add_noise(x0, noise, t), (1 - s) * x0 + s * noise)
    torch.testing.assert_close(proc.target(x0, noise, t), noise - x0)
    # training timesteps come from the shifted sigma table: sigma' = shift s / (1 + (shift - 1) s)
    tt = proc.sample_t(2000, torch.Generator().manual_seed(0))
    sig = (tt / 1000).double().numpy()
    raw = np.linspace(1.0, 1 / 1000, 1000)
    table = 3.0 * raw / (1 + 2.0 * raw)  # every drawn sigma is one of the table's shifted values
    assert np.abs(sig[:, None] - table[None, :]).min(axis=1).max() < 1e-6
    assert len(np.unique(sig)) > 500


@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_flow_timestep_density_matches_its_distribution(density):
    proc = _sd3_flow(density=density)
    u = proc.sample_u(20000, torch.Generator().manual_seed(123)).double().numpy()
    if density == "uniform":
        p = stats.kstest(u, "uniform").pvalue
    elif density == "logit_normal":
        p = stats.kstest(np.log(u / (1 - u)), "norm").pvalue  # logit(u) ~ N(0, 1)
    else:  # u = 1 - v - s (cos^2(pi v / 2) - 1 + v) with v ~ U(0, 1), s = 1.29
        v = np.random.default_rng(5).random(200000)
        ref = 1 - v - 1.29 * (np.cos(np.pi * v / 2) ** 2 - 1 + v)
        p = stats.ks_2samp(u, ref).pvalue
    assert p > 0.01, p
    # and a wrong distribution is rejected by the same test (the check can fail)
    assert stats.kstest(u**2, "uniform").pvalue < 1e-6


def test_flow_sde_transition_log_prob_is_the_closed_form_gaussian():
    proc = _sd3_flow()
    eta = 0.7  # Flow-GRPO's noise_level
    sched = proc.schedule(10)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t, t_prev in sched[:-1]:
        v = torch.randn(2, 4, 8, 8, generator=g)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        step = proc.step(v, t, t_prev, x, eta=eta, noise=noise)
        s, sp = float(t) / 1000, float(t_prev) / 1000
        dt = sp - s
        s_safe = float(proc.train_sigmas[1]) if s >= 1 else s
        std_t = eta * math.sqrt(s / (1 - s_safe))
        xn, vn = x.double().numpy(), v.double().numpy()
        mean = xn * (1 + std_t**2 / (2 * s) * dt) + vn * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        std = std_t * math.sqrt(-dt)
        np.testing.assert_allclose(step.mean.double().numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(step.std.flatten()[0]), std, rtol=1e-5)
        prev = step.prev.double().numpy()
        np.testing.assert_allclose(prev, mean + std * noise.double().numpy(), rtol=1e-4, atol=1e-5)
        expected = stats.norm.logpdf(prev, loc=mean, scale=std).reshape(2, -1).mean(1)
        np.testing.assert_allclose(gaussian_log_prob(step.prev, step.mean, step.std).numpy(), expected,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        x = step.prev
    # eta = 0 is the Euler ODE step
    t, t_prev = sched[0]
    v = torch.randn(2, 4, 8, 8, generator=g)
    ode = proc.step(v, t, t_prev, x)
    torch.testing.assert_close(ode.prev, x + (t_prev - t) / 1000 * v)


# ---- the sampling loop ------------------------------------------------------------------------------------


def _reference_toy_sampler(unet, text_encoder, tokenizer, scheduler_config, prompts, seeds, steps, guidance,
                           batch_size):  # fmt: skip
    """The toy world's original sampler (diffusers' DDIMScheduler driving the loop; guided x0 clipped
    before the step for an x0-predicting model): the reference the new loop must reproduce bit for bit.
    Returns the final float samples."""
    from diffusers import DDIMScheduler

    from diffalign.toy.text import encode_prompts

    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(steps)
    clip_x0 = ddim.config.prediction_type == "sample" and ddim.config.clip_sample
    out = []
    for start in range(0, len(prompts), batch_size):
        ps = list(prompts[start : start + batch_size])
        cond = encode_prompts(tokenizer, text_encoder, ps)
        if guidance > 1.0:
            context = torch.cat([encode_prompts(tokenizer, text_encoder, [""]).expand_as(cond), cond])
        rows = [torch.randn((3, 16, 16), generator=torch.Generator("cpu").manual_seed(int(s)))
                for s in seeds[start : start + batch_size]]  # fmt: skip
        x = torch.stack(rows) * ddim.init_noise_sigma
        for t in ddim.timesteps:
            if guidance > 1.0:
                u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
                pred = u + guidance * (c - u)
                if clip_x0:
                    pred = pred.clamp(-1, 1)
            else:
                pred = unet(x, t, encoder_hidden_states=cond).sample
            x = ddim.step(pred, t, x, eta=0.0).prev_sample
        out.append(x)
    return torch.cat(out)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_loop_reproduces_the_toy_sampler_bit_for_bit(prediction_type, guidance):
    from diffalign.sampling import sample
    from diffalign.toy.base import QUICK_RECIPE, build_init_backbone

    bb = build_init_backbone(QUICK_RECIPE.__class__(**{**QUICK_RECIPE.__dict__, "prediction_type": prediction_type}))
    prompts = ["a red circle", "a blue square", "a green triangle", "a cyan circle", "a red square"]
    seeds = [3, 1, 4, 1, 5]
    ref = _reference_toy_sampler(bb.denoiser, bb.text_encoder, bb.tokenizer, bb.noise_scheduler.config, prompts,
                                 seeds, steps=6, guidance=guidance, batch_size=3)  # fmt: skip
    mine = sample(bb, bb.denoiser, prompts, seeds, steps=6, guidance=guidance, batch_size=3, height=16).latents
    assert torch.equal(mine, ref)
    # an image depends on its prompt and seed only, not on its batch
    alone = sample(bb, bb.denoiser, prompts[3:4], seeds[3:4], steps=6, guidance=guidance, height=16).latents
    torch.testing.assert_close(alone[0], mine[3], rtol=1e-3, atol=1e-4)  # up to float rounding of the batch


def test_stochastic_sampling_records_a_trajectory_with_transition_log_probs():
    from diffalign.sampling import sample, transition_log_prob

    bb = __import__("diffalign.backbones", fromlist=["load_backbone"]).load_backbone("tiny:sd")
    out = sample(bb, bb.denoiser, ["a", "b"], [7, 8], steps=4, guidance=3.0, eta=1.0, height=32, trajectory=True)
    traj = out.trajectories
    assert len(traj.x) == 5 and len(traj.log_prob) == 4 and torch.equal(traj.x[-1], out.latents)
    again = sample(bb, bb.denoiser, ["a", "b"], [7, 8], steps=4, guidance=3.0, eta=1.0, height=32).latents
    assert torch.equal(again, out.latents)  # the step noise is a function of the seeds
    cond = {k: v for k, v in bb.encode_text(["a", "b"]).items()}
    uncond = bb.empty_conditioning(2)
    assert traj.log_prob[-1] is None  # the tiny schedule's final alpha is 1: the last step is deterministic
    with pytest.raises(ValueError, match="zero variance"):
        transition_log_prob(bb, bb.denoiser, traj.x[3], traj.x[4], traj.t[3], traj.t_prev[3], cond, uncond, 3.0)
    for i in range(3):
        lp = transition_log_prob(bb, bb.denoiser, traj.x[i], traj.x[i + 1], traj.t[i], traj.t_prev[i], cond, uncond,
                                 guidance=3.0, eta=1.0)  # fmt: skip
        torch.testing.assert_close(lp, traj.log_prob[i], rtol=1e-5, atol=1e-5)


def test_flow_schedule_takes_a_pipelines_sigmas_and_mu():
    """FluxPipeline's schedule: sigmas linspace(1, 1/n, n) shifted by mu (dynamic shifting); our (t, t_prev)
    pairs are its timesteps and the next ones, ending at 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
               base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    proc = FlowMatchingProcess(FlowMatchEulerDiscreteScheduler(**cfg))
    sigmas, mu = np.linspace(1.0, 1 / 6, 6), 0.83
    sched = proc.schedule(6, mu=mu, sigmas=sigmas)
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    assert [float(t) for t, _ in sched] == pytest.approx(ref.timesteps.tolist(), rel=1e-6)
    assert float(sched[-1][1]) == 0.0 and float(sched[0][1]) == pytest.approx(float(ref.timesteps[1]), rel=1e-6)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / sigmas[1] - 1))  # the exponential time shift at sigma = 5/6
    assert float(sched[1][0]) / 1000 == pytest.approx(shifted, rel=1e-5)
    with pytest.raises(ValueError, match="mu"):
        proc.schedule(6)
    with pytest.raises(ValueError, match="3 sigmas for 6 steps"):
        proc.schedule(6, mu=mu, sigmas=[1.0, 0.5, 0.2])


def test_flow_precondition_outputs_closed_form_and_options():
    proc = _sd3_flow()
    pre = proc.with_options(precondition_outputs=True, density="mode")
    assert (pre.density, pre.logit_std, proc.precondition_outputs) == ("mode", 1.0, False)
    g = torch.Generator().manual_seed(4)
    x0, noise, v = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([980.0, 500.0, 30.0])
    s = (t / 1000).view(-1, 1, 1, 1)
    xt = pre.add_noise(x0, noise, t)
    # diffusers' SD3 scripts: model_pred * (-sigma) + noisy compared with x0 ...
    torch.testing.assert_close(pre.loss_output(v, xt, t), xt - s * v)
    torch.testing.assert_close(pre.target(x0, noise, t), x0)
    # ... which is the velocity error scaled by sigma: a sigma^2-weighted velocity MSE
    torch.testing.assert_close(pre.loss_output(v, xt, t) - pre.target(x0, noise, t), s * ((noise - x0) - v),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert torch.equal(proc.loss_output(v, xt, t), v)
    with pytest.raises(ValueError, match="unknown flow-matching option"):
        proc.with_options(weighting="sigma_sqrt")


def test_make_process_refuses_options_of_the_other_kind():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from diffalign.backbones.processes import make_process

    with pytest.raises(ValueError, match="flow-matching options"):
        make_process(DDPMScheduler(), density="uniform")
    with pytest.raises(ValueError, match="velocity"):
        make_process(FlowMatchEulerDiscreteScheduler(), "epsilon")
    assert make_process(FlowMatchEulerDiscreteScheduler(), density="uniform").density == "uniform"
