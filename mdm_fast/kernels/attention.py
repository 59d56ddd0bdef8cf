"""Triton flash attention for MDM's block: self-attention plus key-masked cross-attention, fused.

    out = softmax(q k^T * scale, self_mask) v + softmax(q kc^T * scale, cond_mask) vc

Forward: one program per (batch*head, query tile) runs two online softmaxes in fp32 (pixels, then
text tokens), keeps both accumulators on chip and writes the output once, plus the two
log-sum-exps (base 2) for the backward. A query row whose keys in a branch are all masked gets
zero from that branch (its log-sum-exp is stored as +inf, so the backward sees p = 0).

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

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from mdm_fast.ops.dispatch import triton_interpreting

_LOG2E = 1.4426950408889634


def _configs(shapes: Sequence[tuple]) -> list:
    """Autotune space; one small config under the interpreter so CPU tests stay fast and multi-tile."""
    if triton_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# (BLOCK_M, BLOCK_N, warps, stages) tried on CUDA; chosen around H100/H200 (228 KB smem, 64K regs/SM).
# Few configs: each is compiled per head dim on first use (quick benchmark budget).
_FWD_SHAPES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
_DQ_SHAPES = [(64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2)]
_DKDV_SHAPES = [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)]
_KEY = ["LQ", "LK", "T", "BLOCK_D", "HAS_COND", "HAS_SMASK", "HAS_CMASK"]


@triton.jit
def _load_tile(ptr, offs_r, offs_c, s_r, s_c, n_r, n_c):
    # (len(offs_r), len(offs_c)) tile, zero outside n_r rows / n_c columns
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(ptr + offs_r[:, None] * s_r + offs_c[None, :] * s_c, mask=mask, other=0.0)


@triton.jit
def _key_ok(MASK, s_m, offs_n, n_keys, HAS_MASK: tl.constexpr):
    ok = offs_n < n_keys
    if HAS_MASK:
        ok = ok & (tl.load(MASK + offs_n * s_m, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _fwd_block(acc, m_i, l_i, q, K, V, s_kl, s_kd, s_vl, s_vd, n_keys, ok, offs_n, qk_scale, offs_d, D,
               DOT_PREC: tl.constexpr):
    """One key block of the online softmax: rescale and accumulate."""
    kt = _load_tile(K, offs_d, offs_n, s_kd, s_kl, D, n_keys)  # (Dp, N)
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # (M, N), log2 units
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    v = _load_tile(V, offs_n, offs_d, s_vl, s_vd, n_keys, D)  # (N, Dp)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_branch(q, K, V, MASK, s_kl, s_kd, s_vl, s_vd, s_m, n_keys, qk_scale, offs_d, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax of one branch: returns (normalised output (M, Dp) fp32, lse base 2 (M,))."""
    # a finite start keeps alpha = 1 and p = 0 while every key seen so far is masked
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = _key_ok(MASK, s_m, offs_n, n_keys, HAS_MASK)
        if HAS_MASK:
            if tl.max(ok.to(tl.int32), 0) > 0:  # skip key blocks that are entirely masked
                acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, s_kl, s_kd, s_vl, s_vd, n_keys, ok, offs_n,
                                           qk_scale, offs_d, D, DOT_PREC)
        else:
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, s_kl, s_kd, s_vl, s_vd, n_keys, ok, offs_n,
                                       qk_scale, offs_d, D, DOT_PREC)
    has = l_i > 0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("inf"))
    return out, lse


