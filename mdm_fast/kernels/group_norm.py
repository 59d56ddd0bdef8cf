"""Triton kernels of group_norm_act: ``act(group_norm(x) * (1 + scale) + shift)``, forward and backward.

The input is seen as (B, C, S) with S the flattened spatial size (H*W or T*H*W) and one of two
layouts, addressed through strides without copies:
  NCHW (contiguous):      offset = b*C*S + c*S + s   (stride_c = S, stride_s = 1)
  NHWC (channels_last):   offset = b*C*S + s*C + c   (stride_c = 1, stride_s = C)

Two paths:
  fused  one program per (sample, group) holds the whole group in registers: one read of x and
         one write of y (backward: one read of x and dy, one write of dx).
  split  for groups too large for one program: (1) per-channel partial statistics over chunks of
         rows, (2) a small per-(sample, group) finalize, (3) an element-wise apply pass.
         Forward partials are chunk-local (mean, M2) merged with Chan's formula; backward
         partials are the sums of dz and dz * xhat.

Everything is computed in fp32. The backward also returns, per (sample, channel),
  s1 = sum_s dz        s2 = sum_s dz * xhat     (dz = dL/d(pre-activation))
from which the parameter gradients follow (see ``mdm_fast.ops.group_norm_act``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Largest padded group tile (elements) held by one program on the fused path. Tests lower it to
# force the split path on small tensors.
FUSED_MAX = 16384
# Elements per tile of the split path, and the most tiles one partial-statistics program loops over.
SPLIT_TILE = 4096
SPLIT_MAX_ITERS = 8
# A partial-statistics program loops over more tiles only while the grid keeps this many programs.
SPLIT_MIN_PROGRAMS = 2048


# ---- helpers -------------------------------------------------------------------------------


@triton.jit
def _silu(z):
    return z * tl.sigmoid(z)


@triton.jit
def _dsilu(z):
    sg = tl.sigmoid(z)
    return sg * (1.0 + z * (1.0 - sg))


@triton.jit
def _channel_affine(W, Bi, SC, SH, b, c, cmask, C,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr):
    """Per-channel k, d with pre-activation z = xhat * k + d (k = w (1 + scale), d = bias (1 + scale) + shift)."""
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
    sh = one * 0.0
    if HAS_SH:
        sh = tl.load(SH + b * C + c, mask=cmask, other=0.0).to(tl.float32)
    return w * g1, bias * g1 + sh


# ---- forward -------------------------------------------------------------------------------


@triton.jit
def _fwd_fused(X, Y, W, Bi, SC, SH, MEAN, RSTD, C, S, G, CG, stride_c, stride_s, eps,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
               ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr):
    pid = tl.program_id(0)  # one (sample, group)
    b = pid // G
    g = pid % G
    s = tl.arange(0, BLOCK_S)
    cl = tl.arange(0, BLOCK_CG)
    c = g * CG + cl
    cmask = cl < CG
    mask = (s < S)[:, None] & cmask[None, :]  # (BLOCK_S, BLOCK_CG)
    offs = b.to(tl.int64) * C * S + s[:, None] * stride_s + c[None, :] * stride_c
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    n = CG * S
    mean = tl.sum(x) / n
    d = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(d * d) / n + eps)
    k, dd = _channel_affine(W, Bi, SC, SH, b, c, cmask, C, HAS_W, HAS_B, HAS_SC, HAS_SH)
    z = d * (rstd * k)[None, :] + dd[None, :]
    if ACT:
        z = _silu(z)
    tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)


@triton.jit
def _fwd_partial(X, PMEAN, PM2, C, S, stride_c, stride_s, NCHUNK, ROWS,
                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # (sample, chunk of ROWS rows)
    b = pid // NCHUNK
    k = pid % NCHUNK
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = X + b.to(tl.int64) * C * S
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    n = 0.0
    for r in range(0, ROWS, BLOCK_S):
        s = k * ROWS + r + tl.arange(0, BLOCK_S)
        smask = s < S
        mask = smask[:, None] & cmask[None, :]
        x = tl.load(base + s[:, None] * stride_s + c[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
        nt = tl.sum(smask.to(tl.float32))
        tmean = tl.sum(x, axis=0) / tl.maximum(nt, 1.0)
        dt = tl.where(mask, x - tmean[None, :], 0.0)
        tm2 = tl.sum(dt * dt, axis=0)
        nn = n + nt
        delta = tmean - mean
        frac = nt / tl.maximum(nn, 1.0)
        mean += delta * frac
        m2 += tm2 + delta * delta * n * frac
        n = nn
    out = (b * NCHUNK + k) * C + c
    tl.store(PMEAN + out, mean, mask=cmask)
    tl.store(PM2 + out, m2, mask=cmask)


@triton.jit
def _fwd_finalize(PMEAN, PM2, MEAN, RSTD, C, S, G, CG, NCHUNK, ROWS, eps,
                  BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr):
    pid = tl.program_id(0)  # one (sample, group)
    b = pid // G
    g = pid % G
    n = CG * S
    total = tl.zeros([BLOCK_K, BLOCK_CG], tl.float32)
    for k0 in range(0, NCHUNK, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        nk = tl.where(k < NCHUNK, tl.minimum(ROWS, S - k * ROWS), 0).to(tl.float32)
        for c0 in range(0, CG, BLOCK_CG):
            cl = c0 + tl.arange(0, BLOCK_CG)
            mask = (k < NCHUNK)[:, None] & (cl < CG)[None, :]
            idx = (b * NCHUNK + k)[:, None] * C + (g * CG + cl)[None, :]
            total += tl.load(PMEAN + idx, mask=mask, other=0.0) * nk[:, None]
    mean = tl.sum(total) / n
    m2 = tl.zeros([BLOCK_K, BLOCK_CG], tl.float32)
    for k0 in range(0, NCHUNK, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        nk = tl.where(k < NCHUNK, tl.minimum(ROWS, S - k * ROWS), 0).to(tl.float32)
        for c0 in range(0, CG, BLOCK_CG):
            cl = c0 + tl.arange(0, BLOCK_CG)
            mask = (k < NCHUNK)[:, None] & (cl < CG)[None, :]
            idx = (b * NCHUNK + k)[:, None] * C + (g * CG + cl)[None, :]
            pm = tl.load(PMEAN + idx, mask=mask, other=0.0)
            dm = tl.where(mask, pm - mean, 0.0)
            m2 += tl.load(PM2 + idx, mask=mask, other=0.0) + nk[:, None] * dm * dm
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, tl.rsqrt(tl.sum(m2) / n + eps))


@triton.jit
def _fwd_apply(X, Y, W, Bi, SC, SH, MEAN, RSTD, C, S, G, CG, stride_c, stride_s, NSB,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
               ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # (sample, block of rows)
    b = pid // NSB
    s = (pid % NSB) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (s < S)[:, None] & cmask[None, :]
    grp = b * G + c // CG
    mean = tl.load(MEAN + grp, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + grp, mask=cmask, other=0.0)
    k, dd = _channel_affine(W, Bi, SC, SH, b, c, cmask, C, HAS_W, HAS_B, HAS_SC, HAS_SH)
    offs = b.to(tl.int64) * C * S + s[:, None] * stride_s + c[None, :] * stride_c
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean[None, :]) * (rstd * k)[None, :] + dd[None, :]
    if ACT:
        z = _silu(z)
    tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)


# ---- backward ------------------------------------------------------------------------------


@triton.jit
def _bwd_fused(X, DY, DX, W, Bi, SC, SH, MEAN, RSTD, S1, S2, C, S, G, CG, stride_c, stride_s,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
               ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr):
    pid = tl.program_id(0)  # one (sample, group)
    b = pid // G
    g = pid % G
    s = tl.arange(0, BLOCK_S)
    cl = tl.arange(0, BLOCK_CG)
    c = g * CG + cl
    cmask = cl < CG
    mask = (s < S)[:, None] & cmask[None, :]
    offs = b.to(tl.int64) * C * S + s[:, None] * stride_s + c[None, :] * stride_c
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    k, dd = _channel_affine(W, Bi, SC, SH, b, c, cmask, C, HAS_W, HAS_B, HAS_SC, HAS_SH)
    if ACT:
        dz = dz * _dsilu(xhat * k[None, :] + dd[None, :])
    s1 = tl.sum(dz, axis=0)  # (BLOCK_CG,)
    s2 = tl.sum(dz * xhat, axis=0)
    tl.store(S1 + b * C + c, s1, mask=cmask)
    tl.store(S2 + b * C + c, s2, mask=cmask)
    n = CG * S
    c1 = tl.sum(k * s1) / n
    c2 = tl.sum(k * s2) / n
    dx = rstd * (dz * k[None, :] - c1 - xhat * c2)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_partial(X, DY, W, Bi, SC, SH, MEAN, RSTD, PS1, PS2, C, S, G, CG, stride_c, stride_s, NCHUNK, ROWS,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
                 ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # (sample, chunk of ROWS rows)
    b = pid // NCHUNK
    kc = pid % NCHUNK
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    grp = b * G + c // CG
    mean = tl.load(MEAN + grp, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + grp, mask=cmask, other=0.0)
    k, dd = _channel_affine(W, Bi, SC, SH, b, c, cmask, C, HAS_W, HAS_B, HAS_SC, HAS_SH)
    base = b.to(tl.int64) * C * S
    s1 = tl.zeros([BLOCK_C], tl.float32)
    s2 = tl.zeros([BLOCK_C], tl.float32)
    for r in range(0, ROWS, BLOCK_S):
        s = kc * ROWS + r + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        offs = base + s[:, None] * stride_s + c[None, :] * stride_c
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        if ACT:
            dz = dz * _dsilu(xhat * k[None, :] + dd[None, :])
        s1 += tl.sum(dz, axis=0)
        s2 += tl.sum(dz * xhat, axis=0)
    out = (b * NCHUNK + kc) * C + c
    tl.store(PS1 + out, s1, mask=cmask)
    tl.store(PS2 + out, s2, mask=cmask)


@triton.jit
def _bwd_finalize(PS1, PS2, W, Bi, SC, SH, S1, S2, C1, C2, C, S, G, CG, NCHUNK,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr):
    pid = tl.program_id(0)  # one (sample, group)
    b = pid // G
    g = pid % G
    t1 = tl.zeros([BLOCK_CG], tl.float32)
    t2 = tl.zeros([BLOCK_CG], tl.float32)
    for c0 in range(0, CG, BLOCK_CG):
        cl = c0 + tl.arange(0, BLOCK_CG)
        cmask = cl < CG
        c = g * CG + cl
        a1 = tl.zeros([BLOCK_K, BLOCK_CG], tl.float32)
        a2 = tl.zeros([BLOCK_K, BLOCK_CG], tl.float32)
        for k0 in range(0, NCHUNK, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = (k < NCHUNK)[:, None] & cmask[None, :]
            idx = (b * NCHUNK + k)[:, None] * C + c[None, :]
            a1 += tl.load(PS1 + idx, mask=mask, other=0.0)
            a2 += tl.load(PS2 + idx, mask=mask, other=0.0)
        s1 = tl.sum(a1, axis=0)
        s2 = tl.sum(a2, axis=0)
        tl.store(S1 + b * C + c, s1, mask=cmask)
        tl.store(S2 + b * C + c, s2, mask=cmask)
        kk, _ = _channel_affine(W, Bi, SC, SH, b, c, cmask, C, HAS_W, HAS_B, HAS_SC, HAS_SH)
        t1 += kk * s1
        t2 += kk * s2
    n = CG * S
    tl.store(C1 + pid, tl.sum(t1) / n)
    tl.store(C2 + pid, tl.sum(t2) / n)


@triton.jit
def _bwd_apply(X, DY, DX, W, Bi, SC, SH, MEAN, RSTD, C1, C2, C, S, G, CG, stride_c, stride_s, NSB,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr,
               ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # (sample, block of rows)
    b = pid // NSB
    s = (pid % NSB) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (s < S)[:, None] & cmask[None, :]
    grp = b * G + c // CG
    mean = tl.load(MEAN + grp, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + grp, mask=cmask, other=0.0)
    c1 = tl.load(C1 + grp, mask=cmask, other=0.0)
    c2 = tl.load(C2 + grp, mask=cmask, other=0.0)
    k, dd = _channel_affine(W, Bi, SC, SH, b, c, cmask, C, HAS_W, HAS_B, HAS_SC, HAS_SH)
    offs = b.to(tl.int64) * C * S + s[:, None] * stride_s + c[None, :] * stride_c
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean[None, :]) * rstd[None, :]
    if ACT:
        dz = dz * _dsilu(xhat * k[None, :] + dd[None, :])
    dx = rstd[None, :] * (dz * k[None, :] - c1[None, :] - xhat * c2[None, :])
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# ---- launch plans and entry points ---------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one (B, C, S, G, layout) problem is cut into programs."""

    fused: bool
    block_s: int  # rows per tile
    block_c: int  # channels per tile (fused: next_pow2(C // G))
    rows: int  # rows per partial-statistics chunk (a multiple of block_s)
    nchunk: int
    num_warps: int


