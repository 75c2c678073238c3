"""SPO: step-by-step preference optimisation (Liang et al., arXiv 2406.04314, CVPR 2025).

Reference: RockeyCoss/SPO `spo_training_and_inference/train_scripts/train_spo.py` (and `_sdxl.py`), the
training loop after the step-wise resampler (diffalign/sampling/resample.py) has chosen a (win, lose) pair
of one denoising transition x_t -> x_{t-1}.

Energies here are MINUS transition log-probabilities, e = -log p(x_{t-1} | x_t) (the Gaussian of the
stochastic DDIM / flow-SDE step, averaged over the latent dimensions; diffalign.sampling.transition_log_prob),
so that, as for every objective, a lower energy means the model likes the candidate more. Then

    log r = log p_policy - log p_ref = ref_energy - energy
    r_c   = clamp(exp(log r), 1 - clip, 1 + clip)          a HARD clamp: zero gradient outside the band
    loss  = -log sigmoid(beta * (log r_c,w - log r_c,l))

averaged over the pairs. Defaults beta = 10 (`train.beta`) and clip = 0.1 (`train.eps`), from the
reference's configs/basic_config.py.
"""

from __future__ import annotations

import pydantic
import torch
import torch.nn.functional as F

from diffalign.objectives.base import Objective, Params, implicit_accuracy, register


class SPOParams(Params):
    #: the reference's train.beta (configs/basic_config.py)
    beta: float = pydantic.Field(10.0, gt=0)
    #: the ratio band half-width, the reference's train.eps (configs/basic_config.py); the ratio is clamped to
    #: [1 - clip, 1 + clip] with torch.clamp, so pairs outside the band give no gradient
    clip: float = pydantic.Field(0.1, gt=0, lt=1)


def spo_loss(energy: torch.Tensor, ref_energy: torch.Tensor, phi: torch.Tensor | None = None, *, beta: float = 10.0,
             clip: float = 0.1) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """energy / ref_energy [P, 2]: -log p of the winner's (column 0) and loser's transition under the policy and
    the reference. Returns the mean loss over the P pairs and detached metrics."""
    if energy.shape[-1] != 2:
        raise ValueError(f"SPO takes (win, lose) transition pairs; got {energy.shape[-1]} candidates per item")
    raw = torch.exp(ref_energy.detach() - energy)
    ratio = torch.clamp(raw, 1 - clip, 1 + clip)
    inside = beta * (torch.log(ratio[:, 0]) - torch.log(ratio[:, 1]))
    loss = -F.logsigmoid(inside).mean()
    outside = (raw.detach() < 1 - clip) | (raw.detach() > 1 + clip)
    metrics = {
        "ratio_win": ratio[:, 0].detach().mean(),
        "ratio_lose": ratio[:, 1].detach().mean(),
        "clipped": outside.float().mean(),
        "implicit_acc": implicit_accuracy(inside),
        "logp_w": -energy[:, 0].detach().mean(),
        "logp_l": -energy[:, 1].detach().mean(),
    }
    return loss, metrics


register(Objective("spo", spo_loss, needs_reference=True, params=SPOParams, formats=("prompts",),
                   experience=("rollout",)))  # fmt: skip
