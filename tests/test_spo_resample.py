"""The step-wise resampler with scripted scores: which pairs are kept, that one candidate continues, the SDXL
inner-step labelling against a hand-worked trajectory, per-prompt determinism, and a flow-matching backbone."""

from __future__ import annotations

import pytest
import torch

from diffalign.sampling.resample import compare, resample, segments

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd():
    from diffalign.backbones import load_backbone

    return load_backbone("tiny:sd")


class Scripted:
    """A fake step scorer: call i returns script[i] ([B, K] scores) and records what it was given."""

    def __init__(self, script):
        self.script = [torch.tensor(s, dtype=torch.float32) for s in script]
        self.calls = []

    def __call__(self, images, prompts, t):
        self.calls.append({"images": images.clone(), "prompts": list(prompts), "t": t.clone()})
        return self.script[len(self.calls) - 1].flatten()


def test_compare_keeps_pairs_whose_softmax_gap_exceeds_the_threshold():
    import math

    gap = lambda d: math.tanh(d / 2)  # noqa: E731  p_best - p_worst of two scores d apart
    scores = torch.tensor([[0.0, 1.0, 0.5], [2.0, 2.1, 1.95], [3.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    best, worst, kept = compare(scores, threshold=0.3)
    assert best.tolist() == [1, 1, 0, 0] and worst.tolist() == [0, 2, 1, 2]
    assert kept.tolist() == [gap(1.0) > 0.3, gap(0.15) > 0.3, gap(3.0) > 0.3, False] == [True, False, True, False]


def test_segments_of_the_reference_configs():
    assert segments(20, 4, 0) == [(i, i) for i in range(4, 20)]  # SD1.5: 16 one-step segments
    assert segments(20, 4, 3) == [(4, 7), (8, 11), (12, 15), (16, 19)]  # SDXL: 4 x (branch + 3 inner)
    with pytest.raises(ValueError, match="divert_start_step"):
        segments(20, 20, 0)


def _steps(pairs):
    return pairs.step.tolist()


def test_keeps_exactly_the_pairs_above_the_threshold_and_continues_from_one_candidate(sd):
    # 6 DDIM steps, branching from step 2 with K = 3: segments 2, 3, 4, 5; step 5 (the last) is deterministic in
    # the tiny scheduler (final alpha 1), so its candidates coincide and it can give no pair
    script = [[[0.0, 2.0, 1.0]],  # scores x0-hat at step 3 of step 2's candidates: gap tanh(1) > 0.3: kept
              [[1.0, 1.1, 1.05]],  # step 3's: gap 0.05: dropped
              [[4.0, 1.0, 0.0]],  # step 4's: kept (best 0, worst 2)
              [[1.0, 9.0, 1.0]]]  # the final samples (t = 0): the last step is deterministic -> no pair  # fmt: skip
    scorer = Scripted(script)
    out = resample(sd, sd.denoiser, ["a red circle"], [7], scorer, steps=6, guidance=3.0, eta=1.0, divert_start=2,
                   candidates=3, inner_steps=0, threshold=0.3, height=16)  # fmt: skip
    assert _steps(out) == [2, 4] and out.prompt.tolist() == [0, 0]
    assert out.compared == 4 and out.kept == 3 and out.metrics()["kept_fraction"] == 0.75
    schedule = sd.process.schedule(6)
    assert [float(c["t"][0]) for c in scorer.calls] == [float(schedule[i][0]) for i in (3, 4, 5)] + [0.0]
    assert all(len(c["t"]) == 3 and c["prompts"] == ["a red circle"] * 3 for c in scorer.calls)
    # a branch's candidates share x_t; winner and loser are the scored candidates
    assert torch.equal(out.x[0, 0], out.x[0, 1]) and not torch.equal(out.prev[0, 0], out.prev[0, 1])
    # the images scored at step 3 are the decoded x0-hat of step 2's candidates: the winner's (candidate 1) and
    # the loser's (candidate 0) x0-hat differ, as their x_{t-1} do
    x0 = scorer.calls[0]["images"]
    assert not torch.equal(x0[1], x0[0])


def test_sd15_continuation_is_one_of_the_previous_candidates(sd):
    script = [[[0.0, 5.0]]] * 5
    out = resample(sd, sd.denoiser, ["a blue square"], [3], Scripted(script), steps=6, guidance=3.0, eta=1.0,
                   divert_start=1, candidates=2, inner_steps=0, threshold=0.3, height=16)  # fmt: skip
    assert _steps(out) == [1, 2, 3, 4]  # step 5 is deterministic (final alpha 1)
    for p in range(len(out) - 1):  # K = 2: the continuing candidate is the winner or the loser
        nxt = out.x[p + 1, 0]
        assert torch.equal(out.x[p + 1, 1], nxt)  # shared
        assert torch.equal(nxt, out.prev[p, 0]) or torch.equal(nxt, out.prev[p, 1])
    assert (out.prev[:, 0] != out.prev[:, 1]).any()


@pytest.mark.parametrize("winner", [0, 1])
def test_sdxl_inner_steps_label_every_transition_of_the_segment(sd, winner):
    """Hand-worked: 7 steps, divert at 1, 2 inner steps, K = 2 -> segments (1, 2, 3) and (4, 5, 6). The first
    is scored by x0-hat at step 4 and kept with `winner` best: its three transitions become pairs, the branch
    (step 1) sharing x_t, the inner steps 2 and 3 on each candidate's own chain. The second segment is scored at
    t = 0 and also kept, but its step 6 is deterministic (the tiny scheduler's final alpha is 1): steps 4 and
    5 only. Winner of segment 2: candidate 0."""
    first = [0.0, 0.0]
    first[winner] = 5.0
    scorer = Scripted([[first], [[3.0, -3.0]]])
    out = resample(sd, sd.denoiser, ["a green triangle"], [11], scorer, steps=7, guidance=3.0, eta=1.0,
                   divert_start=1, candidates=2, inner_steps=2, threshold=0.3, height=16)  # fmt: skip
    schedule = sd.process.schedule(7)
    assert _steps(out) == [1, 2, 3, 4, 5]
    assert [float(c["t"][0]) for c in scorer.calls] == [float(schedule[4][0]), 0.0]
    w, lo = out.x[:, 0], out.x[:, 1]
    pw, pl = out.prev[:, 0], out.prev[:, 1]
    # the branching transitions (steps 1 and 4) share x_t; the inner ones do not
    assert torch.equal(w[0], lo[0]) and torch.equal(w[3], lo[3])
    assert not torch.equal(w[1], lo[1]) and not torch.equal(w[2], lo[2]) and not torch.equal(w[4], lo[4])
    # each candidate's own chain within a segment: x_t of step s is x_{t-1} of step s - 1
    for s in (1, 2):
        assert torch.equal(w[s], pw[s - 1]) and torch.equal(lo[s], pl[s - 1])
    assert torch.equal(w[4], pw[3]) and torch.equal(lo[4], pl[3])
    # segment 2 branches from the candidate that continued: one of segment 1's final candidates (K = 2)
    assert torch.equal(w[3], pw[2]) or torch.equal(w[3], pl[2])
    # the segment's label comes from the scores of its last candidates: swapping the winner swaps every pair
    other = resample(sd, sd.denoiser, ["a green triangle"], [11], Scripted([[first[::-1]], [[3.0, -3.0]]]),
                     steps=7, guidance=3.0, eta=1.0, divert_start=1, candidates=2, inner_steps=2, threshold=0.3,
                     height=16)  # fmt: skip
    assert torch.equal(other.x[:3], out.x[:3].flip(1)) and torch.equal(other.prev[:3], out.prev[:3].flip(1))


def test_a_prompts_pairs_do_not_depend_on_its_batch(sd):
    def scorer(images, prompts, t):
        return images.float().mean(dim=(1, 2, 3)) * 3000

    kw = dict(steps=6, guidance=3.0, eta=1.0, divert_start=2, candidates=3, inner_steps=1, threshold=0.2, height=16)
    both = resample(sd, sd.denoiser, ["a red circle", "a blue square"], [1, 2], scorer, batch_size=1, **kw)
    alone = resample(sd, sd.denoiser, ["a blue square"], [2], scorer, **kw)
    assert len(alone) > 0 and both.prompt.tolist().count(1) == len(alone)
    assert torch.equal(both.x[both.prompt == 1], alone.x) and torch.equal(both.prev[both.prompt == 1], alone.prev)
    together = resample(sd, sd.denoiser, ["a red circle", "a blue square"], [1, 2], scorer, **kw)
    assert torch.equal(together.step, both.step)
    torch.testing.assert_close(together.prev, both.prev, atol=1e-4, rtol=1e-3)  # batched: float rounding only
    other_seed = resample(sd, sd.denoiser, ["a blue square"], [3], scorer, **kw)
    assert not torch.equal(other_seed.prev[:1], alone.prev[:1])


def tiny_flow_backbone():
    """A pixel-space text-to-image model on a flow-matching scheduler: a flow backbone in miniature."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    from diffalign.backbones.sd import PixelBackbone
    from diffalign.backbones.tiny import tiny_text_encoder, tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                norm_num_groups=8, cross_attention_dim=32)  # fmt: skip
    return PixelBackbone(unet, FlowMatchEulerDiscreteScheduler(shift=3.0), tiny_text_encoder(), tiny_tokenizer())


def test_flow_backbone_resamples_with_the_sde_and_its_pairs_have_a_density():
    from diffalign.sampling import transition_log_prob

    bb = tiny_flow_backbone()
    assert bb.process.kind == "flow"

    def scorer(images, prompts, t):
        return images.float().mean(dim=(1, 2, 3)) * 3000

    out = resample(bb, bb.denoiser, ["a red circle"], [5], scorer, steps=6, guidance=2.0, eta=0.7, divert_start=1,
                   candidates=2, inner_steps=1, threshold=0.1)  # fmt: skip
    assert _steps(out) == [1, 2, 3, 4, 5]  # every flow SDE step is stochastic, the last included
    schedule = bb.process.schedule(6)
    cond, uncond = bb.encode_text(["a red circle"] * 2), bb.empty_conditioning(2)
    for p in range(len(out)):
        t, t_prev = schedule[int(out.step[p])]
        lp = transition_log_prob(bb, bb.denoiser, out.x[p], out.prev[p], t, t_prev, cond, uncond, 2.0, 0.7)
        assert torch.isfinite(lp).all() and (lp > -5).all()  # the sample is typical under its own transition
