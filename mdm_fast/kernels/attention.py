"""Triton flash attention for MDM's block: self-attention plus key-masked cross-attention, fused.

    out = softmax(q k^T * scale, self_mask) v + softmax(q kc^T * scale, cond_mask) vc

Performance notes (H200, bf16; level 1 = B 32, 1024 tokens, 512 ch, 8 heads of 64, 128 text tokens):
  * FLOPs, forward: 4*B*L^2*C (self) + 4*B*L*T*C (text) = 68.7 + 8.6 = 77.3 GFLOP; at the 785 TFLOP/s
    bf16 matmul rate that is a 0.098 ms floor (0.088 ms for the self branch alone).
  * Measured before this kernel: public einsum 2.121 ms; SDPA flash on contiguous (B, h, L, d)
    0.180 ms (381 TFLOP/s, self branch only); level 2 (B 32, 256 tokens, 768 ch, d 96): einsum
    0.241 ms, SDPA 0.042 ms. Goal: 1.2x (fwd) / 1.1x (bwd) over the SDPA pair (self + masked
    cross + add) and >= 60% of 785 TFLOP/s (<= 0.164 ms) on level 1.
  * Configs (``_HOPPER``): 3-4 candidates per (kernel, padded head dim), timed once per shape (the text
    length by power-of-two bucket, ``text_bucket``) and batch by Triton's autotuner, so a first call
    compiles at most 4 + 4 + 4 variants per head dim (the alternatives to the first of each list come
    from the compile-only report,
    benchmarks/kernel_report.py: no spills, wgmma, at least as many resident programs per SM as the
    first; a GPU picks).
    Registers per thread from ptxas for sm_90a, public layout, no spills unless noted:
      fwd d<=64: 128x64, 4 warps, 3 stages (225 regs: 2 CTAs/SM, one warpgroup each, so one CTA's
        softmax overlaps the other's wgmma), or 128x64, 8 warps, maxnreg 128 (128 regs: 2 CTAs of
        2 warpgroups; unpinned it takes 129 and only 1 CTA fits); also 128x128 keys, 8 warps, pinned
        at 128 (112 KB of shared memory, 2 CTAs) and 64x128, 4 warps (188, 2 CTAs).
      fwd d 96/128 (padded to 128): 128x64, 8 warps (178-193), 64x64, 4 warps (184-202), or 128x32,
        8 warps, 4 stages pinned at 128 (2 CTAs).
      dq d<=64: 128 queries x 32 keys, 8 warps, 4 stages, maxnreg 128 (128, no spill); or 64x32,
        4 warps (138 regs, 3 CTAs/SM), 128x32, 4 warps, 5 stages (168, 3 CTAs), 128x64 pinned at 128.
      dk/dv d<=64: 128 keys x 32 queries, 8 warps, 4 stages (170: 1 CTA/SM); the same pinned at 128
        registers (2 CTAs/SM), 64 keys x 32 queries, 4 warps (170, 2 CTAs), 64x64, 4 warps (255).
      d 128 backward: 64x64, 8 warps, 3 stages (238-246, 1 CTA/SM: shared memory also limits it;
        dk/dv token-major without a text mask does not fit: the autotuner skips it there);
        or dq 32x64 / dk,dv 32 keys x 64 queries, 4 warps (218 / 255, 2 CTAs), 128x32 / 128 keys x
        32 queries, 8 warps (211 / 238). fp32 inputs (ieee dots on CUDA cores) spill at any tile
        size: 32x32, 8 warps, a correctness path only.
  * The hot loop runs over full key tiles with no bounds masks (one masked tail tile after it);
    the head-dim mask exists only when d is padded; scores are scaled by scale*log2(e) and
    exponentiated with exp2; statistics are fp32. q is loaded once and shared by both branches.
  * Text branch in two short passes after the self loop: its log-sum-exp (QK^T only), then
    exp2(s - lse) V added straight into the self branch's normalised output, so no second (M, d)
    fp32 accumulator is live (that one cost 64 registers and spilled at 4 warps). T = 128 with
    BLOCK_N 64 is 2 key tiles, and tiles whose keys are all padding are skipped: with half the
    text masked this is 3 extra 128x64x64 dots next to the self branch's 32 (~9%).
  * Programs are numbered query-tile fastest, so the tiles of one head run together and share its
    K/V through L2 (head-fastest order would stream ~0.5 GB of K/V from HBM on level 1).
  * Predicted, level 1 forward: 0.16-0.21 ms (370-480 TFLOP/s counted, 47-61% of the matmul rate),
    1.2-1.5x the SDPA pair (whose masked cross call and add cost ~0.05-0.08 ms on top of 0.18).
    Backward: recomputation in two kernels does 7 tile dots where a fused flash backward does 5,
    so expect about the SDPA pair's speed (0.9-1.2x); the gain is the fused cross branch.

Forward: one program per (batch*head, query tile) runs the online softmax over the pixel keys in
fp32, then adds the text branch (log-sum-exp pass, then P V pass) into the same registers and
writes the output once, plus the two log-sum-exps (base 2) for the backward. A query row whose
keys in a branch are all masked gets zero from that branch (its log-sum-exp is stored as +inf,
so the backward sees p = 0).

Backward (standard flash recomputation, two launches):
  1. ``_bwd_dq_kernel`` per query tile: recomputes the text branch output O_c to split
     delta = rowsum(dO * O) into the two branches' deltas (both share dO), stores them, and
     accumulates dq over the text keys and the pixel keys.
  2. ``_bwd_dkdv_kernel`` per key tile (pixel tiles, then text tiles in the same launch): loops
     over every query tile and accumulates dk, dv (or dk_cond, dv_cond).

Every tensor is addressed through its (batch, head, token, channel) strides, so the kernels read
q, k, v straight out of the 1x1 qkv-conv layout and write the output in the layout the output
projection reads. Head dims up to 128 (padded to a power of two with masked loads, so 96 costs
the dots of 128). Dots take fp16/bf16 operands with fp32 accumulation; fp32 inputs use exact
fp32 ("ieee") dots, not tf32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mdm_fast.kernels.sizes import cdiv, next_power_of_2
from mdm_fast.ops.dispatch import triton_interpreting

_LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) for 16-bit inputs on Hopper, by kernel and
# padded head dim (64 covers d <= 64); BLOCK_M tiles queries and BLOCK_N keys in every kernel.
# Registers per thread from ptxas (sm_90a, public layout): see the notes at the top.
_HOPPER = {
    ("fwd", 64): [(128, 64, 4, 3), (128, 64, 8, 3, 128), (128, 128, 8, 3, 128), (64, 128, 4, 3)],
    ("fwd", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4, 128)],
    ("dq", 64): [(128, 32, 8, 4, 128), (64, 32, 4, 4), (128, 32, 4, 5), (128, 64, 8, 3, 128)],
    ("dq", 128): [(64, 64, 8, 3), (32, 64, 4, 3), (128, 32, 8, 3)],
    ("dkdv", 64): [(32, 128, 8, 4), (32, 128, 8, 4, 128), (32, 64, 4, 4), (64, 64, 4, 3)],
    ("dkdv", 128): [(64, 64, 8, 3), (64, 32, 4, 3), (32, 128, 8, 3)],
}
_FP32 = (32, 32, 8, 1)  # exact fp32 dots run on CUDA cores and spill at any tile: a correctness path
_INTERPRET = (16, 16, 4, 1)  # the CPU interpreter: small tiles so tests stay fast and multi-tile


def _candidates(kernel: str, block_d: int, dtype: torch.dtype) -> list:
    if triton_interpreting():
        return [_INTERPRET]
    if dtype == torch.float32:
        return [_FP32]
    return _HOPPER[(kernel, 64 if block_d <= 64 else 128)]


def _config(shape: tuple) -> triton.Config:
    m, n, w, s, *maxnreg = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, maxnreg=(maxnreg or [None])[0])


def _configs(kernel: str) -> list:
    """Every candidate of ``kernel`` (all head dims and dtypes): the autotuner's list, pruned per call."""
    shapes = {_INTERPRET} if triton_interpreting() else {_FP32, *(c for (k, _), cs in _HOPPER.items()
                                                                  if k == kernel for c in cs)}
    return [_config(s) for s in sorted(shapes, key=str)]


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):  # keep the candidates for this head dim and dtype
        want = {str(_config(c)) for c in _candidates(kernel, kwargs["BLOCK_D"], named_args["Q"].dtype)}
        return [c for c in configs if str(c) in want]
    return prune


