"""Triton kernels of group_norm_act: ``act(group_norm(x) * (1 + scale) + shift)``, forward and backward.

Notes (bf16 (32, 128, 128, 128), the ResNet's norm at 128 px, batch 32):
  bytes: x is 32*128*128*128*2 = 134 MB; forward moves 268 MB (read x, write y), backward 403 MB (read x
  and dy, write dx). Floor at the H200's measured 4190 GB/s copy rate: 0.064 ms forward, 0.096 ms backward.
  First H200 measurement (previous design: groups up to 16384 elements in registers, otherwise a 3-launch
  split path with per-channel partials, a finalize launch and a separate apply launch): forward 0.269 ms
  (999 GB/s), backward 1.013 ms (397 GB/s); the (32, 768, 16, 16) rows (12.6 MB, 0.256 / 0.938 ms) show that
  about 0.25 ms of each call was host overhead (Python, custom-op dispatch, 3-4 launches, small torch ops).
  That measurement also timed the host (a sync after every call); the suites now report GPU time.
  This design:
  * fused path (the model's shapes except the 1024 model's outer levels): ONE launch, one program per
    (sample, block of GPB groups) that loops over its rows in tiles of TILE_FWD elements twice: pass 1
    sums x - K and (x - K)^2 per channel, reducing each tile to per-channel fp32 sums (K = the channel's mean
    over the first tile, so no cancellation for offset data), pass 2 re-reads x (the program's group, 128
    KB here, times the programs resident per SM is ~50 MB at most: mostly served from L2), normalises,
    applies scale/shift/SiLU and writes. Groups of at most SINGLE_TILE elements (768 ch at 16 px) are read
    once and kept in registers. Backward: one launch, pass 1 the per-channel sums of dz and dz * xhat
    (written once per (sample, channel): no atomics), pass 2 dx.
  * every row loop's loads are pipelined by Triton (PIPELINE_STAGES = 3): the next two tiles are in
    flight, copied asynchronously into shared memory (32 KB per 8-warp program of 8192-element bf16
    tiles), while the program works on the current one. Before (measured on the H200 so), each loop
    issued its next tile's loads into registers before working on the current tile: one tile in flight
    per program, 98-128 registers per thread, 2 programs of 8 warps per SM, ~32 KB of loads in flight
    per SM; 4096-element tiles at 3-4 programs per SM measured slower there. Pipelined, the NCHW
    kernels need 32-80 registers (3-10 programs per SM), the channels_last ones 64-128 (`python -m
    benchmarks.kernel_report --ops group_norm`, sm_90); not yet timed (the sweep's PIPELINE_STAGES
    rows). C/G is a compile-time constant, so the channel masks of channels_last tiles with 24 channels
    per group stay 16-byte vectorised.
  * reductions over rows accumulate per lane (LANE_ACCUMULATORS): a tile's rows lie across the lanes and
    warps, and a per-tile sum over them crossed the warps through shared memory on every tile (6
    barriers per forward tile, 9 per backward tile in the sm_90 code); each thread now adds its rows of
    the tile into its own lanes (channels_last: 8-16 fp32 registers per sum, as the per-tile sums'
    replicated vectors took; NCHW: 1-4), and the lanes are merged across the warps once per program.
    The NCHW kernels came out with fewer registers too (before pipelining, the fused forward at (32,
    128, 128, 128) went from 101 to 80: 3 programs per SM instead of 2). Not yet timed on a GPU (the
    sweep's LANE_ACCUMULATORS row compares both).
  * split path, where B*G/GPB programs cannot fill the card and groups are large (the 1024 model: 8 x 32
    groups of 1M pixels), and for channels_last tensors the fused path would read twice from DRAM (see
    NHWC_WHOLE_ROWS_ELEMENTS): each group is cut into NSPLIT row ranges; launch 1 writes per-(sample,
    part, channel) partial moments (or x's producer did: ``forward(..., moments=)``), launch 2 (one small
    program per (sample, group)) merges them (Chan's formula) into the group's mean and rstd, launch 3
    applies, visiting parts in reverse so that the last-read data is still in L2. The backward has the
    same three launches (partial sums of dz and dz * xhat; per-channel sums and the group's c1, c2; dx).
  * channels_last: the fused path's programs take GPB whole groups (32 channels when C/G is a power of
    two) so that each row of its tile is >= 64 contiguous bytes. Tensors whose fused second pass would
    miss L2, or whose split reads rows in pieces of fewer than 32 channels (C/G not a power of two), go
    to the split path over whole rows (all C channels: each program streams one contiguous stretch).
    Why: on the H200 (lease of 2026-11-28, benchmarks/results/profile-256-forward-b32-nvidia-h200-66b5828.md)
    the 256x256 forward at batch 32 spent 15.9 ms in this op's kernels against a 4.2 ms copy-rate floor.
    Its channels_last norms are large (up to 805 MB) and often have C/G = 6, 12 or 24, which the fused
    path read in 12-48-byte pieces per row (GPB = 1) and re-read from DRAM (a program's groups times the
    programs resident exceed L2); with C/G a power of two it read 64 B of each 128-256 B row (35% of copy
    at (32, 128, 128, 128)).
  Predicted: forward 2 DRAM transfers on the fused path (~75-85% of copy for tensors above L2), backward
  3 transfers (~80% of copy); the split path needs 3 (forward) and 5 (backward) transfers minus what L2
  keeps: ~60% / ~55% of copy in the reported units. The H200 measured 55% / 38% (fused, NCHW) and 60% /
  47% (split, NCHW, the 1024 model's shapes). The whole-row channels_last split, first timed on the H200
  of 2026-11-29 (benchmarks/results/group_norm-quick-nvidia-h200.md), was slower than the groups' split
  it had replaced at a power-of-two C/G (see WHOLE_ROWS_BELOW_CHANNELS), which now keeps that split; at 6
  channels per group, (32, 192, 128, 128), it runs at 12% / 10% of copy. Not yet known which of its parts
  costs it (the sweep's knobs time them one at a time). A lead: its statistics tiles hold 128-256
  channels of 32-64 rows, each reduced over rows across the 8 warps per tile (4 KB of shared memory,
  kernel_report), where the groups' split reduces 32 channels (1 KB).

The input is seen as (B, C, S) with S the flattened spatial size (H*W or T*H*W) and one of two
layouts, addressed through strides without copies:
  NCHW (contiguous):      offset = b*C*S + c*S + s   (stride_c = S, stride_s = 1)
  NHWC (channels_last):   offset = b*C*S + s*C + c   (stride_c = 1, stride_s = C)
Tiles are (BLOCK_S rows, BLOCK_C channels); BLOCK_C = GPB * next_pow2(C/G) (GPB > 1 only when C/G is a
power of two), or next_pow2(C) on the whole-row split path (GPB = G). Everything is computed in fp32.
The backward also writes, per (sample, channel), from
  s1 = sum_s dz        s2 = sum_s dz * xhat     (dz = dL/d(pre-activation))
the parameter gradients' terms: dshift = s1, dscale = s2 w + s1 bias, and gain s2, gain s1 (gain =
1 + scale), with an input bias also sum_s dx (from s1, s2 and sum_s xhat), whose sums over the batch
are dweight, dbias and dinput_bias (one reduction in ``mdm_fast.ops``).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from mdm_fast.kernels.sizes import cdiv, next_power_of_2, row_lanes

# Elements per loaded tile when a program loops over its rows, forward and backward, and the largest
# group that is read once and kept in registers. Measured on an H200 (benchmarks/results/
# group_norm-sweep-nvidia-h200.md, bf16, one shared tile of 4096 before): the forward is fastest with
# 8192-element tiles (channels_last 0.208 -> 0.177 ms at (32, 128, 128, 128), 0.725 -> 0.545 ms at
# (8, 32, 1024, 1024)), the backward, which holds x, dy and their products, with 2048 (0.345 -> 0.322,
# 1.116 -> 1.016 ms); NCHW moves the same way by 1-6%. Tests lower all three to force several tiles.
TILE_FWD = 8192
TILE_BWD = 2048
SINGLE_TILE = 8192
# The fused path is used when there are at least this many programs per SM, or when a program's groups
# hold at most SPLIT_MIN_ELEMENTS elements; otherwise groups are split over about SPLIT_PROGRAMS_PER_SM
# programs per SM (3-6 are resident at once: several waves keep the last one's idle share small), at most
# MAX_SPLIT parts per group. Tests change these to force the split path.
FUSED_MIN_PROGRAMS_PER_SM = 2
SPLIT_MIN_ELEMENTS = 1 << 16
SPLIT_PROGRAMS_PER_SM = 16
MAX_SPLIT = 128
# Largest (parts x channels) tile of partials a finalize program merges per step (it loops over the parts),
# and the channel lanes it has at least (C/G is a run-time value: one compiled variant for 1-16 channels per
# group, one per power of two above). 2048 lanes keep it at 16 values per thread (8192 took 255 registers).
FINALIZE_TILE = 2048
FINALIZE_MIN_CHANNELS = 16
# Channels a channels_last program of the fused path covers at least (C/G a power of two): 64 B rows in bf16.
NHWC_MIN_CHANNELS = 32
# channels_last tensors of at least this many elements (8 MB in bf16: enough work for the split path's
# three launches) take the split path over whole rows, where each program reads one contiguous stretch of
# all C channels whatever C/G is, where the plan of GPB groups reads badly: on the fused path, unless it
# reads them from DRAM once (its groups fit a tile, or the groups of the programs resident at once,
# FUSED_RESIDENT_PER_SM per SM, forward / backward: programs x tensors read twice, fit FUSED_L2_BYTES,
# half an H100/H200's 50 MB L2, where its second pass finds them); on the split path, where a program's
# rows hold fewer than WHOLE_ROWS_BELOW_CHANNELS channels (C/G not a power of two: 3-24 channels).
# On the H200 (group_norm-quick-nvidia-h200.md against its -66b5828.md) a split of GPB groups with 32
# channels (C/G a power of two) ran (32, 128, 128, 128) in 0.178 / 0.322 ms, whole rows in 0.274 / 0.460
# (forward / backward); the 1024x1024 forward, whose large norms nearly all have such C/G, went from 57.6
# to 65.5 ms between the runs before and after they took whole rows (among other changes).
NHWC_WHOLE_ROWS_ELEMENTS = 1 << 22
WHOLE_ROWS_BELOW_CHANNELS = 32
FUSED_RESIDENT_PER_SM = {False: 2, True: 8}
FUSED_L2_BYTES = 24 << 20
# Registers per thread at most (Triton's maxnreg) of a channels_last launch that reduces over rows (fused,
# statistics): 16 warps resident per SM (two 8-warp or four 4-warp programs). Its rows lie across warps;
# with the model's fp32 norm parameters the compiler gave the fused kernels at 512 channels x 32x32
# (forward) and 768 x 16x16 (backward) 166-169 registers, one 8-warp program per SM, and the whole-row
# backward statistics at 512 channels 158 (3 programs of 4 warps); under the cap they compile without
# spills (benchmarks/results/kernel_report-sm90.md, sm_90). Not for the apply launches nor NCHW: none of
# them needs more, and under a cap the compiler takes all of it (kernels of 40-100 registers went to
# 118-128, from 5-12 programs per SM to 4). None: the compiler's choice (the sweep times both).
MAX_REGISTERS = 128
# Reductions over rows (statistics, gradient sums) accumulate per lane: ACC_ROWS sums per channel
# (Plan.acc_rows, sizes.row_lanes), lane j the sum of the tile's rows that one thread holds (channels_last:
# rows j, j + ACC_ROWS, ...; NCHW: the VEC_ROWS consecutive rows of each of its vectors, Plan.vec_rows),
# so no data crosses threads until the loop ends. False: every tile is reduced over all its rows across
# the lanes and warps (through shared memory: 3 barriers per sum per tile in the sm_90 code).
LANE_ACCUMULATORS = True
# Every row loop's loads are software-pipelined by Triton (tl.range's num_stages): on sm_80/sm_90 the
# loads of the next STAGES - 1 tiles are in flight (cp.async into shared memory) while the program works
# on the current one; 1: none (each tile's loads are awaited before its work). Before, each loop held its
# next tile in registers (one tile in flight per program, 98-128 registers per thread at 8192-element
# tiles: 2 programs of 8 warps per SM, ~32 KB of loads in flight per SM); see the module notes.
PIPELINE_STAGES = 3
# Rows a whole-row part holds at least: its partials (8 bytes per channel) stay under 7% of its bf16 data.
WHOLE_ROWS_MIN_ROWS = 64


# ---- helpers -------------------------------------------------------------------------------


@triton.jit
def _silu(z):
    return z * tl.sigmoid(z)


@triton.jit
def _dsilu(z):
    sg = tl.sigmoid(z)
    return sg * (1.0 + z * (1.0 - sg))


@triton.jit
def _channel_params(W, Bi, SC, b, c, cmask, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr):
    """The channels' weight, bias and gain = 1 + scale of sample b, fp32 (1, 0 and 1 where absent)."""
    one = c.to(tl.float32) * 0.0 + 1.0
    w = one
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    bias = one * 0.0
    if HAS_B:
        bias = tl.load(Bi + c, mask=cmask, other=0.0).to(tl.float32)
    g1 = one
    if HAS_SC:
        g1 = 1.0 + tl.load(SC + b * C + c, mask=cmask, other=0.0).to(tl.float32)
    return w, bias, g1


