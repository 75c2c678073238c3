"""Triton kernels of the per-sample squared error (imported only when Triton runs them).

pred and target are viewed as [N, D] in their own dtypes and read once; each program sums (pred -
target)^2 / D in fp32 over a chunk of one sample (all of it, when it fits) and writes it; several chunks
are added by torch in a fixed order (no atomics, so the result does not depend on scheduling). The
backward writes grad * 2 (pred - target) / D straight in pred's (and target's) dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per vector step
MAX_ITERS = 4  # vector steps per program: a program sums up to BLOCK * MAX_ITERS elements of one sample


@triton.jit
def _partial_kernel(P, T, OUT, D, NCHUNK, inv_d, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        i = (chunk * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        mask = i < D
        p = tl.load(P + n * D + i, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(T + n * D + i, mask=mask, other=0.0).to(tl.float32)
        acc += (p - t) * (p - t)
    tl.store(OUT + n * NCHUNK + chunk, tl.sum(acc) * inv_d)


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
    """[N] fp32: mean over each sample of (pred - target)^2; pred and target contiguous, same shape. One
    launch when a sample fits in one program, else a second (torch's sum) adds the programs' parts: many
    programs per sample keep the GPU busy when there are few samples (SDXL latents: 16 per sample)."""
    N, D = pred.shape[0], pred[0].numel()
    iters = min(triton.cdiv(D, BLOCK), MAX_ITERS)
    chunks = triton.cdiv(D, BLOCK * iters)
    partial = torch.empty(N, chunks, device=pred.device, dtype=torch.float32)
    _partial_kernel[(N, chunks)](pred, target, partial, D, chunks, 1.0 / D, BLOCK=BLOCK, ITERS=iters)
    return partial.view(N) if chunks == 1 else partial.sum(1)


def backward(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, need_pred: bool, need_target: bool):
    N, D = pred.shape[0], pred[0].numel()
    dp = torch.empty_like(pred) if need_pred else None
    dt = torch.empty_like(target) if need_target else None
    _backward_kernel[(N, triton.cdiv(D, BLOCK))](pred, target, grad.float().contiguous(), dp if need_pred else pred,
                                                  dt if need_target else target, D, 2.0 / D, BLOCK=BLOCK,
                                                  HAS_DP=need_pred, HAS_DT=need_target)  # fmt: skip
    return dp, dt