# What a timed choice is reused for. Besides the sizes: the text mask and q's layout (s_qd: 1 when the
# head dim is contiguous, L when the qkv conv output is channel-major) compile to different programs, and
# a candidate that fits one may not fit the other: dk/dv 64x64 for d 96 needs 258 KB of shared memory
# token-major without a text mask (sm_90 allows 227) and fits otherwise.
AUTOTUNE_KEY = ["LQ", "LK", "T_BUCKET", "BLOCK_D", "HAS_COND", "HAS_CMASK", "HAS_SMASK", "s_qd",
                "lse_branch"]  # B * H * LQ: the batch decides how many programs fill the card


def text_bucket(T: int) -> int:
    """The text length as the autotuner sees it: 0 (no text), else the next power of two, at least 16.
    Captions padded to their batch's longest make a length per batch; keyed on T itself, each new length
    would time every candidate again (3-4 per kernel; Triton's default timing takes ~0.1 s each, by its
    settings, not measured) for a branch that is ~10% of the work."""
    return 0 if T == 0 else max(16, next_power_of_2(T))


def _autotune(kernel: str):
    """Timed once per shape, batch included, among the candidates of ``_HOPPER`` (every kernel writes its
    outputs with plain stores, so the repeated timing runs are harmless). Without the batch in the key,
    a process that ran batch 32 first would sample at batch 2 with 128-query tiles: 32 programs for the
    256x256 model's 16x16 level on a 132-SM card."""
    return triton.autotune(configs=_configs(kernel), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _prune(kernel)})