@triton.jit
def _channel_affine(W, Bi, SC, SH, b, c, cmask, C,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr):
    """Per-channel k, d with pre-activation z = xhat * k + d (k = w (1 + scale), d = bias (1 + scale) + shift)."""
    w, bias, g1 = _channel_params(W, Bi, SC, b, c, cmask, C, HAS_W, HAS_B, HAS_SC)
    sh = bias * 0.0
    if HAS_SH:
        sh = tl.load(SH + b * C + c, mask=cmask, other=0.0).to(tl.float32)
    return w * g1, bias * g1 + sh


@triton.jit
def _store_param_grads(DSH, DSC, GS, W, Bi, SC, b, c, cmask, C, BC, s1, s2,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr):
    """The parameter gradients' terms of sample b's channels c from s1 = sum_s dz, s2 = sum_s dz * xhat:
    dshift = s1 and dscale = s2 w + s1 bias (B, C), and GS (2, B, C) = gain s2, gain s1 (gain = 1 +
    scale), whose sums over the samples are dweight and dbias."""
    w, bias, gain = _channel_params(W, Bi, SC, b, c, cmask, C, HAS_W, HAS_B, HAS_SC)
    o = b * C + c
    tl.store(DSH + o, s1.to(DSH.dtype.element_ty), mask=cmask)
    tl.store(DSC + o, (s2 * w + s1 * bias).to(DSC.dtype.element_ty), mask=cmask)
    tl.store(GS + o, gain * s2, mask=cmask)
    tl.store(GS + BC + o, gain * s1, mask=cmask)


