"""Row streaming for the producers of a group norm's input: write channels_last rows and, on request, the
per-channel partial moments of what was written, in the layout of group_norm's split path.

A channels_last (B, C, H, W) tensor is B samples of S = H*W rows of C contiguous channels. group_norm's
split path (:mod:`mdm_fast.kernels.group_norm`) cuts each sample into parts of ROWS rows and starts with
a launch that reads the tensor once for each part's per-channel mean and M2. An op that produces the
tensor can compute the same partials while it writes the rows (:func:`stream_rows`), over the same
parts: the norm then skips that launch (one full read of its input fewer). Moments are fp32, summed
per lane (group_norm.LANE_ACCUMULATORS) and shifted by each lane's first row (no cancellation for data
far from zero), and taken of the values as stored.

Each program streams one BLOCK_C-channel chunk of one part's rows (grid: sample, part, chunk): many
small programs keep loads in flight on every SM, and a chunk's moments need no reduction across
programs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mdm_fast.kernels import group_norm as gn
from mdm_fast.kernels.sizes import cdiv, next_power_of_2, row_lanes

TILE = 8192  # elements per loaded tile: BLOCK_C channels of TILE // BLOCK_C rows
BLOCK_C = 128  # channels per chunk at most (256-byte pieces of each bf16 row)
PROGRAMS_PER_SM = 16  # programs per SM when no moments plan fixes the parts: several waves
NUM_WARPS = 8


@triton.jit
def stream_rows(SRC, OUT, PMEAN, PM2, row0, lo, hi, CS, C, c0, cc, part_offset, HAS_MOMENTS: tl.constexpr,
                ACC_ROWS: tl.constexpr, STAGES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[row, c0 + c] = src[row, c] for rows [lo, hi) of one sample (row0: its first row; src rows
    hold CS channels, out rows C) and the chunk's channels c in [cc, min(cc + BLOCK_C, CS)); with
    HAS_MOMENTS the per-channel mean and M2 of the stored values go to PMEAN / PM2 at part_offset + c0 +
    c. The loop's loads are pipelined (group_norm.PIPELINE_STAGES)."""
    c = cc + tl.arange(0, BLOCK_C)
    cmask = c < CS
    k = tl.zeros([ACC_ROWS, BLOCK_C], tl.float32)
    t1 = tl.zeros([ACC_ROWS, BLOCK_C], tl.float32)
    t2 = tl.zeros([ACC_ROWS, BLOCK_C], tl.float32)
    for r in tl.range(lo, hi, BLOCK_S, num_stages=STAGES):
        s = r + tl.arange(0, BLOCK_S)
        mask = (s < hi)[:, None] & cmask[None, :]  # (BLOCK_S, BLOCK_C)
        v = tl.load(SRC + (row0 + s)[:, None] * CS + c[None, :], mask=mask, other=0.0)
        tl.store(OUT + (row0 + s)[:, None] * C + (c0 + c)[None, :], v, mask=mask)
        if HAS_MOMENTS:
            if r == lo:
                k = gn.first_lanes(v, ACC_ROWS, 1, BLOCK_S, BLOCK_C)
            t1, t2 = gn.lane_sums(t1, t2, v, k, mask, ACC_ROWS, 1, BLOCK_S, BLOCK_C)
    if HAS_MOMENTS:
        mean, m2 = gn.lane_moments(k, t1, t2, hi - lo, ACC_ROWS, 1)
        tl.store(PMEAN + part_offset + c0 + c, mean, mask=cmask)
        tl.store(PM2 + part_offset + c0 + c, m2, mask=cmask)


@triton.jit
def part_rows(S, ROWS):
    """This program's sample's first row, the part's rows [lo, hi) and the part's partials offset
    (grid (B, nsplit, ...), C channels per row)."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    lo = part * ROWS
    return b.to(tl.int64) * S, lo, tl.minimum(S, lo + ROWS), (b * tl.num_programs(1) + part).to(tl.int64)


def blocks(channels: int, itemsize: int) -> dict:
    """The tile of the row kernels for rows of ``channels`` channels (the narrowest source's): BLOCK_S
    rows of BLOCK_C channels, the lanes of its moments (ACC_ROWS) and the loop's pipeline stages, as
    group_norm's knobs set them."""
    block_c = min(BLOCK_C, next_power_of_2(channels))
    block_s = max(1, TILE // block_c)
    acc_rows = row_lanes(block_s, block_c, itemsize, NUM_WARPS, True)[0] if gn.LANE_ACCUMULATORS else 1
    return dict(BLOCK_S=block_s, BLOCK_C=block_c, ACC_ROWS=acc_rows, STAGES=gn.PIPELINE_STAGES)


def parts(out: torch.Tensor, moments: Optional[gn.Plan], chunks: int,
          block_s: int) -> Tuple[int, int, Optional[torch.Tensor]]:
    """(rows per part, parts per sample, partials (2, B, nsplit, C) fp32 or None) for writing ``out``
    (B, C, H, W) channels_last in ``chunks`` channel chunks: the norm's parts with moments, else enough
    parts to fill the card."""
    B, C, H, W = out.shape
    if moments is not None:
        return moments.rows, moments.nsplit, torch.empty(2, B, moments.nsplit, C, device=out.device,
                                                         dtype=torch.float32)
    S = H * W
    nsplit = min(cdiv(PROGRAMS_PER_SM * gn._num_sms(out.device.index if out.is_cuda else None), B * chunks),
                 cdiv(S, block_s))
    return (*gn.split_rows(S, nsplit, block_s), None)