@triton.jit
def _load(ptr, offs_r, offs_c, s_r, s_c, n_r, n_c, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    # (len(offs_r), len(offs_c)) tile; rows >= n_r (if MASK_R) and columns >= n_c (if MASK_C) read 0
    ptrs = ptr + offs_r[:, None] * s_r + offs_c[None, :] * s_c
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _key_ok(MASK, s_m, offs_n, n_keys, TAIL: tl.constexpr, HAS_MASK: tl.constexpr):
    # (N,) keys that take part: in range (checked on the tail tile only) and kept by the mask
    if TAIL:
        ok = offs_n < n_keys
        if HAS_MASK:
            ok = ok & (tl.load(MASK + offs_n * s_m, mask=ok, other=0) != 0)
    else:
        ok = tl.load(MASK + offs_n * s_m) != 0
    return ok


@triton.jit
def _any(ok):
    return tl.max(ok.to(tl.int32), 0) > 0


@triton.jit
def _fwd_step(acc, m_i, l_i, q, K, V, s_kl, s_kd, s_vl, s_vd, start, n_keys, ok, qk_scale,
              D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr,
              KEY_MASK: tl.constexpr, PAD_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax (``ok`` masks keys when KEY_MASK): rescale, accumulate."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kt = _load(K, offs_d, offs_n, s_kd, s_kl, D, n_keys, PAD_D, TAIL)  # (Dp, N)
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # (M, N), log2 units
    if KEY_MASK:
        s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    v = _load(V, offs_n, offs_d, s_vl, s_vd, n_keys, D, TAIL, PAD_D)  # (N, Dp)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _lse(m_i, l_i):
    # base-2 log-sum-exp of a row from its running max and sum; +inf where no key was kept
    has = l_i > 0
    return tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("inf"))


@triton.jit
def _fwd_self(q, K, V, MASK, s_kl, s_kd, s_vl, s_vd, s_m, n_keys, qk_scale, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_MASK: tl.constexpr, PAD_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over the pixel keys: (normalised output (M, Dp) fp32, lse base 2 (M,))."""
    # a finite start keeps alpha = 1 and p = 0 while every key seen so far is masked
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):  # full tiles: no bounds checks
        if HAS_MASK:
            ok = _key_ok(MASK, s_m, start + tl.arange(0, BLOCK_N), n_keys, False, True)
            if _any(ok):  # skip key tiles that are entirely masked
                acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, s_kl, s_kd, s_vl, s_vd, start, n_keys, ok,
                                          qk_scale, D, BLOCK_N, BLOCK_D, False, True, PAD_D, DOT_PREC)
        else:  # (0: no key mask)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, s_kl, s_kd, s_vl, s_vd, start, n_keys, 0,
                                      qk_scale, D, BLOCK_N, BLOCK_D, False, False, PAD_D, DOT_PREC)
    if n_full < n_keys:  # the tail tile
        ok = _key_ok(MASK, s_m, n_full + tl.arange(0, BLOCK_N), n_keys, True, HAS_MASK)
        if _any(ok):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, s_kl, s_kd, s_vl, s_vd, n_full, n_keys, ok,
                                      qk_scale, D, BLOCK_N, BLOCK_D, True, True, PAD_D, DOT_PREC)
    has = l_i > 0
    return tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0), _lse(m_i, l_i)


@triton.jit
def _text_lse(q, K, MASK, s_kl, s_kd, s_m, n_keys, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, PAD_D: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """Log-sum-exp (base 2, (M,)) of the text scores (1-2 key tiles, every one bounds-checked)."""
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = _key_ok(MASK, s_m, offs_n, n_keys, True, HAS_MASK)
        if _any(ok):  # skip key tiles that are entirely masked
            kt = _load(K, offs_d, offs_n, s_kd, s_kl, D, n_keys, PAD_D, True)  # (Dp, N)
            s = tl.where(ok[None, :], tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m_i = m_new
    return _lse(m_i, l_i)


@triton.jit
def _text_pv(acc, q, K, V, MASK, s_kl, s_kd, s_vl, s_vd, s_m, n_keys, lse, qk_scale, D: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, PAD_D: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """acc + P V over the text keys with P = exp2(s - lse) normalised by the known log-sum-exp.

    Adding into the self branch's output needs no second (M, Dp) accumulator (no spills at M 128)."""
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = _key_ok(MASK, s_m, offs_n, n_keys, True, HAS_MASK)
        if _any(ok):  # skip key tiles that are entirely masked
            kt = _load(K, offs_d, offs_n, s_kd, s_kl, D, n_keys, PAD_D, True)  # (Dp, N)
            v = _load(V, offs_n, offs_d, s_vl, s_vd, n_keys, D, True, PAD_D)  # (N, Dp)
            p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale - lse[:, None])
            p = tl.where(ok[None, :], p, 0.0)  # (M, N); rows with lse = inf get 0
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc


@triton.jit
def _program(n_tiles, H):
    # programs numbered tile-fastest: the tiles of one (batch, head) run together and share K/V in L2
    pid = tl.program_id(0)
    bh = pid // n_tiles
    return pid % n_tiles, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@_autotune("fwd")
@triton.jit
def _fwd_kernel(Q, K, V, KC, VC, CMASK, SMASK, O, LSE,
                s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
                s_kcb, s_kch, s_kcl, s_kcd, s_vcb, s_vch, s_vcl, s_vcd,
                s_cmb, s_cmt, s_smb, s_sml, s_ob, s_oh, s_ol, s_od,
                H, LQ, LK, T, T_BUCKET, lse_branch, qk_scale, D: tl.constexpr, PAD_D: tl.constexpr,
                HAS_COND: tl.constexpr, HAS_CMASK: tl.constexpr, HAS_SMASK: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile, bh, b, h = _program(tl.cdiv(LQ, BLOCK_M), H)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < LQ
    q = _load(Q + b * s_qb + h * s_qh, offs_m, offs_d, s_ql, s_qd, LQ, D, True, PAD_D)  # (M, Dp), both branches
    out, lse = _fwd_self(q, K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, SMASK + b * s_smb,
                         s_kl, s_kd, s_vl, s_vd, s_sml, LK, qk_scale, D,
                         BLOCK_M, BLOCK_N, BLOCK_D, HAS_SMASK, PAD_D, DOT_PREC)
    row = LSE + bh.to(tl.int64) * LQ + offs_m
    tl.store(row, lse, mask=m_in)
    if HAS_COND:
        kc, vc, cm = KC + b * s_kcb + h * s_kch, VC + b * s_vcb + h * s_vch, CMASK + b * s_cmb
        lse_c = _text_lse(q, kc, cm, s_kcl, s_kcd, s_cmt, T, qk_scale, D, BLOCK_M, BLOCK_N, BLOCK_D,
                          HAS_CMASK, PAD_D, DOT_PREC)
        out = _text_pv(out, q, kc, vc, cm, s_kcl, s_kcd, s_vcl, s_vcd, s_cmt, T, lse_c, qk_scale, D,
                       BLOCK_N, BLOCK_D, HAS_CMASK, PAD_D, DOT_PREC)
        tl.store(row + lse_branch, lse_c, mask=m_in)
    else:  # no text branch: its statistics say "no keys" (the lse output is fully defined)
        tl.store(row + lse_branch, tl.full([BLOCK_M], float("inf"), tl.float32), mask=m_in)
    o_ptr = O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od
    o_mask = m_in[:, None] & (offs_d[None, :] < D)
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def _dq_step(dq, q, do, K, V, s_kl, s_kd, s_vl, s_vd, start, n_keys, ok, lse, delta, qk_scale,
             D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr,
             KEY_MASK: tl.constexpr, PAD_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq += dS K over one key tile (unscaled), dS = P * (dO V^T - delta), P from the stored lse."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kt = _load(K, offs_d, offs_n, s_kd, s_kl, D, n_keys, PAD_D, TAIL)  # (Dp, N)
    vt = _load(V, offs_d, offs_n, s_vd, s_vl, D, n_keys, PAD_D, TAIL)  # (Dp, N)
    p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale - lse[:, None])  # (M, N)
    if KEY_MASK:
        p = tl.where(ok[None, :], p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)


@triton.jit
def _dq_branch(dq, q, do, K, V, MASK, s_kl, s_kd, s_vl, s_vd, s_m, n_keys, lse, delta, qk_scale,
               D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
               PAD_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq over one branch's keys: full tiles, then the masked tail tile."""
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        if HAS_MASK:
            ok = _key_ok(MASK, s_m, start + tl.arange(0, BLOCK_N), n_keys, False, True)
            if _any(ok):  # skip key tiles that are entirely masked
                dq = _dq_step(dq, q, do, K, V, s_kl, s_kd, s_vl, s_vd, start, n_keys, ok, lse, delta, qk_scale,
                              D, BLOCK_N, BLOCK_D, False, True, PAD_D, DOT_PREC)
        else:  # (0: no key mask)
            dq = _dq_step(dq, q, do, K, V, s_kl, s_kd, s_vl, s_vd, start, n_keys, 0, lse, delta, qk_scale,
                          D, BLOCK_N, BLOCK_D, False, False, PAD_D, DOT_PREC)
    if n_full < n_keys:
        ok = _key_ok(MASK, s_m, n_full + tl.arange(0, BLOCK_N), n_keys, True, HAS_MASK)
        if _any(ok):
            dq = _dq_step(dq, q, do, K, V, s_kl, s_kd, s_vl, s_vd, n_full, n_keys, ok, lse, delta, qk_scale,
                          D, BLOCK_N, BLOCK_D, True, True, PAD_D, DOT_PREC)
    return dq


@_autotune("dq")
@triton.jit
def _bwd_dq_kernel(Q, K, V, KC, VC, CMASK, SMASK, O, DO, DQ, LSE, DELTA,
                   s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
                   s_kcb, s_kch, s_kcl, s_kcd, s_vcb, s_vch, s_vcl, s_vcd,
                   s_cmb, s_cmt, s_smb, s_sml, s_ob, s_oh, s_ol, s_od,
                   s_dob, s_doh, s_dol, s_dod, s_dqb, s_dqh, s_dql, s_dqd,
                   H, LQ, LK, T, T_BUCKET, lse_branch, qk_scale, scale, D: tl.constexpr, PAD_D: tl.constexpr,
                   HAS_COND: tl.constexpr, HAS_CMASK: tl.constexpr, HAS_SMASK: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile, bh, b, h = _program(tl.cdiv(LQ, BLOCK_M), H)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < LQ
    q = _load(Q + b * s_qb + h * s_qh, offs_m, offs_d, s_ql, s_qd, LQ, D, True, PAD_D)  # (M, Dp)
    do = _load(DO + b * s_dob + h * s_doh, offs_m, offs_d, s_dol, s_dod, LQ, D, True, PAD_D)
    o = _load(O + b * s_ob + h * s_oh, offs_m, offs_d, s_ol, s_od, LQ, D, True, PAD_D)
    do32 = do.to(tl.float32)
    delta = tl.sum(do32 * o.to(tl.float32), 1)  # both branches together
    row = bh.to(tl.int64) * LQ + offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_COND:
        kc, vc, cm = KC + b * s_kcb + h * s_kch, VC + b * s_vcb + h * s_vch, CMASK + b * s_cmb
        lse_c = tl.load(LSE + lse_branch + row, mask=m_in, other=float("inf"))
        # the text branch's output, recomputed (1-2 key tiles), splits delta between the branches
        o_c = _text_pv(tl.zeros([BLOCK_M, BLOCK_D], tl.float32), q, kc, vc, cm, s_kcl, s_kcd, s_vcl, s_vcd,
                       s_cmt, T, lse_c, qk_scale, D, BLOCK_N, BLOCK_D, HAS_CMASK, PAD_D, DOT_PREC)
        delta_c = tl.sum(do32 * o_c, 1)
        delta -= delta_c
        tl.store(DELTA + lse_branch + row, delta_c, mask=m_in)
        dq = _dq_branch(dq, q, do, kc, vc, cm, s_kcl, s_kcd, s_vcl, s_vcd, s_cmt, T, lse_c, delta_c,
                        qk_scale, D, BLOCK_N, BLOCK_D, HAS_CMASK, PAD_D, DOT_PREC)
    tl.store(DELTA + row, delta, mask=m_in)
    lse = tl.load(LSE + row, mask=m_in, other=0.0)
    dq = _dq_branch(dq, q, do, K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, SMASK + b * s_smb,
                    s_kl, s_kd, s_vl, s_vd, s_sml, LK, lse, delta, qk_scale, D, BLOCK_N, BLOCK_D,
                    HAS_SMASK, PAD_D, DOT_PREC)
    dq_ptr = DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dql + offs_d[None, :] * s_dqd
    tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=m_in[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_step(dk, dv, k, v, ok, Q, DO, LSE, DELTA, start, s_ql, s_qd, s_dol, s_dod, LQ, qk_scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr,
               HAS_MASK: tl.constexpr, PAD_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """dk, dv of one key tile over one query tile (transposed scores (N, M))."""
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qt = _load(Q, offs_d, offs_m, s_qd, s_ql, D, LQ, PAD_D, TAIL)  # (Dp, M)
    do = _load(DO, offs_m, offs_d, s_dol, s_dod, LQ, D, TAIL, PAD_D)  # (M, Dp)
    if TAIL:  # queries past LQ: lse = inf gives p = 0
        lse = tl.load(LSE + offs_m, mask=offs_m < LQ, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=offs_m < LQ, other=0.0)
    else:
        lse = tl.load(LSE + offs_m)
        delta = tl.load(DELTA + offs_m)
    pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale - lse[None, :])  # (N, M)
    if HAS_MASK:
        pt = tl.where(ok[:, None], pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_tile(Q, DO, K, V, MASK, DK, DV, LSE, DELTA, tile,
               s_ql, s_qd, s_dol, s_dod, s_kl, s_kd, s_vl, s_vd, s_m,
               s_dkl, s_dkd, s_dvl, s_dvd, LQ, n_keys, qk_scale, scale, D: tl.constexpr,
               HAS_MASK: tl.constexpr, PAD_D: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of one key tile of one branch: loops over every query tile.

    Keys past n_keys need no mask: each key's dk, dv row depends on that key only and is not stored."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load(K, offs_n, offs_d, s_kl, s_kd, n_keys, D, True, PAD_D)  # (N, Dp)
    v = _load(V, offs_n, offs_d, s_vl, s_vd, n_keys, D, True, PAD_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    ok = _key_ok(MASK, s_m, offs_n, n_keys, True, HAS_MASK)
    n_queries = LQ
    if HAS_MASK:
        n_queries = tl.where(_any(ok), LQ, 0)  # all keys masked: dk = dv = 0
    n_full = (n_queries // BLOCK_M) * BLOCK_M
    for start in range(0, n_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, ok, Q, DO, LSE, DELTA, start, s_ql, s_qd, s_dol, s_dod, LQ, qk_scale,
                            D, BLOCK_M, BLOCK_D, False, HAS_MASK, PAD_D, DOT_PREC)
    if n_full < n_queries:
        dk, dv = _dkdv_step(dk, dv, k, v, ok, Q, DO, LSE, DELTA, n_full, s_ql, s_qd, s_dol, s_dod, LQ, qk_scale,
                            D, BLOCK_M, BLOCK_D, True, HAS_MASK, PAD_D, DOT_PREC)
    out_mask = (offs_n[:, None] < n_keys) & (offs_d[None, :] < D)
    dk = (dk * scale).to(DK.dtype.element_ty)
    tl.store(DK + offs_n[:, None] * s_dkl + offs_d[None, :] * s_dkd, dk, mask=out_mask)
    tl.store(DV + offs_n[:, None] * s_dvl + offs_d[None, :] * s_dvd, dv.to(DV.dtype.element_ty), mask=out_mask)


@_autotune("dkdv")
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, KC, VC, CMASK, SMASK, DO, DK, DV, DKC, DVC, LSE, DELTA,
                     s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
                     s_kcb, s_kch, s_kcl, s_kcd, s_vcb, s_vch, s_vcl, s_vcd,
                     s_cmb, s_cmt, s_smb, s_sml, s_dob, s_doh, s_dol, s_dod,
                     s_dkb, s_dkh, s_dkl, s_dkd, s_dvb, s_dvh, s_dvl, s_dvd,
                     s_dkcb, s_dkch, s_dkcl, s_dkcd, s_dvcb, s_dvch, s_dvcl, s_dvcd,
                     H, LQ, LK, T, T_BUCKET, lse_branch, qk_scale, scale, D: tl.constexpr, PAD_D: tl.constexpr,
                     HAS_COND: tl.constexpr, HAS_CMASK: tl.constexpr, HAS_SMASK: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_self = tl.cdiv(LK, BLOCK_N)
    n_tiles = n_self + tl.cdiv(T, BLOCK_N) if HAS_COND else n_self
    tile, bh, b, h = _program(n_tiles, H)
    q = Q + b * s_qb + h * s_qh
    do = DO + b * s_dob + h * s_doh
    row = bh.to(tl.int64) * LQ
    if tile < n_self:
        _dkdv_tile(q, do, K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, SMASK + b * s_smb,
                   DK + b * s_dkb + h * s_dkh, DV + b * s_dvb + h * s_dvh, LSE + row, DELTA + row, tile,
                   s_ql, s_qd, s_dol, s_dod, s_kl, s_kd, s_vl, s_vd, s_sml,
                   s_dkl, s_dkd, s_dvl, s_dvd, LQ, LK, qk_scale, scale, D,
                   HAS_SMASK, PAD_D, DOT_PREC, BLOCK_D, BLOCK_M, BLOCK_N)
    elif HAS_COND:
        _dkdv_tile(q, do, KC + b * s_kcb + h * s_kch, VC + b * s_vcb + h * s_vch, CMASK + b * s_cmb,
                   DKC + b * s_dkcb + h * s_dkch, DVC + b * s_dvcb + h * s_dvch,
                   LSE + lse_branch + row, DELTA + lse_branch + row, tile - n_self,
                   s_ql, s_qd, s_dol, s_dod, s_kcl, s_kcd, s_vcl, s_vcd, s_cmt,
                   s_dkcl, s_dkcd, s_dvcl, s_dvcd, LQ, T, qk_scale, scale, D,
                   HAS_CMASK, PAD_D, DOT_PREC, BLOCK_D, BLOCK_M, BLOCK_N)


# ---- launchers: every tensor is a (B, H, tokens, d) view of any strides -----------------------


def _strides(t: Optional[torch.Tensor], n: int = 4) -> tuple:
    return tuple(t.stride()) if t is not None else (0,) * n


def _mask_arg(mask: Optional[torch.Tensor], fallback: torch.Tensor):
    # bool (B, keys) -> uint8 view for the kernel; a dummy pointer when absent
    if mask is None:
        return fallback, (0, 0)
    return mask.view(torch.uint8), tuple(mask.stride())


def _common(q, k, k_cond, cond_mask, self_mask):
    B, H, LQ, D = q.shape
    has_cond = k_cond is not None
    T = k_cond.shape[2] if has_cond else 0
    block_d = max(16, next_power_of_2(D))
    return dict(
        H=H, LQ=LQ, LK=k.shape[2], T=T, T_BUCKET=text_bucket(T), lse_branch=B * H * LQ,
        D=D, PAD_D=block_d != D, BLOCK_D=block_d,
        HAS_COND=has_cond, HAS_CMASK=cond_mask is not None, HAS_SMASK=self_mask is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )


def forward(q, k, v, k_cond, v_cond, cond_mask, self_mask, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Write the fused attention into ``out`` (B, H, L, d view); returns lse (2, B, H, L) fp32, base 2."""
    B, H, LQ, _ = q.shape
    lse = torch.empty((2, B, H, LQ), device=q.device, dtype=torch.float32)
    cm, s_cm = _mask_arg(cond_mask, q)
    sm, s_sm = _mask_arg(self_mask, q)
    kc, vc = (k_cond, v_cond) if k_cond is not None else (q, q)
    args = _common(q, k, k_cond, cond_mask, self_mask)
    grid = lambda meta: (B * H * cdiv(LQ, meta["BLOCK_M"]),)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, kc, vc, cm, sm, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_strides(k_cond), *_strides(v_cond),
        *s_cm, *s_sm, *out.stride(), qk_scale=scale * _LOG2E, **args)
    return lse


def backward(grad_out, q, k, v, k_cond, v_cond, cond_mask, self_mask, out, lse, scale: float,
             dq, dk, dv, dk_cond, dv_cond) -> None:
    """Write the gradients into the given (B, H, tokens, d) views."""
    B, H, LQ, _ = q.shape
    delta = torch.empty_like(lse)  # (2, B, H, L): rowsum(dO * O_branch)
    cm, s_cm = _mask_arg(cond_mask, q)
    sm, s_sm = _mask_arg(self_mask, q)
    has_cond = k_cond is not None
    kc, vc, dkc, dvc = (k_cond, v_cond, dk_cond, dv_cond) if has_cond else (q, q, dq, dq)
    args = _common(q, k, k_cond, cond_mask, self_mask)
    strided = (*q.stride(), *k.stride(), *v.stride(), *_strides(k_cond), *_strides(v_cond), *s_cm, *s_sm)
    kw = dict(qk_scale=scale * _LOG2E, scale=scale, **args)

    _bwd_dq_kernel[lambda meta: (B * H * cdiv(LQ, meta["BLOCK_M"]),)](
        q, k, v, kc, vc, cm, sm, out, grad_out, dq, lse, delta,
        *strided, *out.stride(), *grad_out.stride(), *dq.stride(), **kw)

    def dkdv_grid(meta):  # the pixel key tiles, then the text key tiles
        n = meta["BLOCK_N"]
        return (B * H * (cdiv(k.shape[2], n) + (cdiv(k_cond.shape[2], n) if has_cond else 0)),)

    _bwd_dkdv_kernel[dkdv_grid](
        q, k, v, kc, vc, cm, sm, grad_out, dk, dv, dkc, dvc, lse, delta,
        *strided, *grad_out.stride(), *dk.stride(), *dv.stride(),
        *_strides(dk_cond), *_strides(dv_cond), **kw)
