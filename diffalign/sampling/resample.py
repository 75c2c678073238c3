"""SPO's step-wise resampler: roll out prompts, branch candidates of one denoising step, keep the (win, lose)
transitions a step scorer tells apart.

Reference: RockeyCoss/SPO `spo/custom_diffusers/multi_sample_pipeline.py` (SD1.5) and
`multi_sample_pipeline_sdxl.py` (SDXL, `num_inner_step`), `spo/preference_models/compare_funcs.py`.
For each prompt, with a stochastic sampler (DDIM with eta, or the flow SDE):

1. steps 0 .. divert_start - 1 are one ordinary trajectory;
2. at a branch step, K candidates x_{t-1} are drawn from the shared x_t (the same mean, K independent
   noises), and each candidate then takes `inner_steps` ordinary single-sample steps (SDXL: 3; SD1.5: 0);
3. at the next branch step every candidate's predicted clean sample x0-hat (the guided prediction at that
   step) is decoded and scored by the step scorer at that step's timestep; after the last step the final
   samples are decoded and scored at t = 0;
4. the best and the worst candidate are softmaxed; when p_best - p_worst > threshold, every transition of
   the segment becomes a (win, lose) pair: the branching transition, whose x_t the two share, and the inner
   transitions, whose x_t are the candidates' own;
5. one candidate, drawn uniformly, continues (its guided prediction at the branch step is reused) and
   branches again.

A deterministic transition (std 0: DDIM's last step when the scheduler's final alpha is 1, which
`set_alpha_to_one` gives; SD1.5 and SDXL set it false, and the reference clamps the last step to alpha_0)
has no density and gives no pair.

Segments start at divert_start, divert_start + (inner_steps + 1), ... The reference's SDXL pipeline ends a
segment early only at the last step; here a branch point that falls on the last step branches (as the
SD1.5 pipeline does at every step), which gives the same segments for both reference configs (20 steps,
divert 4, inner 0 or 3).

Determinism: every random draw of prompt i (its initial noise, each step's noise, each candidate's noise,
which candidate continues) comes from one CPU generator seeded with seeds[i], in a fixed order, so a
prompt's pairs depend on its prompt, seed and model only, not on the batch it is rolled out in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffalign.backbones.base import Backbone, select_rows
from diffalign.backbones.processes import StepResult
from diffalign.sampling.loop import (
    _model_device,
    _model_dtype,
    guided_output,
    sampling_conditions,
    sampling_schedule,
)

#: fn(images [N, 3, H, W] in [-1, 1], prompts [N], t [N]) -> scores [N] (diffalign.rewards.spm.as_step_scorer)
StepScorer = Callable[[torch.Tensor, list, torch.Tensor], torch.Tensor]


@dataclass
class RolloutPairs:
    """The kept (win, lose) transitions of a rollout, ordered by prompt, then step.

    x[p, 0] -> prev[p, 0] is the winner's transition and x[p, 1] -> prev[p, 1] the loser's, at schedule step
    step[p] of prompt prompt[p] (an index into the prompts). `scores` holds every score the step scorer gave
    (for the logged mean and std); `compared` counts the (prompt, segment) comparisons and `kept` the kept
    ones."""

    x: torch.Tensor  # [P, 2, *latent]
    prev: torch.Tensor  # [P, 2, *latent]
    step: torch.Tensor  # [P] long
    prompt: torch.Tensor  # [P] long
    scores: torch.Tensor  # [n_scored]
    compared: int
    kept: int

    def __len__(self) -> int:
        return len(self.step)

    def metrics(self) -> dict[str, float]:
        s = self.scores.float()
        return {
            "kept_fraction": self.kept / max(self.compared, 1),
            "kept_pairs": float(len(self)),
            "preference_score_mean": float(s.mean()) if len(s) else 0.0,
            "preference_score_std": float(s.std()) if len(s) > 1 else 0.0,
        }


def compare(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [B, K] -> (best [B], worst [B], kept [B]): the candidates sorted by score (descending, stable),
    the first and the last, and whether softmax(best, worst) differs by more than `threshold`
    (compare_funcs.py `preference_score_compare`)."""
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    best, worst = order[:, 0], order[:, -1]
    pair = torch.stack([scores.gather(1, best[:, None])[:, 0], scores.gather(1, worst[:, None])[:, 0]], 1)
    p = pair.float().softmax(dim=1)
    return best, worst, (p[:, 0] - p[:, 1]) > threshold