@triton.autotune(configs=_configs(_FWD_SHAPES), key=_KEY)
@triton.jit
def _fwd_kernel(Q, K, V, KC, VC, CMASK, SMASK, O, LSE,
                s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
                s_kcb, s_kch, s_kcl, s_kcd, s_vcb, s_vch, s_vcl, s_vcd,
                s_cmb, s_cmt, s_smb, s_sml, s_ob, s_oh, s_ol, s_od,
                H, LQ, LK, T, D, lse_branch, qk_scale,
                HAS_COND: tl.constexpr, HAS_CMASK: tl.constexpr, HAS_SMASK: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * s_qb + h * s_qh, offs_m, offs_d, s_ql, s_qd, LQ, D)  # (M, Dp)
    out, lse = _fwd_branch(q, K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, SMASK + b * s_smb,
                           s_kl, s_kd, s_vl, s_vd, s_sml, LK, qk_scale, offs_d, D,
                           BLOCK_M, BLOCK_N, BLOCK_D, HAS_SMASK, DOT_PREC)
    row = LSE + bh.to(tl.int64) * LQ + offs_m
    tl.store(row, lse, mask=offs_m < LQ)
    if HAS_COND:
        out_c, lse_c = _fwd_branch(q, KC + b * s_kcb + h * s_kch, VC + b * s_vcb + h * s_vch,
                                   CMASK + b * s_cmb, s_kcl, s_kcd, s_vcl, s_vcd, s_cmt, T, qk_scale,
                                   offs_d, D, BLOCK_M, BLOCK_N, BLOCK_D, HAS_CMASK, DOT_PREC)
        out += out_c
        tl.store(row + lse_branch, lse_c, mask=offs_m < LQ)
    else:  # no text branch: its statistics say "no keys" (the lse output is fully defined)
        tl.store(row + lse_branch, tl.full([BLOCK_M], float("inf"), tl.float32), mask=offs_m < LQ)
    o_ptr = O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D))


