"""Row streaming for the producers of a group norm's input: write channels_last rows and, on request, the
per-channel partial moments of what was written, in the layout of group_norm's split path.

A channels_last (B, C, H, W) tensor is B samples of S = H*W rows of C contiguous channels. group_norm's
split path (:mod:`mdm_fast.kernels.group_norm`) cuts each sample into parts of ROWS rows and starts with
a launch that reads the tensor once for each part's per-channel mean and M2. An op that produces the
tensor can compute the same partials while it writes the rows (:func:`stream_rows`), over the same
parts: the norm then skips that launch (one full read of its input fewer). Moments are fp32, shifted by
the part's first row (no cancellation for data far from zero), and taken of the values as stored.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mdm_fast.kernels import group_norm as gn
from mdm_fast.kernels.sizes import cdiv

TILE = 8192  # elements per loaded tile: BLOCK_C channels of TILE // BLOCK_C rows
BLOCK_C = 128  # channels per tile (256-byte pieces of each bf16 row); a row of more is walked in chunks
PROGRAMS_PER_SM = 16  # parts per sample when no moments plan fixes them: several waves of programs


@triton.jit
def stream_rows(SRC, OUT, PMEAN, PM2, row0, lo, hi, CS, C, c0, part_offset, HAS_MOMENTS: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[row, c0 + c] = src[row, c] for rows [lo, hi) of one sample (row0: its first row; src rows
    hold CS channels, out rows C), c < CS, in chunks of BLOCK_C
    channels (one compiled variant for every channel count); with HAS_MOMENTS the per-channel mean and M2
    of the stored values go to PMEAN / PM2 at part_offset + c0 + c. The next tile's loads are issued
    before the current one is stored."""
    for cc in range(0, CS, BLOCK_C):
        c = cc + tl.arange(0, BLOCK_C)
        cmask = c < CS
        s = lo + tl.arange(0, BLOCK_S)
        mask = (s < hi)[:, None] & cmask[None, :]  # (BLOCK_S, BLOCK_C)
        vn = tl.load(SRC + (row0 + s)[:, None] * CS + c[None, :], mask=mask, other=0.0)
        k = tl.sum(tl.where((s == lo)[:, None] & cmask[None, :], vn.to(tl.float32), 0.0), axis=0)  # first row
        t1 = tl.zeros([BLOCK_C], tl.float32)
        t2 = tl.zeros([BLOCK_C], tl.float32)
        for r in range(lo, hi, BLOCK_S):
            v = vn
            s = r + tl.arange(0, BLOCK_S)
            mask = (s < hi)[:, None] & cmask[None, :]
            sn = s + BLOCK_S
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
def part_rows(S, ROWS):
    """This program's sample's first row, the part's rows [lo, hi) and the part's partials offset
    (grid (B, nsplit), C channels per row)."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    lo = part * ROWS
    return b.to(tl.int64) * S, lo, tl.minimum(S, lo + ROWS), (b * tl.num_programs(1) + part).to(tl.int64)


def blocks() -> dict:
    """The tile of the row kernels: BLOCK_S rows of BLOCK_C channels."""
    return dict(BLOCK_S=max(1, TILE // BLOCK_C), BLOCK_C=BLOCK_C)


def parts(out: torch.Tensor, moments: Optional[gn.Plan]) -> Tuple[int, int, Optional[torch.Tensor]]:
    """(rows per part, parts per sample, partials (2, B, nsplit, C) fp32 or None) for writing ``out``
    (B, C, H, W) channels_last: the norm's parts with moments, else enough parts to fill the card."""
    B, C, H, W = out.shape
    if moments is not None:
        return moments.rows, moments.nsplit, torch.empty(2, B, moments.nsplit, C, device=out.device,
                                                         dtype=torch.float32)
    block_s = blocks()["BLOCK_S"]
    S = H * W
    nsplit = min(cdiv(PROGRAMS_PER_SM * gn._num_sms(out.device.index if out.is_cuda else None), B),
                 cdiv(S, block_s))
    return (*gn.split_rows(S, nsplit, block_s), None)
