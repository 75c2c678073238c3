"""Per-sample energy: the mean over each sample's elements of (pred - target)^2, in fp32. The plain-torch
reference and the fused kernel, with the same signature.

The reference upcasts both tensors (a full fp32 copy of a bf16 / fp16 prediction), squares into another
full tensor and reduces it; the fused kernel reads pred and target once in their own dtypes and writes one
fp32 number per sample, and its backward writes the gradient directly in pred's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from diffalign.kernels.runtime import use_triton


def per_sample_mse_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] float32: mean over all but the first dimension of (pred - target)^2, computed in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))


def _triton():
    from diffalign.kernels import _triton_energy

    return _triton_energy


# Custom operators under torch.compile, direct launches in eager mode (see group_norm_silu.py).
@torch.library.custom_op("diffalign::per_sample_mse_forward", mutates_args=())
def _forward_op(pred: Tensor, target: Tensor) -> Tensor:
    return _triton().forward(pred, target)


@_forward_op.register_fake
def _(pred, target):
    return pred.new_empty(pred.shape[0], dtype=torch.float32)


@torch.library.custom_op("diffalign::per_sample_mse_backward", mutates_args=())
def _backward_op(grad: Tensor, pred: Tensor, target: Tensor, need_pred: bool, need_target: bool) -> tuple[Tensor, Tensor]:
    """(grad pred, grad target); an empty tensor for one not needed."""
    dp, dt = _triton().backward(grad, pred, target, need_pred, need_target)
    return (dp if need_pred else pred.new_empty(0)), (dt if need_target else target.new_empty(0))


@_backward_op.register_fake
def _(grad, pred, target, need_pred, need_target):
    return (torch.empty_like(pred) if need_pred else pred.new_empty(0),
            torch.empty_like(target) if need_target else target.new_empty(0))  # fmt: skip


class PerSampleMSEFunction(torch.autograd.Function):
    """per_sample_mse_reference over the Triton kernels (diffalign/kernels/_triton_energy.py)."""

    @staticmethod
    def forward(ctx, pred, target):
        pred, target = pred.contiguous(), target.contiguous()
        ctx.save_for_backward(pred, target)
        return (_forward_op if torch.compiler.is_compiling() else _triton().forward)(pred, target)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        need_pred, need_target = ctx.needs_input_grad[:2]
        launch = _backward_op if torch.compiler.is_compiling() else _triton().backward
        dp, dt = launch(grad, *ctx.saved_tensors, need_pred, need_target)
        return (dp if need_pred else None), (dt if need_target else None)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """per_sample_mse_reference through the fused kernel when Triton can run it on pred's device (see
    diffalign/kernels/runtime.py), else through the reference (said once in the log)."""
    fusable = pred.shape == target.shape and pred.dim() >= 2 and target.dtype in (torch.float32, pred.dtype)
    if fusable and pred.device == target.device and use_triton(pred, "the per-sample energy"):
        return PerSampleMSEFunction.apply(pred, target)
    return per_sample_mse_reference(pred, target)