@triton.jit
def _probs(q, kt, ok, lse, qk_scale, DOT_PREC: tl.constexpr):
    # (M, N) softmax probabilities recomputed from the stored log-sum-exp (0 where masked)
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    return tl.where(ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _dq_branch(dq, q, do, K, V, MASK, s_kl, s_kd, s_vl, s_vd, s_m, n_keys, lse, delta, qk_scale,
               offs_d, D, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq += dS K over one branch's keys (unscaled), dS = P * (dO V^T - delta)."""
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = _key_ok(MASK, s_m, offs_n, n_keys, HAS_MASK)
        if HAS_MASK:
            if tl.max(ok.to(tl.int32), 0) > 0:  # skip key blocks that are entirely masked
                dq = _dq_block(dq, q, do, K, V, s_kl, s_kd, s_vl, s_vd, n_keys, ok, offs_n, lse, delta,
                               qk_scale, offs_d, D, DOT_PREC)
        else:
            dq = _dq_block(dq, q, do, K, V, s_kl, s_kd, s_vl, s_vd, n_keys, ok, offs_n, lse, delta,
                           qk_scale, offs_d, D, DOT_PREC)
    return dq


@triton.jit
def _dq_block(dq, q, do, K, V, s_kl, s_kd, s_vl, s_vd, n_keys, ok, offs_n, lse, delta, qk_scale, offs_d, D,
              DOT_PREC: tl.constexpr):
    kt = _load_tile(K, offs_d, offs_n, s_kd, s_kl, D, n_keys)  # (Dp, N)
    vt = _load_tile(V, offs_d, offs_n, s_vd, s_vl, D, n_keys)  # (Dp, N)
    p = _probs(q, kt, ok, lse, qk_scale, DOT_PREC)
    dp = tl.dot(do, vt, input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)


@triton.jit
def _cond_out(q, K, V, MASK, s_kl, s_kd, s_vl, s_vd, s_m, n_keys, lse, qk_scale, offs_d, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """The branch's output P V recomputed from its log-sum-exp, (M, Dp) fp32."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = _key_ok(MASK, s_m, offs_n, n_keys, HAS_MASK)
        if tl.max(ok.to(tl.int32), 0) > 0:  # skip key blocks that are entirely masked
            kt = _load_tile(K, offs_d, offs_n, s_kd, s_kl, D, n_keys)
            v = _load_tile(V, offs_n, offs_d, s_vl, s_vd, n_keys, D)
            p = _probs(q, kt, ok, lse, qk_scale, DOT_PREC)
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc


@triton.autotune(configs=_configs(_DQ_SHAPES), key=_KEY)
@triton.jit
def _bwd_dq_kernel(Q, K, V, KC, VC, CMASK, SMASK, O, DO, DQ, LSE, DELTA,
                   s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
                   s_kcb, s_kch, s_kcl, s_kcd, s_vcb, s_vch, s_vcl, s_vcd,
                   s_cmb, s_cmt, s_smb, s_sml, s_ob, s_oh, s_ol, s_od,
                   s_dob, s_doh, s_dol, s_dod, s_dqb, s_dqh, s_dql, s_dqd,
                   H, LQ, LK, T, D, lse_branch, qk_scale, scale,
                   HAS_COND: tl.constexpr, HAS_CMASK: tl.constexpr, HAS_SMASK: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < LQ
    q = _load_tile(Q + b * s_qb + h * s_qh, offs_m, offs_d, s_ql, s_qd, LQ, D)
    do = _load_tile(DO + b * s_dob + h * s_doh, offs_m, offs_d, s_dol, s_dod, LQ, D)
    o = _load_tile(O + b * s_ob + h * s_oh, offs_m, offs_d, s_ol, s_od, LQ, D)
    do32 = do.to(tl.float32)
    delta = tl.sum(do32 * o.to(tl.float32), 1)  # both branches together
    row = bh.to(tl.int64) * LQ + offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_COND:
        kc, vc, cm = KC + b * s_kcb + h * s_kch, VC + b * s_vcb + h * s_vch, CMASK + b * s_cmb
        lse_c = tl.load(LSE + lse_branch + row, mask=m_in, other=0.0)
        o_c = _cond_out(q, kc, vc, cm, s_kcl, s_kcd, s_vcl, s_vcd, s_cmt, T, lse_c, qk_scale, offs_d, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, HAS_CMASK, DOT_PREC)
        delta_c = tl.sum(do32 * o_c, 1)
        delta -= delta_c
        tl.store(DELTA + lse_branch + row, delta_c, mask=m_in)
        dq = _dq_branch(dq, q, do, kc, vc, cm, s_kcl, s_kcd, s_vcl, s_vcd, s_cmt, T, lse_c, delta_c,
                        qk_scale, offs_d, D, BLOCK_N, HAS_CMASK, DOT_PREC)
    tl.store(DELTA + row, delta, mask=m_in)
    lse = tl.load(LSE + row, mask=m_in, other=0.0)
    dq = _dq_branch(dq, q, do, K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, SMASK + b * s_smb,
                    s_kl, s_kd, s_vl, s_vd, s_sml, LK, lse, delta, qk_scale, offs_d, D,
                    BLOCK_N, HAS_SMASK, DOT_PREC)
    dq_ptr = DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dql + offs_d[None, :] * s_dqd
    tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=m_in[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_tile(Q, DO, K, V, MASK, DK, DV, LSE, DELTA, tile,
               s_ql, s_qd, s_dol, s_dod, s_kl, s_kd, s_vl, s_vd, s_m,
               s_dkl, s_dkd, s_dvl, s_dvd, LQ, n_keys, D, qk_scale, scale,
               HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of one key tile of one branch: loops over every query tile (transposed scores)."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok = _key_ok(MASK, s_m, offs_n, n_keys, HAS_MASK)
    k = _load_tile(K, offs_n, offs_d, s_kl, s_kd, n_keys, D)  # (N, Dp)
    v = _load_tile(V, offs_n, offs_d, s_vl, s_vd, n_keys, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    n_queries = LQ
    if HAS_MASK:
        n_queries = tl.where(tl.max(ok.to(tl.int32), 0) > 0, LQ, 0)  # all keys masked: dk = dv = 0
    for start in range(0, n_queries, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_in = offs_m < LQ
        qt = _load_tile(Q, offs_d, offs_m, s_qd, s_ql, D, LQ)  # (Dp, M)
        do = _load_tile(DO, offs_m, offs_d, s_dol, s_dod, LQ, D)  # (M, Dp)
        lse = tl.load(LSE + offs_m, mask=m_in, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=m_in, other=0.0)
        st = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale  # (N, M)
        pt = tl.where(ok[:, None], tl.math.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PREC)
    out_mask = (offs_n[:, None] < n_keys) & (offs_d[None, :] < D)
    dk = (dk * scale).to(DK.dtype.element_ty)
    tl.store(DK + offs_n[:, None] * s_dkl + offs_d[None, :] * s_dkd, dk, mask=out_mask)
    tl.store(DV + offs_n[:, None] * s_dvl + offs_d[None, :] * s_dvd, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_configs(_DKDV_SHAPES), key=_KEY)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, KC, VC, CMASK, SMASK, DO, DK, DV, DKC, DVC, LSE, DELTA,
                     s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
                     s_kcb, s_kch, s_kcl, s_kcd, s_vcb, s_vch, s_vcl, s_vcd,
                     s_cmb, s_cmt, s_smb, s_sml, s_dob, s_doh, s_dol, s_dod,
                     s_dkb, s_dkh, s_dkl, s_dkd, s_dvb, s_dvh, s_dvl, s_dvd,
                     s_dkcb, s_dkch, s_dkcl, s_dkcd, s_dvcb, s_dvch, s_dvcl, s_dvcd,
                     H, LQ, LK, T, D, lse_branch, qk_scale, scale,
                     HAS_COND: tl.constexpr, HAS_CMASK: tl.constexpr, HAS_SMASK: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    tile = tl.program_id(1)
    n_self = tl.cdiv(LK, BLOCK_N)
    q = Q + b * s_qb + h * s_qh
    do = DO + b * s_dob + h * s_doh
    row = bh.to(tl.int64) * LQ
    if tile < n_self:
        _dkdv_tile(q, do, K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, SMASK + b * s_smb,
                   DK + b * s_dkb + h * s_dkh, DV + b * s_dvb + h * s_dvh, LSE + row, DELTA + row, tile,
                   s_ql, s_qd, s_dol, s_dod, s_kl, s_kd, s_vl, s_vd, s_sml,
                   s_dkl, s_dkd, s_dvl, s_dvd, LQ, LK, D, qk_scale, scale,
                   HAS_SMASK, DOT_PREC, BLOCK_D, BLOCK_M, BLOCK_N)
    elif HAS_COND:
        _dkdv_tile(q, do, KC + b * s_kcb + h * s_kch, VC + b * s_vcb + h * s_vch, CMASK + b * s_cmb,
                   DKC + b * s_dkcb + h * s_dkch, DVC + b * s_dvcb + h * s_dvch,
                   LSE + lse_branch + row, DELTA + lse_branch + row, tile - n_self,
                   s_ql, s_qd, s_dol, s_dod, s_kcl, s_kcd, s_vcl, s_vcd, s_cmt,
                   s_dkcl, s_dkcd, s_dvcl, s_dvcd, LQ, T, D, qk_scale, scale,
                   HAS_CMASK, DOT_PREC, BLOCK_D, BLOCK_M, BLOCK_N)


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
    return dict(
        H=H, LQ=LQ, LK=k.shape[2], T=k_cond.shape[2] if has_cond else 0, D=D, lse_branch=B * H * LQ,
        HAS_COND=has_cond, HAS_CMASK=cond_mask is not None, HAS_SMASK=self_mask is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_D=max(16, triton.next_power_of_2(D)),
    )


def forward(q, k, v, k_cond, v_cond, cond_mask, self_mask, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Write the fused attention into ``out`` (B, H, L, d view); returns lse (2, B, H, L) fp32, base 2."""
    B, H, LQ, _ = q.shape
    lse = torch.empty((2, B, H, LQ), device=q.device, dtype=torch.float32)
    cm, s_cm = _mask_arg(cond_mask, q)
    sm, s_sm = _mask_arg(self_mask, q)
    kc, vc = (k_cond, v_cond) if k_cond is not None else (q, q)
    args = _common(q, k, k_cond, cond_mask, self_mask)
    grid = lambda meta: (B * H, triton.cdiv(LQ, meta["BLOCK_M"]))  # noqa: E731
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
    grid_q = lambda meta: (B * H, triton.cdiv(LQ, meta["BLOCK_M"]))  # noqa: E731
    _bwd_dq_kernel[grid_q](q, k, v, kc, vc, cm, sm, out, grad_out, dq, lse, delta,
                           *strided, *out.stride(), *grad_out.stride(), *dq.stride(), **kw)

    def grid_k(meta):
        n = meta["BLOCK_N"]
        return (B * H, triton.cdiv(k.shape[2], n) + (triton.cdiv(k_cond.shape[2], n) if has_cond else 0))

    _bwd_dkdv_kernel[grid_k](q, k, v, kc, vc, cm, sm, grad_out, dk, dv, dkc, dvc, lse, delta,
                             *strided, *grad_out.stride(), *dk.stride(), *dv.stride(),
                             *_strides(dk_cond), *_strides(dv_cond), **kw)
