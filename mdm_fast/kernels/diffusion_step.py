"""Triton kernels of the two multi-resolution diffusion ops (semantics: :mod:`mdm_fast.ops.diffusion_step`).

``noisy_pyramid``: one program per (image plane, top tile of TH x TW pixels). It reads the top tile
once, writes level 0, then pools the tile in registers (reshape to (h, r, w, r) and sum) for every
lower level and writes that level's x0, x_t and target next to its noise: the top image is read
once for all levels, each level's noise once, and every output written once.

``sampler_update``: every level in one launch on a (blocks, sample) grid: axis 0 picks the level
(consecutive block ranges) and a block of one sample's pixels, axis 1 the sample, so a program's
gammas are two scalar loads (no per-element division or gather); then an element-wise step: x0 from
the prediction, clip, DDPM posterior or DDIM, injected noise, equivalent noise. Contiguous NCHW
tensors (others are made contiguous); arithmetic in fp32.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mdm_fast.kernels.sizes import cdiv, next_power_of_2

_KIND = {"eps": 0, "v": 1, "x0": 2}


@triton.jit
def _target(x0, eps, sg, s1g, KIND: tl.constexpr):
    if KIND == 1:
        out = sg * eps - s1g * x0
    else:
        out = x0
    return out


@triton.jit
def _emit_level(val, hh, ww, Hl, Wl, plane, g_ptr, noise_ptr, x0_ptr, xt_ptr, tgt_ptr, inv_s,
                KIND: tl.constexpr):
    """Write one level's x0 = val * inv_s, x_t and target; val (h, w) fp32 pooled pixels."""
    mask = (hh < Hl) & (ww < Wl)
    offs = plane * Hl * Wl + hh * Wl + ww
    g = tl.load(g_ptr)
    sg = tl.sqrt(g)
    s1g = tl.sqrt(1.0 - g)
    x0 = val * inv_s
    eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    tl.store(xt_ptr + offs, (sg * x0 + s1g * eps).to(xt_ptr.dtype.element_ty), mask=mask)
    if KIND != 0:  # an eps target is the noise itself: nothing to write
        tl.store(tgt_ptr + offs, _target(x0, eps, sg, s1g, KIND).to(tgt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool(val, H: tl.constexpr, W: tl.constexpr, RR: tl.constexpr):
    """(H, W) -> (H / RR, W / RR) means."""
    v = tl.reshape(val, (H // RR, RR, W // RR, RR))
    return tl.sum(tl.sum(v, axis=3), axis=1) * (1.0 / (RR * RR))


@triton.jit
def _pyramid_kernel(img_ptr, g_ptr,
                    n0, n1, n2, n3, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3,
                    s0, s1, s2, s3,
                    B, C, H, W, tiles_w,
                    R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, LEVELS: tl.constexpr,
                    TH: tl.constexpr, TW: tl.constexpr, KIND: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # b * C + c
    tile = tl.program_id(1)
    th, tw = tile // tiles_w, tile % tiles_w
    b = plane // C
    hh = th * TH + tl.arange(0, TH)[:, None]
    ww = tw * TW + tl.arange(0, TW)[None, :]
    mask = (hh < H) & (ww < W)
    val = tl.load(img_ptr + plane * H * W + hh * W + ww, mask=mask, other=0.0).to(tl.float32)
    _emit_level(val, hh, ww, H, W, plane, g_ptr + b, n0, a0, b0, c0, s0, KIND)
    if LEVELS > 1:
        val1 = _pool(val, TH, TW, R1)
        h1 = th * (TH // R1) + tl.arange(0, TH // R1)[:, None]
        w1 = tw * (TW // R1) + tl.arange(0, TW // R1)[None, :]
        _emit_level(val1, h1, w1, H // R1, W // R1, plane, g_ptr + B + b, n1, a1, b1, c1, s1, KIND)
        if LEVELS > 2:
            val2 = _pool(val1, TH // R1, TW // R1, R2 // R1)
            h2 = th * (TH // R2) + tl.arange(0, TH // R2)[:, None]
            w2 = tw * (TW // R2) + tl.arange(0, TW // R2)[None, :]
            _emit_level(val2, h2, w2, H // R2, W // R2, plane, g_ptr + 2 * B + b, n2, a2, b2, c2, s2, KIND)
            if LEVELS > 3:
                val3 = _pool(val2, TH // R2, TW // R2, R3 // R2)
                h3 = th * (TH // R3) + tl.arange(0, TH // R3)[:, None]
                w3 = tw * (TW // R3) + tl.arange(0, TW // R3)[None, :]
                _emit_level(val3, h3, w3, H // R3, W // R3, plane, g_ptr + 3 * B + b, n3, a3, b3, c3, s3,
                            KIND)


def _pad4(items: Sequence, fill) -> List:
    return list(items) + [fill] * (4 - len(items))


def _tile(size: int, largest_ratio: int, cap: int) -> int:
    """A power-of-two tile side, a multiple of the largest ratio, no larger than needed."""
    return max(largest_ratio, min(cap, next_power_of_2(size)))


def noisy_pyramid(images: Tensor, ratios: Sequence[int], gammas: Tensor, noises: Sequence[Tensor],
                  signal_scales: Sequence[float], target: str) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    images = images.contiguous()
    noises = [n.contiguous() for n in noises]
    gammas = gammas.float().contiguous()
    B, C, H, W = images.shape
    L = len(ratios)
    n_out = 2 if target == "eps" else 3
    outs = [[torch.empty(n.shape, device=images.device, dtype=images.dtype) for n in noises] for _ in range(n_out)]
    TH, TW = _tile(H, ratios[-1], 16), _tile(W, ratios[-1], 64)
    tiles_h, tiles_w = cdiv(H, TH), cdiv(W, TW)
    r = _pad4(ratios, ratios[-1])
    dummy = images
    ptrs = [_pad4(noises, dummy)] + [_pad4(o, dummy) for o in outs] + [_pad4([], dummy)] * (3 - n_out)
    inv = _pad4([1.0 / s for s in signal_scales], 1.0)
    _pyramid_kernel[(B * C, tiles_h * tiles_w)](
        images, gammas, *ptrs[0], *ptrs[1], *ptrs[2], *ptrs[3], *inv, B, C, H, W, tiles_w,
        R1=r[1], R2=r[2], R3=r[3], LEVELS=L, TH=TH, TW=TW, KIND=_KIND[target])
    return outs[0], outs[1], (outs[2] if n_out == 3 else [])


@triton.jit
def _update_level(blk, x_ptr, p_ptr, n_ptr, x0_ptr, xs_ptr, eps_ptr, gt_ptr, gs_ptr, per_sample,
                  scale, inv_scale, eta, BLOCK: tl.constexpr, KIND: tl.constexpr, CLIP: tl.constexpr,
                  DDIM: tl.constexpr, NOISE: tl.constexpr):
    b = tl.program_id(1)  # the sample: its gammas are two scalars
    within = blk * BLOCK + tl.arange(0, BLOCK)
    mask = within < per_sample
    offs = b.to(tl.int64) * per_sample + within
    g = tl.load(gt_ptr + b)
    gs = tl.load(gs_ptr + b)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sg, s1g = tl.sqrt(g), tl.sqrt(1.0 - g)
    if KIND == 0:
        x0 = (x - p * s1g) / sg
    elif KIND == 1:
        x0 = x * sg - p * s1g
    else:
        x0 = p
    if CLIP:  # NaN stays NaN, as torch.clip keeps it (a GPU's plain min/max return the other operand)
        x0 = tl.clamp(x0 * scale, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL) * inv_scale
    alpha = g / gs
    beta = 1.0 - alpha
    var = beta * (1.0 - gs) / (1.0 - g)
    eps_t = (x - x0 * sg) / s1g
    if DDIM:
        var = eta * eta * var
        xs = x0 * tl.sqrt(gs) + eps_t * tl.sqrt(tl.maximum(1.0 - gs - var, 0.0, propagate_nan=tl.PropagateNan.ALL))
    else:
        xs = x0 * beta * tl.sqrt(gs) / (1.0 - g) + x * tl.sqrt(alpha) * (1.0 - gs) / (1.0 - g)
    if NOISE:
        xs += tl.sqrt(var) * tl.load(n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if gs >= 1.0:  # the last step: the noise estimate at t
        eps = eps_t
    else:
        eps = (xs - tl.sqrt(gs) * x0) / tl.sqrt(1.0 - gs)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    tl.store(xs_ptr + offs, xs.to(xs_ptr.dtype.element_ty), mask=mask)
    tl.store(eps_ptr + offs, eps.to(eps_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_kernel(x0p, x1p, x2p, x3p, p0, p1, p2, p3, n0, n1, n2, n3, o0, o1, o2, o3, q0, q1, q2, q3,
                   e0, e1, e2, e3, gt_ptr, gs_ptr, B, per0, per1, per2, per3, start1, start2, start3,
                   sc0, sc1, sc2, sc3, eta, LEVELS: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
                   CLIP: tl.constexpr, DDIM: tl.constexpr, NOISE: tl.constexpr):
    pid = tl.program_id(0)  # a block of one sample's pixels; levels own consecutive block ranges
    if pid < start1:
        _update_level(pid, x0p, p0, n0, o0, q0, e0, gt_ptr, gs_ptr, per0, sc0, 1.0 / sc0, eta,
                      BLOCK, KIND, CLIP, DDIM, NOISE)
    if LEVELS > 1:
        if (pid >= start1) & (pid < start2):
            _update_level(pid - start1, x1p, p1, n1, o1, q1, e1, gt_ptr + B, gs_ptr + B, per1,
                          sc1, 1.0 / sc1, eta, BLOCK, KIND, CLIP, DDIM, NOISE)
    if LEVELS > 2:
        if (pid >= start2) & (pid < start3):
            _update_level(pid - start2, x2p, p2, n2, o2, q2, e2, gt_ptr + 2 * B, gs_ptr + 2 * B, per2,
                          sc2, 1.0 / sc2, eta, BLOCK, KIND, CLIP, DDIM, NOISE)
    if LEVELS > 3:
        if pid >= start3:
            _update_level(pid - start3, x3p, p3, n3, o3, q3, e3, gt_ptr + 3 * B, gs_ptr + 3 * B, per3,
                          sc3, 1.0 / sc3, eta, BLOCK, KIND, CLIP, DDIM, NOISE)


_BLOCK = 1024


def sampler_update(x_t: Sequence[Tensor], pred: Sequence[Tensor], g_t: Tensor, g_s: Tensor,
                   noise: Sequence[Optional[Tensor]], signal_scales: Sequence[float], kind: str,
                   eta: Optional[float], thresh: str) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    x_t = [x.contiguous() for x in x_t]
    pred = [p.contiguous() for p in pred]
    use_noise = all(n is not None for n in noise) and not (eta is not None and eta == 0)
    noise = [n.contiguous() if use_noise else x for n, x in zip(noise, x_t)]
    g_t, g_s = g_t.float().contiguous(), g_s.float().contiguous()
    L, B = len(x_t), x_t[0].shape[0]
    outs = [[torch.empty_like(x) for x in x_t] for _ in range(3)]
    per_sample = [x[0].numel() for x in x_t]
    starts, acc = [], 0
    for n in per_sample:
        acc += cdiv(n, _BLOCK)
        starts.append(acc)
    d = x_t[0]
    args = [_pad4(x_t, d), _pad4(pred, d), _pad4(noise, d)] + [_pad4(o, d) for o in outs]
    _update_kernel[(acc, B)](
        *(p for group in args for p in group), g_t, g_s, B, *_pad4(per_sample, 0), *_pad4(starts[:-1], acc)[:3],
        *_pad4([float(s) for s in signal_scales], 1.0), float(eta or 0.0),
        LEVELS=L, BLOCK=_BLOCK, KIND=_KIND[kind], CLIP=thresh == "clip", DDIM=eta is not None, NOISE=use_noise)
    return outs[0], outs[1], outs[2]