@triton.jit
def _store_input_bias_grad(GS, b, c, cmask, C, BC, rstd, k, s1, s3, c1, c2, S):
    """GS[2] (B, C) = sum_s dx of sample b's channels c (their sum over the samples is dinput_bias), from
    dx = rstd (dz k - c1 - xhat c2): rstd (k s1 - S c1 - c2 s3), s3 = sum_s xhat; no pass over dx."""
    tl.store(GS + 2 * BC + b * C + c, rstd * (k * s1 - S * c1 - c2 * s3), mask=cmask)


@triton.jit
def _input_bias(XB, c, cmask, HAS_XB: tl.constexpr):
    """The channels' input bias (the norm reads x + xb[c]); zeros without one."""
    xb = c.to(tl.float32) * 0.0
    if HAS_XB:
        xb = tl.load(XB + c, mask=cmask, other=0.0).to(tl.float32)
    return xb


@triton.jit
def _saved_stats_affine(MEAN, RSTD, W, Bi, SC, SH, XB, b, c, cmask, grp, C,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
                        HAS_XB: tl.constexpr):
    """The (B, G) mean and rstd of each channel's group (grp), and the channels' k, d (_channel_affine).
    The mean is the one of x itself: the group's, less the channel's input bias (x + xb - mean)."""
    mean = tl.load(MEAN + grp, mask=cmask, other=0.0) - _input_bias(XB, c, cmask, HAS_XB)
    rstd = tl.load(RSTD + grp, mask=cmask, other=0.0)
    k, d = _channel_affine(W, Bi, SC, SH, b, c, cmask, C, HAS_W, HAS_B, HAS_SC, HAS_SH)
    return mean, rstd, k, d


@triton.jit
def _group_total(v, GPB: tl.constexpr, CGP: tl.constexpr):
    """(BLOCK_C,) per channel -> the sum over each channel's group, broadcast back to (BLOCK_C,)."""
    if GPB == 1:
        out = v * 0.0 + tl.sum(v, axis=0)
    else:
        t = tl.sum(tl.reshape(v, [GPB, CGP]), axis=1)  # (GPB,)
        out = tl.reshape(tl.broadcast_to(t[:, None], [GPB, CGP]), [GPB * CGP])
    return out


