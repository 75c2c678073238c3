"""Triton kernels of the per-sample squared error (imported only when Triton runs them).

pred and target are viewed as [N, D] in their own dtypes and read once; each program sums (pred -
target)^2 in fp32 over one chunk of one sample and writes the partial sum, which torch adds up in a fixed
order (no atomics, so the result does not depend on scheduling). The backward writes
grad * 2 (pred - target) / D straight in pred's (and target's) dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _partial_kernel(P, T, OUT, D, NCHUNK, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    i = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = i < D
    p = tl.load(P + n * D + i, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T + n * D + i, mask=mask, other=0.0).to(tl.float32)
    d = p - t
    tl.store(OUT + n * NCHUNK + chunk, tl.sum(d * d))


@triton.jit
def _backward_kernel(P, T, G, DP, DT, D, scale, BLOCK: tl.constexpr, HAS_DP: tl.constexpr, HAS_DT: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < D
    p = tl.load(P + n * D + i, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T + n * D + i, mask=mask, other=0.0).to(tl.float32)
    d = (p - t) * (tl.load(G + n) * scale)
    if HAS_DP:
        tl.store(DP + n * D + i, d.to(DP.dtype.element_ty), mask=mask)
    if HAS_DT:
        tl.store(DT + n * D + i, (-d).to(DT.dtype.element_ty), mask=mask)


def forward(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] fp32: mean over each sample of (pred - target)^2; pred and target contiguous, same shape."""
    N, D = pred.shape[0], pred[0].numel()
    chunks = triton.cdiv(D, BLOCK)
    partial = torch.empty(N, chunks, device=pred.device, dtype=torch.float32)
    _partial_kernel[(N, chunks)](pred, target, partial, D, chunks, BLOCK=BLOCK)
    return partial.sum(1) / D


def backward(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, need_pred: bool, need_target: bool):
    N, D = pred.shape[0], pred[0].numel()
    dp = torch.empty_like(pred) if need_pred else None
    dt = torch.empty_like(target) if need_target else None
    _backward_kernel[(N, triton.cdiv(D, BLOCK))](pred, target, grad.float().contiguous(), dp if need_pred else pred,
                                                  dt if need_target else target, D, 2.0 / D, BLOCK=BLOCK,
                                                  HAS_DP=need_pred, HAS_DT=need_target)  # fmt: skip
    return dp, dt
