"""Triton implicit-GEMM kernel for nearest-2x upsampling followed by a 3x3 conv (padding 1).

Sub-pixel identity: output pixel (2m + py, 2n + px) of conv3x3(upsample2x(x)) only sees input
rows {m-1, m} (py = 0) or {m, m+1} (py = 1), and the same for columns, so each of the four output
phases (py, px) is a 2x2 conv of the low-resolution input with *phase weights* (sums of the 3x3
taps that land on the same input pixel). Zero padding of the upsampled image is exactly zero
padding of the input by one pixel on each side (input row -1 and row H are out of range exactly
when upsampled row -1 and row 2H are), each phase using one side of it. 16 instead of 36 MACs per
low-resolution pixel and channel pair (2.25x fewer), and no upsampled tensor.

One program computes a (BLOCK_M low-res pixels) x (BLOCK_N output channels) tile of one phase:
four taps x ceil(Cin / BLOCK_K) dots with fp32 accumulation, bias fused, and writes its pixels
straight to their interleaved places in the output. Everything is addressed through strides, so
channels_last (coalesced along channels, the fast case) and NCHW both work. Dots take fp16/bf16
operands; fp32 inputs use exact fp32 ("ieee") dots, not tf32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mdm_fast.kernels.sizes import cdiv, next_power_of_2
from mdm_fast.ops.dispatch import triton_interpreting


# (M, N, K, warps, stages), chosen for H100/H200 (228 KB smem): wide N for 256-768 channels, narrow N for
# the 32/64-channel outer levels of the 1024 model.
_HOPPER = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 32, 32, 4, 4)]
# fp32 inputs: exact fp32 dots on the CUDA cores, a correctness path: one small tile. (Autotuned over the
# tiles above, an 80-channel fp32 layer compiled and timed all four: 38-43 s in a GPU test on the H200 of
# 2026-11-29, beside five other test processes.)
_FP32 = (32, 32, 32, 4, 1)


def _config(shape: tuple) -> triton.Config:
    m, n, k, w, s = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)


def _configs() -> list:
    """Autotune space; one small multi-tile config under the interpreter so CPU tests stay fast."""
    if triton_interpreting():
        return [_config((16, 16, 16, 4, 1))]
    return [_config(s) for s in (*_HOPPER, _FP32)]


def _prune(configs, named_args, **kwargs):
    """fp32 inputs: the fp32 tile alone; 16-bit ones: the other tiles, less those much wider than the
    layer (at least one)."""
    fp32 = str(_config(_FP32))
    if named_args["X"].dtype == torch.float32:
        return [c for c in configs if str(c) == fp32] or configs[:1]
    tiles = [c for c in configs if str(c) != fp32]
    kept = [c for c in tiles if c.kwargs["BLOCK_N"] <= max(32, next_power_of_2(named_args["COUT"]))]
    return kept or tiles[:1]


@triton.autotune(configs=_configs(), key=["B", "H", "W", "CIN", "COUT", "sxc", "syc"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _upsample_conv3x3_fwd(X, WP, BIAS, Y, B, H, W, CIN, COUT,
                          sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                          HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)  # 2 * py + px
    py = phase // 2
    px = phase % 2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # low-res pixel index over (b, i, j)
    m_ok = offs_m < B * H * W
    j = offs_m % W
    i = (offs_m // W) % H
    b = (offs_m // (W * H)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < COUT
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in tl.static_range(4):  # 2x2 taps of this phase: input (i + py + ty - 1, j + px + tx - 1)
        r = i + py + (tap // 2) - 1
        c = j + px + (tap % 2) - 1
        ok = m_ok & (r >= 0) & (r < H) & (c >= 0) & (c < W)
        x_row = X + b * sxb + r.to(tl.int64) * sxh + c.to(tl.int64) * sxw  # (M,)
        w_tap = WP + (phase * 4 + tap) * CIN * COUT  # (CIN, COUT) block of this phase and tap
        for k0 in range(0, CIN, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < CIN
            a = tl.load(x_row[:, None] + kk[None, :] * sxc, mask=ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_tap + kk[:, None] * COUT + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_row = Y + b * syb + (2 * i + py).to(tl.int64) * syh + (2 * j + px).to(tl.int64) * syw
    tl.store(y_row[:, None] + offs_n[None, :] * syc, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def upsample_conv3x3_fwd(x: torch.Tensor, phase_w: torch.Tensor, bias: Optional[torch.Tensor],
                         out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (B, Cout, 2H, 2W), any strides, from x (B, Cin, H, W) and the phase weights
    ``phase_w`` (2, 2, 2, 2, Cin, Cout) contiguous = [py, px, ty, tx, ci, co], dtype of x."""
    B, CIN, H, W = x.shape
    COUT = out.shape[1]
    grid = lambda meta: (cdiv(B * H * W, meta["BLOCK_M"]), cdiv(COUT, meta["BLOCK_N"]), 4)  # noqa: E731
    _upsample_conv3x3_fwd[grid](
        x, phase_w, bias if bias is not None else phase_w, out, B, H, W, CIN, COUT,
        *x.stride(), *out.stride(),
        HAS_BIAS=bias is not None, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
    )
    return out