@triton.jit
def _program_channels(C, S, G, CG, GPB: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's sample b, its channels c (BLOCK_C,), their mask, group ids and the sample's offset."""
    pid = tl.program_id(0)  # (sample, block of GPB groups)
    ngb = G // GPB
    b = pid // ngb
    cl = tl.arange(0, BLOCK_C)
    cmask = cl < GPB * CG
    c = (pid % ngb) * (GPB * CG) + cl
    grp = b * G + c // CG
    return b, c, cmask, grp, b.to(tl.int64) * C * S


@triton.jit
def _rows(S, ROWS, REVERSE: tl.constexpr):
    """Row range [lo, hi) of this program's part of its groups (axis 1 of the grid)."""
    part = tl.program_id(1)
    if REVERSE:  # visit the parts last written by the statistics launch first (still in L2)
        part = tl.num_programs(1) - 1 - part
    lo = part * ROWS
    return part, lo, tl.minimum(S, lo + ROWS)


@triton.jit
def _tile(base, c, cmask, r, hi, stride_c, stride_s, BLOCK_S: tl.constexpr):
    s = r + tl.arange(0, BLOCK_S)
    mask = (s < hi)[:, None] & cmask[None, :]  # (BLOCK_S, BLOCK_C)
    return base + s[:, None] * stride_s + c[None, :] * stride_c, mask


@triton.jit
def _group_moments(mean_c, m2_c, cmask, n_c, CG, eps, GPB: tl.constexpr, CGP: tl.constexpr):
    """Per-channel mean and M2 over n_c rows each -> the group mean and rstd, broadcast per channel."""
    mean = _group_total(tl.where(cmask, mean_c, 0.0), GPB, CGP) / CG
    dm = tl.where(cmask, mean_c - mean, 0.0)
    m2 = _group_total(tl.where(cmask, m2_c + n_c * dm * dm, 0.0), GPB, CGP)
    return mean, tl.rsqrt(m2 / (n_c * CG) + eps)


# ---- forward -------------------------------------------------------------------------------


@triton.jit
def lanes(t, ACC_ROWS: tl.constexpr, VEC_ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_S, BLOCK_C) tile -> (repetitions, ACC_ROWS, VEC_ROWS, BLOCK_C): row r is lane (r // VEC_ROWS)
    % ACC_ROWS; axes 0 and 2 are within threads where the lanes follow the tile's layout (row_lanes)."""
    return tl.reshape(t, [BLOCK_S // (ACC_ROWS * VEC_ROWS), ACC_ROWS, VEC_ROWS, BLOCK_C])


@triton.jit
def _lane_total(t4):
    """(repetitions, ACC_ROWS, VEC_ROWS, BLOCK_C) in the lanes' view -> (ACC_ROWS, BLOCK_C): each lane's sum."""
    return tl.sum(tl.sum(t4, axis=2), axis=0)


@triton.jit
def fold(t, ACC_ROWS: tl.constexpr, VEC_ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_S, BLOCK_C) -> (ACC_ROWS, BLOCK_C): each lane's sum of the tile's rows."""
    return _lane_total(lanes(t, ACC_ROWS, VEC_ROWS, BLOCK_S, BLOCK_C))


@triton.jit
def first_lanes(t, ACC_ROWS: tl.constexpr, VEC_ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Each lane's first row of the tile (ACC_ROWS, BLOCK_C) fp32: the lanes' shifts."""
    f = tl.arange(0, BLOCK_S // (ACC_ROWS * VEC_ROWS))[:, None, None, None]
    v = tl.arange(0, VEC_ROWS)[None, None, :, None]
    t4 = lanes(t.to(tl.float32), ACC_ROWS, VEC_ROWS, BLOCK_S, BLOCK_C)
    return _lane_total(tl.where((f == 0) & (v == 0), t4, 0.0))


@triton.jit
def lane_sums(t1, t2, t, k, mask, ACC_ROWS: tl.constexpr, VEC_ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
              BLOCK_C: tl.constexpr):
    """t1 + the lane sums of d = t - k over the masked tile, and t2 + those of d^2 ((ACC_ROWS, BLOCK_C) each)."""
    d = tl.where(lanes(mask, ACC_ROWS, VEC_ROWS, BLOCK_S, BLOCK_C),
                 lanes(t.to(tl.float32), ACC_ROWS, VEC_ROWS, BLOCK_S, BLOCK_C) - k[None, :, None, :], 0.0)
    return t1 + _lane_total(d), t2 + _lane_total(d * d)


@triton.jit
def lane_moments(k, t1, t2, n_rows, ACC_ROWS: tl.constexpr, VEC_ROWS: tl.constexpr):
    """Per-channel mean and M2 of n_rows rows from the lanes' sums t1, t2 of x - k (ACC_ROWS, BLOCK_C):
    each lane's mean and M2, merged over the lanes (Chan's formula). Of n_rows rows from a tile's start,
    lane j holds VEC_ROWS of every ACC_ROWS * VEC_ROWS, and of the rest those past j * VEC_ROWS."""
    rem = n_rows % (ACC_ROWS * VEC_ROWS) - tl.arange(0, ACC_ROWS) * VEC_ROWS
    nj = (n_rows // (ACC_ROWS * VEC_ROWS) * VEC_ROWS + tl.minimum(tl.maximum(rem, 0), VEC_ROWS))
    nj = nj.to(tl.float32)[:, None]
    inv = 1.0 / tl.maximum(nj, 1.0)
    mean_j = k + t1 * inv
    mean = tl.sum(nj * mean_j, axis=0) / n_rows.to(tl.float32)
    dm = tl.where(nj > 0, mean_j - mean[None, :], 0.0)
    return mean, tl.sum(tl.maximum(t2 - t1 * t1 * inv, 0.0) + nj * dm * dm, axis=0)


@triton.jit
def _chan_moments(X, base, c, cmask, lo, hi, stride_c, stride_s, ACC_ROWS: tl.constexpr, VEC_ROWS: tl.constexpr,
                  STAGES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel mean and M2 of rows [lo, hi): fp32 lane sums of x - K, K = the lane's first row (taken
    from the first tile, in registers). The loop's loads are pipelined (PIPELINE_STAGES)."""
    k = tl.zeros([ACC_ROWS, BLOCK_C], tl.float32)
    t1 = tl.zeros([ACC_ROWS, BLOCK_C], tl.float32)
    t2 = tl.zeros([ACC_ROWS, BLOCK_C], tl.float32)
    for r in tl.range(lo, hi, BLOCK_S, num_stages=STAGES):
        offs, mask = _tile(base, c, cmask, r, hi, stride_c, stride_s, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0)
        if r == lo:
            k = first_lanes(x, ACC_ROWS, VEC_ROWS, BLOCK_S, BLOCK_C)
        t1, t2 = lane_sums(t1, t2, x, k, mask, ACC_ROWS, VEC_ROWS, BLOCK_S, BLOCK_C)
    return lane_moments(k, t1, t2, hi - lo, ACC_ROWS, VEC_ROWS)


@triton.jit
def _last_tile(lo, hi, BLOCK_S: tl.constexpr):
    """First row of the last BLOCK_S-row tile of [lo, hi): the second passes walk their rows backwards,
    so they re-read first what the first pass read last, the rows most likely still in L2."""
    return lo + tl.maximum(tl.cdiv(hi - lo, BLOCK_S) - 1, 0) * BLOCK_S  # lo for an empty range


@triton.jit
def _fwd_apply_rows(X, Y, base, c, cmask, lo, hi, stride_c, stride_s, A, D, ACT: tl.constexpr, STAGES: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    last = _last_tile(lo, hi, BLOCK_S)
    for i in tl.range(0, tl.cdiv(hi - lo, BLOCK_S), num_stages=STAGES):  # tiles last to first
        offs, mask = _tile(base, c, cmask, last - i * BLOCK_S, hi, stride_c, stride_s, BLOCK_S)
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) * A[None, :] + D[None, :]
        if ACT:
            z = _silu(z)
        tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_fused(X, Y, W, Bi, SC, SH, XB, MEAN, RSTD, C, S, G, CG: tl.constexpr, stride_c, stride_s, eps,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
               HAS_XB: tl.constexpr, ACT: tl.constexpr, GPB: tl.constexpr, CGP: tl.constexpr,
               SINGLE: tl.constexpr, ACC_ROWS: tl.constexpr, VEC_ROWS: tl.constexpr,
               STAGES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b, c, cmask, grp, base = _program_channels(C, S, G, CG, GPB, BLOCK_C)
    k, d = _channel_affine(W, Bi, SC, SH, b, c, cmask, C, HAS_W, HAS_B, HAS_SC, HAS_SH)
    xb = _input_bias(XB, c, cmask, HAS_XB)  # the channel means of x + xb are x's plus xb
    n_c = (S * 1.0)
    if SINGLE:  # the whole group is one tile: read once, keep it in registers
        offs, mask = _tile(base, c, cmask, 0, S, stride_c, stride_s, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean_c = tl.sum(x, axis=0) / n_c
        dx = tl.where(mask, x - mean_c[None, :], 0.0)
        mean, rstd = _group_moments(mean_c + xb, tl.sum(dx * dx, axis=0), cmask, n_c, CG, eps, GPB, CGP)
        a = rstd * k
        z = x * a[None, :] + (d - (mean - xb) * a)[None, :]
        if ACT:
            z = _silu(z)
        tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)
    else:  # pass 1 statistics, pass 2 re-reads the group (from L2) and writes
        mean_c, m2_c = _chan_moments(X, base, c, cmask, 0, S, stride_c, stride_s, ACC_ROWS, VEC_ROWS,
                                     STAGES, BLOCK_S, BLOCK_C)
        mean, rstd = _group_moments(mean_c + xb, m2_c, cmask, n_c, CG, eps, GPB, CGP)
        a = rstd * k
        _fwd_apply_rows(X, Y, base, c, cmask, 0, S, stride_c, stride_s, a, d - (mean - xb) * a, ACT, STAGES,
                        BLOCK_S)
    tl.store(MEAN + grp, mean, mask=cmask)  # lanes of one group store the same value
    tl.store(RSTD + grp, rstd, mask=cmask)


@triton.jit
def _fwd_partial(X, PMEAN, PM2, C, S, G, CG: tl.constexpr, stride_c, stride_s, ROWS,
                 GPB: tl.constexpr, ACC_ROWS: tl.constexpr, VEC_ROWS: tl.constexpr,
                 STAGES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b, c, cmask, grp, base = _program_channels(C, S, G, CG, GPB, BLOCK_C)
    part, lo, hi = _rows(S, ROWS, False)
    mean_c, m2_c = _chan_moments(X, base, c, cmask, lo, hi, stride_c, stride_s, ACC_ROWS, VEC_ROWS,
                                 STAGES, BLOCK_S, BLOCK_C)
    out = (b * tl.num_programs(1) + part) * C + c
    tl.store(PMEAN + out, mean_c, mask=cmask)
    tl.store(PM2 + out, m2_c, mask=cmask)


@triton.jit
def _finalize_channels(b, g, C, CG, nsplit, CGP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offsets (BLOCK_K, CGP) of group g's channels in parts [0, BLOCK_K) of the (B, nsplit, C) partials,
    the part index j (BLOCK_K,), the channel lanes (CGP,) and their mask."""
    j = tl.arange(0, BLOCK_K)
    cl = tl.arange(0, CGP)
    idx = (b * nsplit + j)[:, None] * C + (g * CG + cl)[None, :]
    return idx, j, cl, cl < CG


@triton.jit
def _fwd_finalize(PMEAN, PM2, XB, MEAN, RSTD, C, S, G, CG, ROWS, eps,
                  HAS_XB: tl.constexpr, CGP: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per (sample, group): merges the group's per-(part, channel) moments of x (Chan's
    formula; part j holds min(ROWS, S - j*ROWS) rows) into the mean and rstd of x + xb over the group."""
    pid = tl.program_id(0)
    b, g = pid // G, pid % G
    nsplit = tl.cdiv(S, ROWS)
    idx, j, cl, cmask = _finalize_channels(b, g, C, CG, nsplit, CGP, BLOCK_K)
    wsum = tl.zeros([CGP], tl.float32)
    for j0 in range(0, nsplit, BLOCK_K):  # per-channel mean: sum of n_j * mean_j
        jj = j0 + j
        m = (jj < nsplit)[:, None] & cmask[None, :]
        nj = tl.where(jj < nsplit, tl.minimum(ROWS, S - jj * ROWS), 0).to(tl.float32)
        wsum += tl.sum(tl.load(PMEAN + idx + j0 * C, mask=m, other=0.0) * nj[:, None], axis=0)
    n_c = (S * 1.0)
    mean_c = wsum / n_c
    m2_c = tl.zeros([CGP], tl.float32)
    for j0 in range(0, nsplit, BLOCK_K):  # per-channel M2: sum of M2_j + n_j (mean_j - mean)^2
        jj = j0 + j
        m = (jj < nsplit)[:, None] & cmask[None, :]
        nj = tl.where(jj < nsplit, tl.minimum(ROWS, S - jj * ROWS), 0).to(tl.float32)
        dm = tl.where(m, tl.load(PMEAN + idx + j0 * C, mask=m, other=0.0) - mean_c[None, :], 0.0)
        m2_c += tl.sum(tl.load(PM2 + idx + j0 * C, mask=m, other=0.0) + nj[:, None] * dm * dm, axis=0)
    xb = _input_bias(XB, g * CG + cl, cmask, HAS_XB)
    mean, rstd = _group_moments(mean_c + xb, m2_c, cmask, n_c, CG, eps, 1, CGP)
    tl.store(MEAN + pid + cl * 0, mean, mask=cl == 0)  # every lane holds the group's value
    tl.store(RSTD + pid + cl * 0, rstd, mask=cl == 0)


@triton.jit
def _fwd_split_apply(X, Y, W, Bi, SC, SH, XB, MEAN, RSTD, C, S, G, CG: tl.constexpr, stride_c, stride_s, ROWS,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
                     HAS_XB: tl.constexpr, ACT: tl.constexpr, GPB: tl.constexpr,
                     STAGES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b, c, cmask, grp, base = _program_channels(C, S, G, CG, GPB, BLOCK_C)
    _, lo, hi = _rows(S, ROWS, True)
    mean, rstd, k, d = _saved_stats_affine(MEAN, RSTD, W, Bi, SC, SH, XB, b, c, cmask, grp, C, HAS_W, HAS_B,
                                           HAS_SC, HAS_SH, HAS_XB)
    a = rstd * k
    _fwd_apply_rows(X, Y, base, c, cmask, lo, hi, stride_c, stride_s, a, d - mean * a, ACT, STAGES, BLOCK_S)


# ---- backward ------------------------------------------------------------------------------


@triton.jit
def _dz(x, dy, mask, mean, rstd, k, d, ACT: tl.constexpr):
    """xhat and dL/dz of one tile (zero outside the mask)."""
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    dz = dy
    if ACT:
        dz = dz * _dsilu(xhat * k[None, :] + d[None, :])
    return xhat, dz


@triton.jit
def _chan_grad_sums(X, DY, base, c, cmask, lo, hi, stride_c, stride_s, mean, rstd, k, d, ACT: tl.constexpr,
                    HAS_XB: tl.constexpr, ACC_ROWS: tl.constexpr, VEC_ROWS: tl.constexpr, STAGES: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel sum dz, sum dz * xhat and (with an input bias, else zeros) sum xhat over rows [lo, hi)
    (pipelined loads; lane sums, see LANE_ACCUMULATORS)."""
    s1 = tl.zeros([ACC_ROWS, BLOCK_C], tl.float32)
    s2 = tl.zeros([ACC_ROWS, BLOCK_C], tl.float32)
    s3 = tl.zeros([ACC_ROWS, BLOCK_C], tl.float32)
    for r in tl.range(lo, hi, BLOCK_S, num_stages=STAGES):
        offs, mask = _tile(base, c, cmask, r, hi, stride_c, stride_s, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, dz = _dz(x, dy, mask, mean, rstd, k, d, ACT)
        s1 += fold(dz, ACC_ROWS, VEC_ROWS, BLOCK_S, BLOCK_C)
        s2 += fold(dz * xhat, ACC_ROWS, VEC_ROWS, BLOCK_S, BLOCK_C)
        if HAS_XB:
            s3 += fold(xhat, ACC_ROWS, VEC_ROWS, BLOCK_S, BLOCK_C)
    return tl.sum(s1, axis=0), tl.sum(s2, axis=0), tl.sum(s3, axis=0)


@triton.jit
def _bwd_apply_rows(X, DY, DX, base, c, cmask, lo, hi, stride_c, stride_s, mean, rstd, k, d, c1, c2,
                    ACT: tl.constexpr, STAGES: tl.constexpr, BLOCK_S: tl.constexpr):
    last = _last_tile(lo, hi, BLOCK_S)
    for i in tl.range(0, tl.cdiv(hi - lo, BLOCK_S), num_stages=STAGES):  # tiles last to first, as _fwd_apply_rows
        offs, mask = _tile(base, c, cmask, last - i * BLOCK_S, hi, stride_c, stride_s, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, dz = _dz(x, dy, mask, mean, rstd, k, d, ACT)
        dx = rstd[None, :] * (dz * k[None, :] - c1[None, :] - xhat * c2[None, :])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_fused(X, DY, DX, W, Bi, SC, SH, XB, MEAN, RSTD, DSH, DSC, GS, C, S, G, CG: tl.constexpr, stride_c,
               stride_s, BC,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
               HAS_XB: tl.constexpr, ACT: tl.constexpr, GPB: tl.constexpr, CGP: tl.constexpr,
               SINGLE: tl.constexpr, ACC_ROWS: tl.constexpr, VEC_ROWS: tl.constexpr,
               STAGES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b, c, cmask, grp, base = _program_channels(C, S, G, CG, GPB, BLOCK_C)
    mean, rstd, k, d = _saved_stats_affine(MEAN, RSTD, W, Bi, SC, SH, XB, b, c, cmask, grp, C, HAS_W, HAS_B,
                                           HAS_SC, HAS_SH, HAS_XB)
    n = (S * 1.0) * CG
    if SINGLE:  # one tile: read x and dy once
        offs, mask = _tile(base, c, cmask, 0, S, stride_c, stride_s, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, dz = _dz(x, dy, mask, mean, rstd, k, d, ACT)
        s1 = tl.sum(dz, axis=0)
        s2 = tl.sum(dz * xhat, axis=0)
        s3 = tl.sum(xhat, axis=0)
        c1 = _group_total(k * s1, GPB, CGP) / n
        c2 = _group_total(k * s2, GPB, CGP) / n
        dx = rstd[None, :] * (dz * k[None, :] - c1[None, :] - xhat * c2[None, :])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        s1, s2, s3 = _chan_grad_sums(X, DY, base, c, cmask, 0, S, stride_c, stride_s, mean, rstd, k, d, ACT,
                                     HAS_XB, ACC_ROWS, VEC_ROWS, STAGES, BLOCK_S, BLOCK_C)
        c1 = _group_total(k * s1, GPB, CGP) / n
        c2 = _group_total(k * s2, GPB, CGP) / n
        _bwd_apply_rows(X, DY, DX, base, c, cmask, 0, S, stride_c, stride_s, mean, rstd, k, d, c1, c2, ACT,
                        STAGES, BLOCK_S)
    _store_param_grads(DSH, DSC, GS, W, Bi, SC, b, c, cmask, C, BC, s1, s2, HAS_W, HAS_B, HAS_SC)
    if HAS_XB:
        _store_input_bias_grad(GS, b, c, cmask, C, BC, rstd, k, s1, s3, c1, c2, S)


@triton.jit
def _bwd_partial(X, DY, W, Bi, SC, SH, XB, MEAN, RSTD, PS1, PS2, PS3, C, S, G, CG: tl.constexpr, stride_c, stride_s,
                 ROWS, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
                 HAS_XB: tl.constexpr, ACT: tl.constexpr, GPB: tl.constexpr, ACC_ROWS: tl.constexpr,
                 VEC_ROWS: tl.constexpr, STAGES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b, c, cmask, grp, base = _program_channels(C, S, G, CG, GPB, BLOCK_C)
    part, lo, hi = _rows(S, ROWS, False)
    mean, rstd, k, d = _saved_stats_affine(MEAN, RSTD, W, Bi, SC, SH, XB, b, c, cmask, grp, C, HAS_W, HAS_B,
                                           HAS_SC, HAS_SH, HAS_XB)
    s1, s2, s3 = _chan_grad_sums(X, DY, base, c, cmask, lo, hi, stride_c, stride_s, mean, rstd, k, d, ACT,
                                 HAS_XB, ACC_ROWS, VEC_ROWS, STAGES, BLOCK_S, BLOCK_C)
    out = (b * tl.num_programs(1) + part) * C + c
    tl.store(PS1 + out, s1, mask=cmask)
    tl.store(PS2 + out, s2, mask=cmask)
    if HAS_XB:
        tl.store(PS3 + out, s3, mask=cmask)


@triton.jit
def _bwd_finalize(PS1, PS2, PS3, RSTD, W, Bi, SC, SH, XB, DSH, DSC, GS, C1, C2, C, S, G, CG, ROWS, BC,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
                  HAS_XB: tl.constexpr, CGP: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per (sample, group): the per-channel sums s1, s2 (and s3 with an input bias) over all
    parts (the parameter gradients' terms from them, _store_param_grads, _store_input_bias_grad), and
    the group's c1 = sum_c k s1 / n and c2 = sum_c k s2 / n (n = S * CG) that dx needs, (B, G) each."""
    pid = tl.program_id(0)
    b, g = pid // G, pid % G
    nsplit = tl.cdiv(S, ROWS)
    idx, j, cl, cmask = _finalize_channels(b, g, C, CG, nsplit, CGP, BLOCK_K)
    s1 = tl.zeros([CGP], tl.float32)
    s2 = tl.zeros([CGP], tl.float32)
    s3 = tl.zeros([CGP], tl.float32)
    for j0 in range(0, nsplit, BLOCK_K):
        m = ((j0 + j) < nsplit)[:, None] & cmask[None, :]
        s1 += tl.sum(tl.load(PS1 + idx + j0 * C, mask=m, other=0.0), axis=0)
        s2 += tl.sum(tl.load(PS2 + idx + j0 * C, mask=m, other=0.0), axis=0)
        if HAS_XB:
            s3 += tl.sum(tl.load(PS3 + idx + j0 * C, mask=m, other=0.0), axis=0)
    c = g * CG + cl
    k, _ = _channel_affine(W, Bi, SC, SH, b, c, cmask, C, HAS_W, HAS_B, HAS_SC, HAS_SH)
    n = (S * 1.0) * CG
    _store_param_grads(DSH, DSC, GS, W, Bi, SC, b, c, cmask, C, BC, s1, s2, HAS_W, HAS_B, HAS_SC)
    c1 = tl.sum(tl.where(cmask, k * s1, 0.0), axis=0) / n
    c2 = tl.sum(tl.where(cmask, k * s2, 0.0), axis=0) / n
    tl.store(C1 + pid, c1)
    tl.store(C2 + pid, c2)
    if HAS_XB:
        _store_input_bias_grad(GS, b, c, cmask, C, BC, tl.load(RSTD + pid), k, s1, s3, c1, c2, S)


@triton.jit
def _bwd_split_apply(X, DY, DX, W, Bi, SC, SH, XB, MEAN, RSTD, C1, C2, C, S, G, CG: tl.constexpr, stride_c,
                     stride_s, ROWS, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr,
                     HAS_SH: tl.constexpr, HAS_XB: tl.constexpr, ACT: tl.constexpr, GPB: tl.constexpr,
                     STAGES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b, c, cmask, grp, base = _program_channels(C, S, G, CG, GPB, BLOCK_C)
    _, lo, hi = _rows(S, ROWS, True)
    mean, rstd, k, d = _saved_stats_affine(MEAN, RSTD, W, Bi, SC, SH, XB, b, c, cmask, grp, C, HAS_W, HAS_B,
                                           HAS_SC, HAS_SH, HAS_XB)
    c1 = tl.load(C1 + grp, mask=cmask, other=0.0)
    c2 = tl.load(C2 + grp, mask=cmask, other=0.0)
    _bwd_apply_rows(X, DY, DX, base, c, cmask, lo, hi, stride_c, stride_s, mean, rstd, k, d, c1, c2, ACT, STAGES,
                    BLOCK_S)


# ---- launch plans and entry points ---------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one (B, C, S, G, layout) problem is cut into programs: grid (B * G // gpb, nsplit)."""

    gpb: int  # groups per program (> 1 only for channels_last: C/G a power of two, or G on whole rows)
    block_s: int  # rows per tile
    block_c: int  # channels per tile: gpb * next_pow2(C // G), or next_pow2(C) on whole rows
    rows: int  # rows per program (a multiple of block_s; >= S on the fused path)
    nsplit: int  # programs per group block (1: the fused path)
    num_warps: int
    max_registers: Optional[int] = None  # per thread of the fused and statistics launches (Triton's maxnreg)
    acc_rows: int = 1  # lanes of the reductions over rows (LANE_ACCUMULATORS); 1, 1: a sum per tile
    vec_rows: int = 1  # consecutive rows per lane and layout repetition (NCHW's vectors)
    stages: int = 1  # pipeline stages of the row loops (PIPELINE_STAGES)

    @property
    def fused(self) -> bool:
        return self.nsplit == 1

    @property
    def single(self) -> bool:  # the fused path's groups fit one tile
        return self.fused and self.rows <= self.block_s


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: Optional[int]) -> int:
    if device_index is None or not torch.cuda.is_available():
        return 132  # the interpreter: plan as for an H100/H200
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _groups_per_program(G: int, cg: int, channels_last: bool) -> int:
    if not channels_last or cg & (cg - 1):
        return 1
    gpb = 1
    while gpb * cg < NHWC_MIN_CHANNELS and G % (2 * gpb) == 0:
        gpb *= 2
    return gpb


def _whole_rows_plan(B: int, C: int, S: int, G: int, sms: int, max_tile: int) -> Optional[Plan]:
    """The split path over whole channels_last rows (all C channels: one contiguous stretch of memory per
    program), or None where the rows cannot be cut into two parts or more."""
    block_c = next_power_of_2(C)
    block_s = max(1, min(next_power_of_2(S), max_tile // block_c))
    nsplit = min(cdiv(SPLIT_PROGRAMS_PER_SM * sms, B), cdiv(S, max(block_s, WHOLE_ROWS_MIN_ROWS)),
                 MAX_SPLIT)
    rows, nsplit = split_rows(S, nsplit, block_s)
    if nsplit == 1:
        return None
    return Plan(G, block_s, block_c, rows, nsplit, _warps(block_s * block_c), MAX_REGISTERS)


def split_rows(S: int, nsplit: int, block_s: int) -> Tuple[int, int]:
    """(rows per part, parts): S rows cut into about nsplit parts of whole BLOCK_S-row tiles."""
    rows = cdiv(cdiv(S, nsplit), block_s) * block_s
    return rows, cdiv(S, rows)


def _warps(tile: int) -> int:
    return 8 if tile >= 4096 else 4 if tile >= 1024 else 2


def plan(B: int, C: int, S: int, G: int, channels_last: bool, sms: int = 132, backward: bool = False,
         itemsize: int = 2) -> Plan:
    """How to cut a (B, C, S) problem of G groups (``itemsize`` bytes per element) into programs."""
    max_tile = TILE_BWD if backward else TILE_FWD
    p = _groups_plan(B, C, S, G, channels_last, sms, max_tile)
    if (channels_last and B * C * S >= NHWC_WHOLE_ROWS_ELEMENTS
            and _whole_rows_pay(p, B, C, S, G, sms, backward, itemsize)):
        p = _whole_rows_plan(B, C, S, G, sms, max_tile) or p
    acc, vec = row_lanes(p.block_s, p.block_c, itemsize, p.num_warps, channels_last) if LANE_ACCUMULATORS else (1, 1)
    return dataclasses.replace(p, acc_rows=acc, vec_rows=vec, stages=PIPELINE_STAGES)


def _whole_rows_pay(p: Plan, B: int, C: int, S: int, G: int, sms: int, backward: bool, itemsize: int) -> bool:
    """Whether the channels_last plan ``p`` of GPB groups reads worse than whole rows: split, with rows of
    fewer than WHOLE_ROWS_BELOW_CHANNELS channels per program; fused, reading its input twice from DRAM
    (its groups span several tiles and the groups of the programs resident at once exceed the L2 budget,
    where the second pass would find them)."""
    if not p.fused:
        return p.gpb * (C // G) < WHOLE_ROWS_BELOW_CHANNELS
    if p.single:
        return False
    resident = min(B * G // p.gpb, FUSED_RESIDENT_PER_SM[backward] * sms)  # programs x tensors read twice
    return resident * p.gpb * (C // G) * S * itemsize > FUSED_L2_BYTES


def _groups_plan(B: int, C: int, S: int, G: int, channels_last: bool, sms: int, max_tile: int) -> Plan:
    """Programs of GPB whole groups: the fused path, or the split path where they cannot fill the card."""
    cg = C // G
    gpb = _groups_per_program(G, cg, channels_last)
    block_c = gpb * next_power_of_2(cg)
    block_s = max(1, min(next_power_of_2(S), max_tile // block_c))
    if next_power_of_2(S) * block_c <= SINGLE_TILE:
        block_s = next_power_of_2(S)  # the whole group in one tile
    programs = B * G // gpb
    nsplit = 1
    if programs < FUSED_MIN_PROGRAMS_PER_SM * sms and gpb * cg * S > SPLIT_MIN_ELEMENTS:
        nsplit = min(cdiv(SPLIT_PROGRAMS_PER_SM * sms, programs), cdiv(S, block_s), MAX_SPLIT)
    return Plan(gpb, block_s, block_c, *split_rows(S, nsplit, block_s), _warps(block_s * block_c),
                MAX_REGISTERS if channels_last else None)


def _compile_options(p: Plan, reduces: bool = True) -> dict:
    """Launch options of a launch of plan ``p``: ``reduces`` over rows (fused, statistics: with its lanes,
    ACC_ROWS, VEC_ROWS) or applies."""
    if not reduces:
        return dict(num_warps=p.num_warps)
    return dict(num_warps=p.num_warps, maxnreg=p.max_registers, ACC_ROWS=p.acc_rows, VEC_ROWS=p.vec_rows)


def _layout(x: torch.Tensor, channels_last: bool) -> Tuple[int, int, int, int, int]:
    B, C = x.shape[:2]
    S = x[0, 0].numel()
    return B, C, S, (1 if channels_last else S), (C if channels_last else 1)


def _plan_for(x: torch.Tensor, G: int, channels_last: bool, backward: bool) -> Plan:
    B, C = x.shape[:2]
    sms = _num_sms(x.device.index if x.is_cuda else None)
    return plan(B, C, x[0, 0].numel(), G, channels_last, sms, backward, x.element_size())


def _launch(x, weight, bias, scale, shift, input_bias, num_groups: int, channels_last: bool, backward: bool):
    """What every launch of a forward or backward shares: B, C, S, the two strides, the parameter pointers
    (x stands in for absent ones) and their HAS_* flags, the plan, its block sizes and the grid."""
    B, C, S, stride_c, stride_s = _layout(x, channels_last)
    params = (weight, bias, scale, shift, input_bias)
    flags = {f"HAS_{n}": t is not None for n, t in zip(("W", "B", "SC", "SH", "XB"), params)}
    ptrs = [t if t is not None else x for t in params]
    p = _plan_for(x, num_groups, channels_last, backward)
    blocks = dict(GPB=p.gpb, STAGES=p.stages, BLOCK_S=p.block_s, BLOCK_C=p.block_c)
    return B, C, S, stride_c, stride_s, ptrs, flags, p, blocks, (B * num_groups // p.gpb, p.nsplit)


def _finalize_blocks(cg: int) -> dict:
    """Lanes of a finalize program: a group's channels (CGP, at least FINALIZE_MIN_CHANNELS: few compiled
    variants) times the parts it merges per step (BLOCK_K)."""
    cgp = max(FINALIZE_MIN_CHANNELS, next_power_of_2(cg))
    return dict(CGP=cgp, BLOCK_K=max(1, FINALIZE_TILE // cgp))


def moments_plan(shape: Sequence[int], num_groups: int, device: torch.device, itemsize: int) -> Optional[Plan]:
    """The split plan the forward takes for a channels_last input of ``shape`` (B, C, H, W) on ``device``
    (``itemsize`` bytes per element), or None where it takes the fused path (or num_groups is 0 or does
    not divide C: no norm to hand moments to): the parts (runs of whole rows) over which a producer of
    the input hands over its partial moments (``forward(..., moments=)``)."""
    B, C, H, W = shape
    if num_groups == 0 or C % num_groups:
        return None
    p = plan(B, C, H * W, num_groups, True, _num_sms(device.index if device.type == "cuda" else None), False,
             itemsize)
    return None if p.fused else p


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], num_groups: int, eps: float,
            silu: bool, channels_last: bool, moments: Optional[torch.Tensor] = None,
            input_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (x's layout), mean and rstd (B, G) fp32 of the normalised x + input_bias[c] (input_bias (C,) or None).
    x is NCHW- or channels_last-contiguous; scale/shift (B, C) contiguous.
    moments: x's partial moments (2, B, nsplit, C) fp32 over the parts of ``moments_plan``, from x's producer
    (channels_last x only); the split path then skips its statistics launch."""
    B, C, S, stride_c, stride_s, ptrs, flags, p, blocks, grid = _launch(x, weight, bias, scale, shift, input_bias,
                                                                        num_groups, channels_last, False)
    G = num_groups
    y = torch.empty_like(x)
    mean = torch.empty(B, G, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if p.fused and moments is not None:
        raise ValueError("group_norm: moments were given but this input takes the fused path (see moments_plan)")
    if p.fused:
        _fwd_fused[grid](x, y, *ptrs, mean, rstd, C, S, G, C // G, stride_c, stride_s, eps, **flags, ACT=silu,
                         CGP=p.block_c // p.gpb, SINGLE=p.single, **blocks, **_compile_options(p))
        return y, mean, rstd
    part = moments
    if part is None:
        part = torch.empty(2, B, p.nsplit, C, device=x.device, dtype=torch.float32)  # partial mean, M2
        _fwd_partial[grid](x, part[0], part[1], C, S, G, C // G, stride_c, stride_s, p.rows, **blocks,
                           **_compile_options(p))
    elif tuple(part.shape) != (2, B, p.nsplit, C) or part.dtype != torch.float32:
        raise ValueError(f"group_norm: moments must be (2, {B}, {p.nsplit}, {C}) float32 (the parts of "
                         f"moments_plan), got {tuple(part.shape)} {part.dtype}")
    _fwd_finalize[(B * G,)](part[0], part[1], ptrs[4], mean, rstd, C, S, G, C // G, p.rows, eps,
                            HAS_XB=flags["HAS_XB"], **_finalize_blocks(C // G))
    _fwd_split_apply[grid](x, y, *ptrs, mean, rstd, C, S, G, C // G, stride_c, stride_s, p.rows, **flags, ACT=silu,
                           **blocks, **_compile_options(p, reduces=False))
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
             num_groups: int, silu: bool, channels_last: bool,
             input_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """dx (x's layout), dshift and dscale (B, C) in shift's and scale's dtypes (fp32 without them), and
    (2, B, C) fp32 gain * s2, gain * s1, whose sums over the batch are dweight and dbias
    (_store_param_grads; s1 = sum_s dz, s2 = sum_s dz * xhat; all computed in fp32), with a third row
    sum_s dx with an input bias (its sum over the batch is dinput_bias: _store_input_bias_grad). dy has
    x's layout; mean, rstd those of the forward (of x + input_bias)."""
    B, C, S, stride_c, stride_s, ptrs, flags, p, blocks, grid = _launch(x, weight, bias, scale, shift, input_bias,
                                                                        num_groups, channels_last, True)
    G = num_groups
    dx = torch.empty_like(x)
    dshift, dscale = (torch.empty(B, C, device=x.device, dtype=torch.float32 if t is None else t.dtype)
                      for t in (shift, scale))  # the dtypes autograd wants: no cast kernels after
    gs = torch.empty(2 if input_bias is None else 3, B, C, device=x.device, dtype=torch.float32)
    grads = (dshift, dscale, gs)
    if p.fused:
        _bwd_fused[grid](x, dy, dx, *ptrs, mean, rstd, *grads, C, S, G, C // G, stride_c, stride_s, B * C, **flags,
                         ACT=silu, CGP=p.block_c // p.gpb, SINGLE=p.single, **blocks, **_compile_options(p))
        return (dx, *grads)
    part = torch.empty(len(gs), B, p.nsplit, C, device=x.device, dtype=torch.float32)  # partial s1, s2 (, s3)
    ps3 = part[-1]  # not written without an input bias
    _bwd_partial[grid](x, dy, *ptrs, mean, rstd, part[0], part[1], ps3, C, S, G, C // G, stride_c, stride_s,
                       p.rows, **flags, ACT=silu, **blocks, **_compile_options(p))
    c12 = torch.empty(2, B, G, device=x.device, dtype=torch.float32)
    _bwd_finalize[(B * G,)](part[0], part[1], ps3, rstd, *ptrs, *grads, c12[0], c12[1], C, S, G, C // G, p.rows,
                            B * C, **flags, **_finalize_blocks(C // G))
    _bwd_split_apply[grid](x, dy, dx, *ptrs, mean, rstd, c12[0], c12[1], C, S, G, C // G, stride_c, stride_s, p.rows,
                           **flags, ACT=silu, **blocks, **_compile_options(p, reduces=False))
    return (dx, *grads)
