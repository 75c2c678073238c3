"""Triton kernels of GroupNorm followed by SiLU, forward and backward (imported only when Triton runs them).

x is viewed as [N, C, S] (S: the flattened spatial dimensions) with any strides, so NCHW and
channels-last tensors are read in place. Every program handles one tile: BLOCK_S spatial positions of
the BLOCK_C channels of a group (padded to a power of two), for BLOCK_R (sample, group) rows at once when
groups are too small to fill a tile. Statistics and gradient sums are fp32; partial sums go to small
buffers that are added up in a fixed order, so results do not depend on scheduling (no atomics).

Three launches each way. Forward: (1) per tile, the tile's mean and sum of squared deviations; (2) per
group, their merge (Chan et al.'s pairwise update, stable for large groups) into mean and rstd; (3) per
tile, y = silu((x - mean) * rstd * w + b). Backward, with z the pre-activation and dz = dy * silu'(z):
(1) per tile and channel, sum(dz) and sum(dz * xhat); (2) per group, their sums into dbias, dweight and
two per-(sample, group) means; (3) per tile, dx = rstd * (w * dz - mean_g(w * dz) - xhat * mean_g(w * dz *
xhat)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: elements per program: a tile covers up to TILE elements of one group, or several whole groups when
#: they are small (then one program handles BLOCK_R (sample, group) rows at once)
TILE = 4096


@triton.jit
def _tile(row0, chunk, R, G, CG, S, sn, sc, ss, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_S: tl.constexpr):  # fmt: skip
    """Indices of a [BLOCK_R rows, BLOCK_C channels, BLOCK_S positions] tile; a row is one (sample, group)."""
    r = row0 + tl.arange(0, BLOCK_R)
    ci = tl.arange(0, BLOCK_C)
    si = chunk * BLOCK_S + tl.arange(0, BLOCK_S)
    n = (r // G).to(tl.int64)
    c = (r % G)[:, None] * CG + ci[None, :]
    rmask = r < R
    cmask = rmask[:, None] & (ci < CG)[None, :]
    mask = cmask[:, :, None] & (si < S)[None, None, :]
    off = n[:, None, None] * sn + c[:, :, None].to(tl.int64) * sc + si[None, None, :].to(tl.int64) * ss
    return r, rmask, n, c, cmask, mask, off


@triton.jit
def _stats_kernel(X, MEAN_P, M2_P, R, G, CG, S, sn, sc, ss, NCHUNK,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    chunk = tl.program_id(1)
    r, rmask, _, _, _, mask, off = _tile(tl.program_id(0) * BLOCK_R, chunk, R, G, CG, S, sn, sc, ss,
                                         BLOCK_R, BLOCK_C, BLOCK_S)  # fmt: skip
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    count = (CG * tl.minimum(S - chunk * BLOCK_S, BLOCK_S)).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=2), axis=1) / count
    d = tl.where(mask, x - mean[:, None, None], 0.0)
    tl.store(MEAN_P + r * NCHUNK + chunk, mean, mask=rmask)
    tl.store(M2_P + r * NCHUNK + chunk, tl.sum(tl.sum(d * d, axis=2), axis=1), mask=rmask)


@triton.jit
def _stats_finalize_kernel(MEAN_P, M2_P, MEAN, RSTD, CG, S, NCHUNK, inv_count, eps,
                           BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Per row: merge the tiles' (count, mean, M2) into the group's mean and rstd (Chan et al.)."""
    r = tl.program_id(0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, NCHUNK, BLOCK_K):  # first pass: the mean, sum(count * tile mean) / count
        k = k0 + tl.arange(0, BLOCK_K)
        count = tl.where(k < NCHUNK, (CG * tl.minimum(S - k * BLOCK_S, BLOCK_S)).to(tl.float32), 0.0)
        acc += tl.load(MEAN_P + r * NCHUNK + k, mask=k < NCHUNK, other=0.0) * count
    mean = tl.sum(acc) * inv_count
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, NCHUNK, BLOCK_K):  # second pass: M2 = sum(tile M2 + count * (tile mean - mean)^2)
        k = k0 + tl.arange(0, BLOCK_K)
        count = tl.where(k < NCHUNK, (CG * tl.minimum(S - k * BLOCK_S, BLOCK_S)).to(tl.float32), 0.0)
        d = tl.load(MEAN_P + r * NCHUNK + k, mask=k < NCHUNK, other=0.0) - mean
        acc += tl.load(M2_P + r * NCHUNK + k, mask=k < NCHUNK, other=0.0) + count * d * d
    tl.store(MEAN + r, mean)
    tl.store(RSTD + r, 1.0 / tl.sqrt(tl.sum(acc) * inv_count + eps))


