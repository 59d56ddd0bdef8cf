"""Resampling on the NestedUNet hot path: sub-pixel upsample-conv, nesting adapters, time projections.
    python -m benchmarks.resample --suite quick|full [--out DIR]

Upsample-conv shapes are the public models' up-block resamples (nearest 2x, then a C -> C 3x3 conv):
256x256 model outer level 64->128 px with 256 channels and 128->256 px with 128 channels, inner
(shared with the 1024 model) 16->32 px with 768 and 32->64 px with 512 channels; 1024x1024 model
outer levels 256->512 px with 64 channels and 512->1024 px with 32 channels. bf16, NCHW and
channels_last. Sampling batch 32 (forward); the full suite adds training batches (16 for the 256
model's shapes, 4 for the 1024 model's outer levels, forward + backward).

TFLOP/s count the FLOPs of the 3x3 conv on the *upsampled* image (2 * B * Cout * Cin * 9 * 4HW, what
the reference executes; the sub-pixel form executes 4/9 of them), so they compare directly across
variants. GB/s count the unavoidable traffic: read x, write the (B, C, 2H, 2W) output; forward +
backward counts twice that (plus read grad out, write grad x) and 3x the forward FLOPs.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from mdm_fast.ops import nested_inner_input, nested_outer_merge, resample, upsample_conv3x3
from mdm_fast.ops.time_proj import TimeProjections

# name: (channels, low-res side, training batch)
UPSAMPLE = {
    "256 outer 64->128": (256, 64, 16),
    "256 outer 128->256": (128, 128, 16),
    "inner 16->32": (768, 16, 16),
    "inner 32->64": (512, 32, 16),
    "1024 outer 256->512": (64, 256, 4),
    "1024 outer 512->1024": (32, 512, 4),
}
VARIANTS = {"reference (interpolate + conv)": "ref", "torch (conv_transpose 4x4, s2)": "torch",
            "torch (one 2x2 conv of the 4 phases, interleaved)": "torch-phases", "triton sub-pixel": "triton"}
SAMPLING_BATCH = 32
DEVICE = "cuda"


def _upsample(x, w, b, variant: str):
    """upsample_conv3x3 with the backend of a VARIANTS value ("torch-phases": TORCH_FORM = "phases")."""
    impl, _, form = variant.partition("-")
    with common.knob(resample, "TORCH_FORM", form or resample.TORCH_FORM):
        return upsample_conv3x3(x, w, b, impl=impl)


def _upsample_rows(name: str, B: int, fmt: torch.memory_format, backward: bool, iters: int) -> List[list]:
    C, H, _ = UPSAMPLE[name]
    dtype, dev = torch.bfloat16, DEVICE
    x = torch.randn(B, C, H, H, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    w = (torch.randn(C, C, 3, 3, device=dev) / (3 * C**0.5)).to(dtype)
    b = torch.randn(C, device=dev, dtype=dtype)
    flops = 2 * B * C * C * 9 * 4 * H * H * (3 if backward else 1)
    nbytes = 2 * (B * C * H * H + B * C * 4 * H * H) * (2 if backward else 1)
    rows, base = [], None
    for label, impl in VARIANTS.items():
        if backward:
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            out = _upsample(xg, wg, b, impl)
            g = torch.randn_like(out)

            def fn(xg=xg, wg=wg, g=g, impl=impl):
                torch.autograd.grad(_upsample(xg, wg, b, impl), (xg, wg), g)
        else:
            def fn(impl=impl):
                _upsample(x, w, b, impl)
        ms = common.device_ms(fn, warmup=3, iters=iters)
        base = base or ms
        rows.append([label, ms, base / ms, common.tflops(flops, ms),
                     100 * common.tflops(flops, ms) / common.ceilings().bf16_tflops, common.gbps(nbytes, ms)])
        torch.cuda.empty_cache()
    return rows


def _upsample_section(B: int, backward: bool, iters: int, names: List[str]) -> str:
    table = []
    for name in names:
        for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            batch = UPSAMPLE[name][2] if backward else B
            for row in _upsample_rows(name, batch, fmt, backward, iters):
                table.append([f"{name} B={batch}", fmt_name] + row)
    header = ["shape", "layout", "variant", "ms", "x vs ref", "eff. TFLOP/s", "% bf16 mm", "GB/s"]
    return common.markdown_table(header, table)


def _adapter_section(iters: int, C: int = 256, h: int = 64, bl: int = SAMPLING_BATCH) -> str:
    """256 model: the outer level's lowest resolution (64 px, 256 ch) into the inner level (256 ch)."""
    dtype, dev = torch.bfloat16, DEVICE
    table = []
    for bh in (bl, bl // 2):  # plain and mixed batch
        x_low = torch.randn(bl, 3, h, h, device=dev, dtype=dtype)
        feat = torch.randn(bh, C, h, h, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        inner = torch.randn(bl, C, h, h, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        wi, bi = torch.randn(C, 3, 3, 3, device=dev, dtype=dtype), torch.randn(C, device=dev, dtype=dtype)
        wa, ba = torch.randn(C, C, 3, 3, device=dev, dtype=dtype), torch.randn(C, device=dev, dtype=dtype)
        for op, fn in (("nested_inner_input", lambda i: nested_inner_input(x_low, wi, bi, feat, wa, ba, impl=i)),
                       ("nested_outer_merge", lambda i: nested_outer_merge(feat, inner, wa, ba, impl=i))):
            ref = common.device_ms(lambda: fn("ref"), iters=iters)
            fused = common.device_ms(lambda: fn("torch"), iters=iters)
            table.append([op, f"bh={bh}, bl={bl}", ref, fused, ref / fused])
    return common.markdown_table(["op", "batches", "ref ms", "torch ms", "x vs ref"], table)


# output channels of every ResNet of one level, per model level (time layer = Linear(1024, 2 C))
TIME_LEVELS = {
    "256/1024 inner level (17 ResNets)": [256, 256, 512, 512, 768, 768, 768, 768] + [768] * 3 + [512] * 3 + [256] * 3,
    "256 outer level (13 ResNets)": [64, 64, 128, 128, 256] + [256] * 2 + [128] * 3 + [64] * 3,
}


def _time_proj_section(iters: int) -> str:
    dtype, dev, temb_dim = torch.bfloat16, DEVICE, 1024
    table = []
    for level, widths in TIME_LEVELS.items():
        layers = [nn.Linear(temb_dim, 2 * c).to(dev, dtype) for c in widths]
        proj = TimeProjections(layers)
        temb = torch.randn(SAMPLING_BATCH, temb_dim, device=dev, dtype=dtype)
        for lay in layers:  # the sampler's weights need no gradient: W_cat is kept (ParamCache)
            lay.requires_grad_(False)
        with torch.no_grad():
            per_block = common.time_ms(lambda: [lay(F.silu(temb)).chunk(2, 1) for lay in layers], iters=iters)
            cached = common.time_ms(lambda: proj(temb), iters=iters)
        for lay in layers:
            lay.requires_grad_(True)
        per_block_g = common.time_ms(lambda: [lay(F.silu(temb)).chunk(2, 1) for lay in layers], iters=iters)
        concat_g = common.time_ms(lambda: proj(temb), iters=iters)  # params require grad: cat per call
        table.append([level, "sampling (no grad, cached W_cat)", per_block, cached, per_block / cached])
        table.append([level, "training (cat per call)", per_block_g, concat_g, per_block_g / concat_g])
    return common.markdown_table(["level", "mode", "per-block ms", "batched ms", "x"], table)


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.resample needs a CUDA device")
    quick = args.suite == "quick"
    iters = 10 if quick else 30
    names = list(UPSAMPLE)
    sections: Dict[str, str] = {}
    sections[f"Upsample-conv, sampling batch {SAMPLING_BATCH}, bf16, forward"] = \
        _upsample_section(SAMPLING_BATCH, False, iters, names)
    if not quick:
        sections["Upsample-conv, training batches, bf16, forward + backward"] = \
            _upsample_section(0, True, iters, names)
    sections["Nesting adapters (256 model, 64 px, 256 ch), bf16, forward"] = _adapter_section(iters)
    title = f"Time projections, batch {SAMPLING_BATCH}, bf16, temb 1024 (wall time per call, host included)"
    sections[title] = _time_proj_section(iters)
    sections["Notes"] = __doc__.split("\n\n", 1)[1].strip()
    common.write_report("resample", sections, args.out)


if __name__ == "__main__":
    main()
