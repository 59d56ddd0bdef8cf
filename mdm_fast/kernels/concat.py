"""Triton kernel of :func:`mdm_fast.ops.concat_channels`: ``torch.cat((a, b), dim=1)`` of channels_last
tensors, optionally with the per-channel partial moments that group_norm's split path would compute next.

channels_last stores each pixel's channels contiguously, so the concatenation is a row copy: row s of
the output (C1 + C2 channels) is row s of a followed by row s of b. PyTorch's cat copies these rows at
about 43% of the copy rate on an H200 (4.3 ms of the 256x256 forward at batch 32, where the decoder
concatenates its skips; benchmarks/results/profile-256-forward-b32-nvidia-h200-66b5828.md); here each program
streams one channel chunk of a part of a sample's rows, with 16-byte accesses (:mod:`mdm_fast.kernels.rows`).
The first version, a program per (sample, part) walking all its chunks of a then b in turn, each chunk's
moments reduced across the warps on every tile, took 6.9 ms there with moments against a 1.8 ms floor
(benchmarks/results/profile-256-forward-b32-nvidia-h200.md: 123 registers, 2 programs per SM).

The up path normalises every concatenation right away (the next ResNet's ``norm1``). With
``moments`` the kernel also writes the partial moments of the rows it copied, over the norm's parts
(``group_norm.moments_plan``): the norm then skips its statistics pass, one read of the concatenation
fewer.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mdm_fast.kernels import group_norm as gn
from mdm_fast.kernels import rows
from mdm_fast.kernels.sizes import cdiv


@triton.jit
def _concat_kernel(A, B, OUT, PMEAN, PM2, S, C1, C2, ROWS, CHUNKS1, HAS_MOMENTS: tl.constexpr,
                   ACC_ROWS: tl.constexpr, STAGES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per (sample, part, chunk): rows [part * ROWS, min(S, (part + 1) * ROWS)) of the sample,
    chunk < CHUNKS1 a's channels [chunk * BLOCK_C, +BLOCK_C), else b's (chunk - CHUNKS1)-th chunk (one
    loop for both: one set of pipeline buffers)."""
    row0, lo, hi, part = rows.part_rows(S, ROWS)
    chunk = tl.program_id(2)
    in_a = chunk < CHUNKS1
    rows.stream_rows(tl.where(in_a, A, B), OUT, PMEAN, PM2, row0, lo, hi, tl.where(in_a, C1, C2), C1 + C2,
                     tl.where(in_a, 0, C1), tl.where(in_a, chunk, chunk - CHUNKS1) * BLOCK_C, part * (C1 + C2),
                     HAS_MOMENTS, ACC_ROWS, STAGES, BLOCK_S, BLOCK_C)


def concat(a: torch.Tensor, b: torch.Tensor,
           moments: Optional[gn.Plan] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(torch.cat((a, b), 1) channels_last, partial moments (2, B, nsplit, C1 + C2) fp32 or None).

    a (B, C1, H, W), b (B, C2, H, W): channels_last-dense, one dtype. ``moments``: the plan of the
    group_norm that reads the output (its parts), or None for the copy alone."""
    B, C1, H, W = a.shape
    C2 = b.shape[1]
    out = torch.empty((B, C1 + C2, H, W), device=a.device, dtype=a.dtype, memory_format=torch.channels_last)
    tile = rows.blocks(min(C1, C2), a.element_size())
    chunks1 = cdiv(C1, tile["BLOCK_C"])
    chunks = chunks1 + cdiv(C2, tile["BLOCK_C"])
    nrows, nsplit, part = rows.parts(out, moments, chunks, tile["BLOCK_S"])
    pmean, pm2 = (part[0], part[1]) if part is not None else (out, out)  # out stands in for absent partials
    _concat_kernel[(B, nsplit, chunks)](a, b, out, pmean, pm2, H * W, C1, C2, nrows, chunks1,
                                        HAS_MOMENTS=part is not None, **tile, num_warps=rows.NUM_WARPS)
    return out, part