def segments(steps: int, divert_start: int, inner_steps: int) -> list[tuple[int, int]]:
    """(first, last) schedule index of every branch segment."""
    if not 0 <= divert_start < steps:
        raise ValueError(f"divert_start_step must be in [0, {steps}), got {divert_start}")
    starts = list(range(divert_start, steps, inner_steps + 1))
    return [(s, min(s + inner_steps, steps - 1)) for s in starts]


def _std(step: StepResult, device) -> torch.Tensor:
    """The step's std, shaped to broadcast against [B, K, *latent]."""
    std = torch.as_tensor(step.std, device=device)
    return std.unsqueeze(1) if std.ndim else std


def _stochastic(step: StepResult) -> bool:
    return bool((torch.as_tensor(step.std) > 0).all())


def _draw(gens: list[torch.Generator], shape, k: int, device, dtype) -> torch.Tensor:
    """[B, k, *shape]: k standard normal draws from each prompt's generator, in order."""
    return torch.stack([torch.randn((k, *shape), generator=g) for g in gens]).to(device=device, dtype=dtype)


@torch.no_grad()
def resample(backbone: Backbone, model, prompts: Sequence[str], seeds: Sequence[int], scorer: StepScorer,
             steps: int = 20, guidance: float = 5.0, eta: float = 1.0, divert_start: int = 4, candidates: int = 4,
             inner_steps: int = 0, threshold: float = 0.3, height: int | None = None, width: int | None = None,
             batch_size: int = 256, dtype: torch.dtype | None = None) -> RolloutPairs:  # fmt: skip
    """Roll out every prompt (one per seed) and return its kept transition pairs (see the module docstring).
    Prompts run `batch_size` at a time (each batch's K candidates in one model call)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if eta <= 0:
        raise ValueError("the step-wise resampler needs a stochastic sampler (eta > 0): candidates differ by noise")
    if candidates < 2:
        raise ValueError(f"the step-wise resampler compares candidates: candidates must be >= 2, got {candidates}")
    parts = []
    for start in range(0, len(prompts), batch_size):
        part = _resample_batch(backbone, model, list(prompts[start : start + batch_size]),
                               list(seeds[start : start + batch_size]), scorer, steps, guidance, eta, divert_start,
                               candidates, inner_steps, threshold, height, width, dtype)  # fmt: skip
        part.prompt += start
        parts.append(part)
    return RolloutPairs(x=torch.cat([p.x for p in parts]), prev=torch.cat([p.prev for p in parts]),
                        step=torch.cat([p.step for p in parts]), prompt=torch.cat([p.prompt for p in parts]),
                        scores=torch.cat([p.scores for p in parts]), compared=sum(p.compared for p in parts),
                        kept=sum(p.kept for p in parts))  # fmt: skip


def _resample_batch(backbone, model, prompts, seeds, scorer, steps, guidance, eta, divert_start, K, inner_steps,
                    threshold, height, width, dtype) -> RolloutPairs:  # fmt: skip
    device, dtype = _model_device(model), dtype or _model_dtype(model)
    height = height or width or backbone.default_size()
    width = width or height
    shape = backbone.latent_shape(height, width)
    process = backbone.process
    schedule = sampling_schedule(backbone, steps, height, width)
    B = len(prompts)
    cond, uncond = sampling_conditions(backbone, prompts, height, width, guidance, device, dtype)
    rep = torch.arange(B).repeat_interleave(K)  # candidate row b * K + k belongs to prompt b
    cond_k = select_rows(cond, rep)
    uncond_k = select_rows(uncond, rep) if uncond is not None else None
    prompts_k = [prompts[int(b)] for b in rep]
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    x = _draw(gens, shape, 1, device, dtype)[:, 0] * process.init_noise_sigma
    for t, t_prev in schedule[:divert_start]:
        pred = guided_output(backbone, model, x, t, cond, uncond, guidance)
        noise = _draw(gens, shape, 1, device, dtype)[:, 0]
        x = process.step(pred, t, t_prev, x, eta, noise).prev.to(dtype)

    # the first branch step's mean and std, from the shared x_t
    t, t_prev = schedule[divert_start]
    pred = guided_output(backbone, model, x, t, cond, uncond, guidance)
    branch = process.step(pred, t, t_prev, x, eta, torch.zeros_like(x))
    pairs_x, pairs_prev, pairs_step, pairs_prompt, all_scores = [], [], [], [], []
    compared = kept_total = 0
    for first, last in segments(len(schedule), divert_start, inner_steps):
        # branch: K candidates from the shared x_t (the same mean, independent noise)
        noise = _draw(gens, shape, K, device, dtype)  # [B, K, ...]
        cand = (branch.mean.unsqueeze(1) + _std(branch, device) * noise).to(dtype)
        seg_x, seg_prev = [x.unsqueeze(1).expand(B, K, *shape)], [cand]
        seg_random = [_stochastic(branch)]
        cur = cand.reshape(B * K, *shape)
        for i in range(first + 1, last + 1):  # inner single-sample steps of every candidate
            t, t_prev = schedule[i]
            pred = guided_output(backbone, model, cur, t, cond_k, uncond_k, guidance)
            noise = _draw(gens, shape, K, device, dtype).reshape(B * K, *shape)
            res = process.step(pred, t, t_prev, cur, eta, noise)
            seg_x.append(cur.view(B, K, *shape))
            cur = res.prev.to(dtype)
            seg_prev.append(cur.view(B, K, *shape))
            seg_random.append(_stochastic(res))
        # score the segment's result: x0-hat at the next branch step, or the final samples at t = 0
        if last == len(schedule) - 1:
            step_all = None
            images = backbone.decode(cur)
            t_score = torch.zeros(B * K)
        else:
            t, t_prev = schedule[last + 1]
            pred = guided_output(backbone, model, cur, t, cond_k, uncond_k, guidance)
            step_all = process.step(pred, t, t_prev, cur, eta, torch.zeros_like(cur))
            images = backbone.decode(step_all.x0.to(dtype))
            t_score = torch.as_tensor(t, dtype=torch.float32).reshape(1).expand(B * K)
        scores = scorer(images, prompts_k, t_score).float().cpu().view(B, K)
        all_scores.append(scores.flatten())
        best, worst, kept = compare(scores, threshold)
        compared += B
        kept_total += int(kept.sum())
        for b in torch.nonzero(kept).flatten().tolist():
            w, lo = int(best[b]), int(worst[b])
            for j, (sx, sp, random) in enumerate(zip(seg_x, seg_prev, seg_random)):
                if random:  # a deterministic transition (std 0) has no density: no pair
                    pairs_x.append(torch.stack([sx[b, w], sx[b, lo]]))
                    pairs_prev.append(torch.stack([sp[b, w], sp[b, lo]]))
                    pairs_step.append(first + j)
                    pairs_prompt.append(b)
        if step_all is None:
            break
        # one candidate, drawn uniformly, continues; its prediction at the branch step is reused
        choice = torch.tensor([int(torch.randint(K, (1,), generator=g)) for g in gens])
        rows = (torch.arange(B) * K + choice).to(cur.device)
        x = cur[rows]
        std = torch.as_tensor(step_all.std)
        branch = StepResult(prev=step_all.prev[rows], mean=step_all.mean[rows], x0=step_all.x0[rows],
                            std=std[rows.to(std.device)] if std.ndim else std)  # fmt: skip

    order = sorted(range(len(pairs_step)), key=lambda p: (pairs_prompt[p], pairs_step[p]))
    empty = torch.zeros((0, 2, *shape), device=device, dtype=dtype)
    return RolloutPairs(
        x=torch.stack([pairs_x[p] for p in order]) if order else empty,
        prev=torch.stack([pairs_prev[p] for p in order]) if order else empty.clone(),
        step=torch.tensor([pairs_step[p] for p in order], dtype=torch.long),
        prompt=torch.tensor([pairs_prompt[p] for p in order], dtype=torch.long),
        scores=torch.cat(all_scores), compared=compared, kept=kept_total,
    )  # fmt: skip
