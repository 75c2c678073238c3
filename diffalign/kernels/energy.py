"""Per-sample energy: the mean over each sample's elements of (pred - target)^2, in fp32. The plain-torch
reference and the fused kernel, with the same signature.

The reference upcasts both tensors (a full fp32 copy of a bf16 / fp16 prediction), squares into another
full tensor and reduces it; the fused kernel reads pred and target once in their own dtypes and writes one
fp32 number per sample, and its backward writes the gradient directly in pred's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from diffalign.kernels.runtime import use_triton


def per_sample_mse_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] float32: mean over all but the first dimension of (pred - target)^2, computed in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))


class PerSampleMSEFunction(torch.autograd.Function):
    """per_sample_mse_reference over the Triton kernels (diffalign/kernels/_triton_energy.py)."""

    @staticmethod
    def forward(ctx, pred, target):
        from diffalign.kernels import _triton_energy as tk

        pred, target = pred.contiguous(), target.contiguous()
        ctx.save_for_backward(pred, target)
        return tk.forward(pred, target)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        from diffalign.kernels import _triton_energy as tk

        pred, target = ctx.saved_tensors
        return tk.backward(grad, pred, target, *ctx.needs_input_grad[:2])


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """per_sample_mse_reference through the fused kernel when Triton can run it on pred's device (see
    diffalign/kernels/runtime.py), else through the reference (said once in the log)."""
    fusable = pred.shape == target.shape and pred.dim() >= 2 and target.dtype in (torch.float32, pred.dtype)
    if fusable and pred.device == target.device and use_triton(pred, "the per-sample energy"):
        return PerSampleMSEFunction.apply(pred, target)
    return per_sample_mse_reference(pred, target)