@triton.jit
def _affine(X, W, B, MEAN, RSTD, r, rmask, c, cmask, mask, off):
    """x, xhat = (x - mean) * rstd, w, rstd and z = xhat * w + b of one tile."""
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)[:, :, None]
    b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)[:, :, None]
    rstd = tl.load(RSTD + r, mask=rmask, other=0.0)[:, None, None]
    xhat = (x - tl.load(MEAN + r, mask=rmask, other=0.0)[:, None, None]) * rstd
    return xhat, w, rstd, xhat * w + b


@triton.jit
def _forward_kernel(X, Y, W, B, MEAN, RSTD, R, G, CG, S, sn, sc, ss,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    r, rmask, _, c, cmask, mask, off = _tile(tl.program_id(0) * BLOCK_R, tl.program_id(1), R, G, CG, S, sn, sc,
                                             ss, BLOCK_R, BLOCK_C, BLOCK_S)  # fmt: skip
    _, _, _, z = _affine(X, W, B, MEAN, RSTD, r, rmask, c, cmask, mask, off)
    tl.store(Y + off, (z * tl.sigmoid(z)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_tile(X, DY, W, B, MEAN, RSTD, R, G, CG, S, sn, sc, ss, dn, dc, ds,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """This program's tile for the backward: its indices, xhat, w, rstd and dz = dy * silu'(z) (0 where
    masked)."""
    row0 = tl.program_id(0) * BLOCK_R
    chunk = tl.program_id(1)
    r, rmask, n, c, cmask, mask, off = _tile(row0, chunk, R, G, CG, S, sn, sc, ss, BLOCK_R, BLOCK_C, BLOCK_S)
    _, _, _, _, _, _, dyoff = _tile(row0, chunk, R, G, CG, S, dn, dc, ds, BLOCK_R, BLOCK_C, BLOCK_S)
    xhat, w, rstd, z = _affine(X, W, B, MEAN, RSTD, r, rmask, c, cmask, mask, off)
    dy = tl.load(DY + dyoff, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    return r, rmask, n, c, cmask, mask, off, xhat, w, rstd, dy * sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _backward_sums_kernel(X, DY, W, B, MEAN, RSTD, DB_P, DW_P, R, G, C, CG, S, sn, sc, ss, dn, dc, ds, NCHUNK,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    _, _, n, c, cmask, _, _, xhat, _, _, dz = _backward_tile(X, DY, W, B, MEAN, RSTD, R, G, CG, S, sn, sc, ss, dn,
                                                             dc, ds, BLOCK_R, BLOCK_C, BLOCK_S)  # fmt: skip
    out = (n[:, None] * NCHUNK + tl.program_id(1)) * C + c
    tl.store(DB_P + out, tl.sum(dz, axis=2), mask=cmask)
    tl.store(DW_P + out, tl.sum(dz * xhat, axis=2), mask=cmask)


@triton.jit
def _backward_finalize_kernel(DB_P, DW_P, W, C1, C2, DW, DB, N, G, C, CG, NCHUNK, inv_count,
                              BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Per group: the per-channel sums over samples and tiles (dbias, dweight), and per (sample, group)
    the means over the group of w * dz and w * dz * xhat (C1, C2)."""
    g = tl.program_id(0)
    ci = tl.arange(0, BLOCK_C)
    cmask = ci < CG
    c = g * CG + ci
    w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n in range(N):
        s_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
        s_dzx = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k0 in range(0, NCHUNK, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            off = (n * NCHUNK + k[:, None]).to(tl.int64) * C + c[None, :]
            mask = (k < NCHUNK)[:, None] & cmask[None, :]
            s_dz += tl.sum(tl.load(DB_P + off, mask=mask, other=0.0), axis=0)
            s_dzx += tl.sum(tl.load(DW_P + off, mask=mask, other=0.0), axis=0)
        db += s_dz
        dw += s_dzx
        tl.store(C1 + n * G + g, tl.sum(w * s_dz) * inv_count)
        tl.store(C2 + n * G + g, tl.sum(w * s_dzx) * inv_count)
    tl.store(DB + c, db.to(DB.dtype.element_ty), mask=cmask)
    tl.store(DW + c, dw.to(DW.dtype.element_ty), mask=cmask)


@triton.jit
def _backward_kernel(X, DY, DX, W, B, MEAN, RSTD, C1, C2, R, G, CG, S, sn, sc, ss, dn, dc, ds,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    r, rmask, _, _, _, mask, off, xhat, w, rstd, dz = _backward_tile(X, DY, W, B, MEAN, RSTD, R, G, CG, S, sn, sc,
                                                                     ss, dn, dc, ds, BLOCK_R, BLOCK_C, BLOCK_S)  # fmt: skip
    c1 = tl.load(C1 + r, mask=rmask, other=0.0)[:, None, None]
    c2 = tl.load(C2 + r, mask=rmask, other=0.0)[:, None, None]
    tl.store(DX + off, (rstd * (dz * w - c1 - xhat * c2)).to(DX.dtype.element_ty), mask=mask)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is NCHW-contiguous or channels-last, else an NCHW-contiguous copy."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _nc_s(t: torch.Tensor) -> torch.Tensor:
    """A dense t viewed as [N, C, S] (a view: the spatial dimensions of both layouts merge)."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def _blocks(x3: torch.Tensor, groups: int) -> tuple[dict, tuple[int, int]]:
    """Tile sizes and the launch grid (row blocks, spatial chunks)."""
    N, C, S = x3.shape
    block_c = triton.next_power_of_2(C // groups)
    block_s = min(triton.next_power_of_2(S), max(1, TILE // block_c))
    rows = N * groups
    block_r = min(triton.next_power_of_2(rows), max(1, TILE // (block_c * block_s)))
    blocks = dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_S=block_s)
    return blocks, (triton.cdiv(rows, block_r), triton.cdiv(S, block_s))


def _block_k(chunks: int, width: int) -> int:
    """How many tiles' partial sums a finalize program reads at once (a loop covers the rest)."""
    return min(triton.next_power_of_2(chunks), max(1, TILE // width))


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float):
    """y = silu(group_norm(x)) in x's dtype and memory layout; with the [N * G] fp32 mean and rstd."""
    x = _dense(x)
    y = torch.empty_like(x)
    x3 = _nc_s(x)
    assert _nc_s(y).stride() == x3.stride()
    N, C, S = x3.shape
    cg, rows = C // groups, N * groups
    blocks, grid = _blocks(x3, groups)
    chunks = grid[1]
    mean_p = torch.empty(rows, chunks, device=x.device, dtype=torch.float32)
    m2_p = torch.empty_like(mean_p)
    _stats_kernel[grid](x3, mean_p, m2_p, rows, groups, cg, S, *x3.stride(), chunks, **blocks)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _stats_finalize_kernel[(rows,)](mean_p, m2_p, mean, rstd, cg, S, chunks, 1.0 / (cg * S), eps,
                                    BLOCK_S=blocks["BLOCK_S"], BLOCK_K=_block_k(chunks, 1))  # fmt: skip
    _forward_kernel[grid](x3, _nc_s(y), weight, bias, mean, rstd, rows, groups, cg, S, *x3.stride(), **blocks)
    return y, mean, rstd


def backward(dy, x, weight, bias, mean, rstd, groups: int):
    """(dx, dweight, dbias) of y = silu(group_norm(x))."""
    x, dy = _dense(x), _dense(dy)
    x3, dy3 = _nc_s(x), _nc_s(dy)
    N, C, S = x3.shape
    cg, rows = C // groups, N * groups
    blocks, grid = _blocks(x3, groups)
    chunks = grid[1]
    db_p = torch.empty(N, chunks, C, device=x.device, dtype=torch.float32)
    dw_p = torch.empty_like(db_p)
    strides = (*x3.stride(), *dy3.stride())
    _backward_sums_kernel[grid](x3, dy3, weight, bias, mean, rstd, db_p, dw_p, rows, groups, C, cg, S, *strides,
                                chunks, **blocks)  # fmt: skip
    dweight, dbias = torch.empty_like(weight), torch.empty_like(bias)
    c1 = torch.empty(rows, device=x.device, dtype=torch.float32)
    c2 = torch.empty_like(c1)
    _backward_finalize_kernel[(groups,)](db_p, dw_p, weight, c1, c2, dweight, dbias, N, groups, C, cg, chunks,
                                         1.0 / (cg * S), BLOCK_C=blocks["BLOCK_C"],
                                         BLOCK_K=_block_k(chunks, blocks["BLOCK_C"]))  # fmt: skip
    dx = torch.empty_like(x)
    assert _nc_s(dx).stride() == x3.stride()
    _backward_kernel[grid](x3, dy3, _nc_s(dx), weight, bias, mean, rstd, c1, c2, rows, groups, cg, S, *strides,
                           **blocks)  # fmt: skip
    return dx, dweight, dbias
