"""GroupNorm followed by SiLU: the plain-torch reference and the fused kernel, with the same signature.

The fused path reads x once for the statistics and once for the output (fp32 statistics, output in x's
dtype and memory layout, NCHW or channels-last), and saves only x and the per-group mean and rstd for the
backward, which recomputes the normalised value instead of keeping GroupNorm's output alive for SiLU's
backward as eager PyTorch does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from diffalign.kernels.runtime import use_triton


def group_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                              num_groups: int, eps: float = 1e-5) -> torch.Tensor:  # fmt: skip
    """silu(group_norm(x)), as diffusers' blocks compute it."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def _triton():
    from diffalign.kernels import _triton_group_norm_silu

    return _triton_group_norm_silu


# Under torch.compile the Triton launches are custom operators, which it keeps as opaque calls (shapes
# from the fake implementations) instead of tracing into Triton; the autograd.Function around them is
# traced. Eager calls launch directly (a custom operator's dispatch costs tens of microseconds).
@torch.library.custom_op("diffalign::group_norm_silu_forward", mutates_args=())
def _forward_op(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _triton().forward(x, weight, bias, num_groups, eps)


@_forward_op.register_fake
def _(x, weight, bias, num_groups, eps):
    stats = x.new_empty(x.shape[0] * num_groups, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("diffalign::group_norm_silu_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                 num_groups: int) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _triton().backward(dy, x, weight, bias, mean, rstd, num_groups)


@_backward_op.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


class GroupNormSiLUFunction(torch.autograd.Function):
    """silu(group_norm(x)) over the Triton kernels (diffalign/kernels/_triton_group_norm_silu.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups: int, eps: float):
        launch = _forward_op if torch.compiler.is_compiling() else _triton().forward
        y, mean, rstd = launch(x, weight, bias, num_groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        launch = _backward_op if torch.compiler.is_compiling() else _triton().backward
        dx, dweight, dbias = launch(dy, *ctx.saved_tensors, ctx.num_groups)
        needs = ctx.needs_input_grad
        return dx if needs[0] else None, dweight if needs[1] else None, dbias if needs[2] else None, None, None


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                    eps: float = 1e-5) -> torch.Tensor:  # fmt: skip
    """silu(group_norm(x)) through the fused kernel when Triton can run it on x's device (see
    diffalign/kernels/runtime.py), else through the reference (said once in the log)."""
    fusable = weight is not None and bias is not None and x.dim() >= 2 and x.shape[1] % num_groups == 0
    if fusable and use_triton(x, "GroupNorm+SiLU"):
        return GroupNormSiLUFunction.apply(x, weight, bias, num_groups, eps)
    return group_norm_silu_reference(x, weight, bias, num_groups, eps)
