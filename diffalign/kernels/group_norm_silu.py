"""GroupNorm followed by SiLU: the plain-torch reference and the fused kernel, with the same signature.

The fused path reads x once for the statistics and once for the output (fp32 statistics, output in x's
dtype and memory layout, NCHW or channels-last), and saves only x and the per-group mean and rstd for the
backward, which recomputes the normalised value instead of keeping GroupNorm's output alive for SiLU's
backward as eager PyTorch does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from diffalign.kernels.runtime import use_triton


def group_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                              num_groups: int, eps: float = 1e-5) -> torch.Tensor:  # fmt: skip
    """silu(group_norm(x)), as diffusers' blocks compute it."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


class GroupNormSiLUFunction(torch.autograd.Function):
    """silu(group_norm(x)) over the Triton kernels (diffalign/kernels/_triton_group_norm_silu.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups: int, eps: float):
        from diffalign.kernels import _triton_group_norm_silu as tk

        y, mean, rstd = tk.forward(x, weight, bias, num_groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        from diffalign.kernels import _triton_group_norm_silu as tk

        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = tk.backward(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.needs_input_grad[0])
        return (dx, dweight if ctx.needs_input_grad[1] else None, dbias if ctx.needs_input_grad[2] else None,
                None, None)  # fmt: skip


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                    eps: float = 1e-5) -> torch.Tensor:  # fmt: skip
    """silu(group_norm(x)) through the fused kernel when Triton can run it on x's device (see
    diffalign/kernels/runtime.py), else through the reference (said once in the log)."""
    fusable = weight is not None and bias is not None and x.dim() >= 2 and x.shape[1] % num_groups == 0
    if fusable and use_triton(x, "GroupNorm+SiLU"):
        return GroupNormSiLUFunction.apply(x, weight, bias, num_groups, eps)
    return group_norm_silu_reference(x, weight, bias, num_groups, eps)
