"""Triton kernel of :func:`mdm_fast.ops.concat_channels`: ``torch.cat((a, b), dim=1)`` of channels_last
tensors, optionally with the per-channel partial moments that group_norm's split path would compute next.

channels_last stores each pixel's channels contiguously, so the concatenation is a row copy: row s of
the output (C1 + C2 channels) is row s of a followed by row s of b. PyTorch's cat copies these rows at
about 43% of the copy rate on an H200 (4.3 ms of the 256x256 forward at batch 32, where the decoder
concatenates its skips; benchmarks/results/profile-256-forward-b32-nvidia-h200.md); here each program
streams whole rows of its part of a sample, with 16-byte accesses.

The up path normalises every concatenation right away (the next ResNet's ``norm1``). With
``moments`` the kernel also writes, per (sample, part, channel), the mean and M2 of the rows it copied
(fp32, shifted by the part's first row) in the layout of group_norm's partial moments
(:mod:`mdm_fast.kernels.group_norm`): the norm then skips its statistics pass, one read of the
concatenation fewer. The parts are the norm's (``group_norm.moments_plan``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mdm_fast.kernels import group_norm as gn

TILE = 8192  # elements per loaded tile (a part loops over its rows in tiles)
PROGRAMS_PER_SM = 16  # parts per sample when no moments plan fixes them: several waves of programs


@triton.jit
def _copy_rows(SRC, OUT, PMEAN, PM2, row0, lo, hi, CS, C, c0, part_offset,
               HAS_MOMENTS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[row, c0 + c] = src[row, c] for rows [lo, hi) of one sample (row0: its first row), c < CS; with
    HAS_MOMENTS the per-channel mean and M2 of the copied values, stored at part_offset + c0 + c."""
    c = tl.arange(0, BLOCK_C)
    cmask = c < CS
    s = lo + tl.arange(0, BLOCK_S)
    mask = (s < hi)[:, None] & cmask[None, :]  # (BLOCK_S, BLOCK_C)
    vn = tl.load(SRC + (row0 + s)[:, None] * CS + c[None, :], mask=mask, other=0.0)
    k = tl.load(SRC + (row0 + lo) * CS + c, mask=cmask, other=0.0).to(tl.float32)  # shift: the first row
    t1 = tl.zeros([BLOCK_C], tl.float32)
    t2 = tl.zeros([BLOCK_C], tl.float32)
    for r in range(lo, hi, BLOCK_S):
        v = vn
        s = r + tl.arange(0, BLOCK_S)
        mask = (s < hi)[:, None] & cmask[None, :]
        sn = s + BLOCK_S  # prefetch the next tile before storing this one
        vn = tl.load(SRC + (row0 + sn)[:, None] * CS + c[None, :], mask=(sn < hi)[:, None] & cmask[None, :],
                     other=0.0)
        tl.store(OUT + (row0 + s)[:, None] * C + (c0 + c)[None, :], v, mask=mask)
        if HAS_MOMENTS:
            d = tl.where(mask, v.to(tl.float32) - k[None, :], 0.0)
            t1 += tl.sum(d, axis=0)
            t2 += tl.sum(d * d, axis=0)
    if HAS_MOMENTS:
        n = (hi - lo).to(tl.float32)
        tl.store(PMEAN + part_offset + c0 + c, k + t1 / n, mask=cmask)
        tl.store(PM2 + part_offset + c0 + c, tl.maximum(t2 - t1 * t1 / n, 0.0), mask=cmask)


@triton.jit
def _concat_kernel(A, B, OUT, PMEAN, PM2, S, C1, C2, ROWS, HAS_MOMENTS: tl.constexpr, BLOCK_S1: tl.constexpr,
                   BLOCK_C1: tl.constexpr, BLOCK_S2: tl.constexpr, BLOCK_C2: tl.constexpr):
    """One program per (sample, part): rows [part * ROWS, min(S, (part + 1) * ROWS)) of the sample."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    lo = part * ROWS
    hi = tl.minimum(S, lo + ROWS)
    row0 = b.to(tl.int64) * S
    C = C1 + C2
    part_offset = (b * tl.num_programs(1) + part).to(tl.int64) * C
    _copy_rows(A, OUT, PMEAN, PM2, row0, lo, hi, C1, C, 0, part_offset, HAS_MOMENTS, BLOCK_S1, BLOCK_C1)
    _copy_rows(B, OUT, PMEAN, PM2, row0, lo, hi, C2, C, C1, part_offset, HAS_MOMENTS, BLOCK_S2, BLOCK_C2)


def _blocks(cs: int, tile: int) -> Tuple[int, int]:
    block_c = triton.next_power_of_2(cs)
    return max(1, tile // block_c), block_c


def concat(a: torch.Tensor, b: torch.Tensor, moments: Optional[gn.Plan] = None,
           tile: int = TILE) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(torch.cat((a, b), 1) channels_last, partial moments (2, B, nsplit, C1 + C2) fp32 or None).

    a (B, C1, H, W), b (B, C2, H, W): channels_last-dense, one dtype. ``moments``: the plan of the
    group_norm that reads the output (its parts), or None for the copy alone."""
    B, C1, H, W = a.shape
    C2, S = b.shape[1], H * W
    out = torch.empty((B, C1 + C2, H, W), device=a.device, dtype=a.dtype, memory_format=torch.channels_last)
    if moments is not None:
        rows, nsplit = moments.rows, moments.nsplit
        part = torch.empty(2, B, nsplit, C1 + C2, device=a.device, dtype=torch.float32)
    else:
        block_s = _blocks(C1 + C2, tile)[0]
        nsplit = min(triton.cdiv(PROGRAMS_PER_SM * gn._num_sms(a.device.index if a.is_cuda else None), B),
                     triton.cdiv(S, block_s))
        rows = triton.cdiv(triton.cdiv(S, nsplit), block_s) * block_s
        nsplit, part = triton.cdiv(S, rows), None
    pmean, pm2 = (part[0], part[1]) if part is not None else (out, out)  # out stands in for absent partials
    s1, c1 = _blocks(C1, tile)
    s2, c2 = _blocks(C2, tile)
    _concat_kernel[(B, nsplit)](a, b, out, pmean, pm2, S, C1, C2, rows, HAS_MOMENTS=part is not None,
                                BLOCK_S1=s1, BLOCK_C1=c1, BLOCK_S2=s2, BLOCK_C2=c2, num_warps=8)
    return out, part