def plan(B: int, C: int, S: int, G: int, channels_last: bool) -> Plan:
    cg = C // G
    bcg = triton.next_power_of_2(cg)
    bs = triton.next_power_of_2(S)
    if bcg * bs <= FUSED_MAX:
        tile = bcg * bs
        warps = 16 if tile >= 8192 else 8 if tile >= 2048 else 4
        return Plan(True, bs, bcg, S, 1, warps)
    # NCHW: rows are contiguous, so tiles are tall and narrow; NHWC: channels are contiguous.
    block_c = min(triton.next_power_of_2(C), 64 if channels_last else 2)
    block_s = max(1, min(SPLIT_TILE // block_c, triton.next_power_of_2(S)))
    tiles = B * triton.cdiv(S, block_s) * triton.cdiv(C, block_c)
    iters = max(1, min(SPLIT_MAX_ITERS, tiles // SPLIT_MIN_PROGRAMS))
    rows = block_s * iters
    warps = 8 if block_s * block_c >= 2048 else 4
    return Plan(False, block_s, block_c, rows, triton.cdiv(S, rows), warps)


def _layout(x: torch.Tensor, channels_last: bool) -> Tuple[int, int, int, int, int]:
    B, C = x.shape[:2]
    S = x[0, 0].numel()
    return B, C, S, (1 if channels_last else S), (C if channels_last else 1)


def _params(weight, bias, scale, shift, dummy):
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_SC=scale is not None,
                 HAS_SH=shift is not None)
    ptrs = [t if t is not None else dummy for t in (weight, bias, scale, shift)]
    return ptrs, flags


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], num_groups: int, eps: float,
            silu: bool, channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (x's layout), mean and rstd (B, G) fp32. x is NCHW- or channels_last-contiguous; scale/shift (B, C) contiguous."""
    B, C, S, stride_c, stride_s = _layout(x, channels_last)
    G = num_groups
    cg = C // G
    y = torch.empty_like(x)
    mean = torch.empty(B, G, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    ptrs, flags = _params(weight, bias, scale, shift, x)
    p = plan(B, C, S, G, channels_last)
    if p.fused:
        _fwd_fused[(B * G,)](x, y, *ptrs, mean, rstd, C, S, G, cg, stride_c, stride_s, eps, **flags, ACT=silu,
                             BLOCK_S=p.block_s, BLOCK_CG=p.block_c, num_warps=p.num_warps)
        return y, mean, rstd
    pmean = torch.empty(B, p.nchunk, C, device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    ncb = triton.cdiv(C, p.block_c)
    _fwd_partial[(B * p.nchunk, ncb)](x, pmean, pm2, C, S, stride_c, stride_s, p.nchunk, p.rows,
                                      BLOCK_S=p.block_s, BLOCK_C=p.block_c, num_warps=p.num_warps)
    bk, bcg = _finalize_blocks(p.nchunk, cg)
    _fwd_finalize[(B * G,)](pmean, pm2, mean, rstd, C, S, G, cg, p.nchunk, p.rows, eps, BLOCK_K=bk, BLOCK_CG=bcg)
    nsb = triton.cdiv(S, p.block_s)
    _fwd_apply[(B * nsb, ncb)](x, y, *ptrs, mean, rstd, C, S, G, cg, stride_c, stride_s, nsb, **flags, ACT=silu,
                               BLOCK_S=p.block_s, BLOCK_C=p.block_c, num_warps=p.num_warps)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
             num_groups: int, silu: bool, channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (x's layout), s1 = sum_s dz and s2 = sum_s dz * xhat, both (B, C) fp32. dy has x's layout."""
    B, C, S, stride_c, stride_s = _layout(x, channels_last)
    G = num_groups
    cg = C // G
    dx = torch.empty_like(x)
    s1 = torch.empty(B, C, device=x.device, dtype=torch.float32)
    s2 = torch.empty_like(s1)
    ptrs, flags = _params(weight, bias, scale, shift, x)
    p = plan(B, C, S, G, channels_last)
    if p.fused:
        _bwd_fused[(B * G,)](x, dy, dx, *ptrs, mean, rstd, s1, s2, C, S, G, cg, stride_c, stride_s, **flags,
                             ACT=silu, BLOCK_S=p.block_s, BLOCK_CG=p.block_c, num_warps=p.num_warps)
        return dx, s1, s2
    ps1 = torch.empty(B, p.nchunk, C, device=x.device, dtype=torch.float32)
    ps2 = torch.empty_like(ps1)
    ncb = triton.cdiv(C, p.block_c)
    _bwd_partial[(B * p.nchunk, ncb)](x, dy, *ptrs, mean, rstd, ps1, ps2, C, S, G, cg, stride_c, stride_s,
                                      p.nchunk, p.rows, **flags, ACT=silu, BLOCK_S=p.block_s, BLOCK_C=p.block_c,
                                      num_warps=p.num_warps)
    c1 = torch.empty(B, G, device=x.device, dtype=torch.float32)
    c2 = torch.empty_like(c1)
    bk, bcg = _finalize_blocks(p.nchunk, cg)
    _bwd_finalize[(B * G,)](ps1, ps2, *ptrs, s1, s2, c1, c2, C, S, G, cg, p.nchunk, **flags,
                            BLOCK_K=bk, BLOCK_CG=bcg)
    nsb = triton.cdiv(S, p.block_s)
    _bwd_apply[(B * nsb, ncb)](x, dy, dx, *ptrs, mean, rstd, c1, c2, C, S, G, cg, stride_c, stride_s, nsb,
                               **flags, ACT=silu, BLOCK_S=p.block_s, BLOCK_C=p.block_c, num_warps=p.num_warps)
    return dx, s1, s2


def _finalize_blocks(nchunk: int, cg: int) -> Tuple[int, int]:
    bcg = min(triton.next_power_of_2(cg), 64)
    bk = max(1, min(triton.next_power_of_2(nchunk), 2048 // bcg))
    return bk, bcg
