"""Benchmark of the fused multi-resolution pyramid and joint sampler update (issue 6).

``python -m benchmarks.diffusion_step --suite quick|full [--out DIR]``: at the real shapes of the public
256x256 model (256/64 px) and 1024x1024 model (1024/256/64 px), ref (PyTorch, one pass per level) vs
the fused Triton kernel: ms, GB/s of the bytes each op must move, and the fraction of the copy
bandwidth measured on the same card in the same run.
"""
from __future__ import annotations

import torch

from benchmarks import common
from mdm_fast.ops import dispatch
from mdm_fast.ops.diffusion_step import noisy_pyramid, sampler_update

MODELS = {"256": (256, [1, 4], [32, 16]), "1024": (1024, [1, 4, 16], [8, 4])}


def _pyramid_case(size, ratios, batch, dtype, target, device):
    img = torch.rand(batch, 3, size, size, device=device).to(dtype) * 2 - 1
    noises = [torch.randn(batch, 3, size // r, size // r, device=device).to(dtype) for r in ratios]
    g = torch.rand(len(ratios), batch, device=device)
    scales = [1.0] * len(ratios)
    per_level = 2 + (target != "eps")  # noise read, x0 and x_t written (+ the target)
    nbytes = img.numel() * img.element_size() + sum(n.numel() * n.element_size() * (1 + per_level) for n in noises)
    return (img, ratios, g, noises, scales, target), nbytes


def _update_case(size, ratios, batch, dtype, device):
    shapes = [(batch, 3, size // r, size // r) for r in ratios]
    x = [torch.randn(s, device=device).to(dtype) for s in shapes]
    p = [torch.randn(s, device=device).to(dtype) for s in shapes]
    n = [torch.randn(s, device=device).to(dtype) for s in shapes]
    g_s = torch.rand(len(ratios), batch, device=device) * 0.5 + 0.4
    g_t = g_s * 0.9
    nbytes = sum(t.numel() * t.element_size() * 6 for t in x)  # x_t, pred, noise in; x0, x_s, eps out
    return (x, p, g_t, g_s, n, [1.0] * len(ratios), "v", None, "clip"), nbytes


def _row(name, fn, args, nbytes, copy_gbps, iters):
    row = [name]
    times = {}
    for impl in ("ref", "triton"):
        reason = dispatch.why_not(fn.__name__, impl, *args)
        if reason is not None:
            times[impl] = float("nan")
            continue
        times[impl] = common.device_ms(lambda: fn(*args, impl=impl), warmup=3, iters=iters)
    for impl in ("ref", "triton"):
        gbps = common.gbps(nbytes, times[impl])
        row += [times[impl], gbps, gbps / copy_gbps]
    row.append(times["ref"] / times["triton"])
    return row


def main(argv=None) -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.suite == "quick"
    copy = common.ceilings().copy_gbps
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    targets = ["eps"] if quick else ["eps", "v"]
    iters = 10 if quick else 50
    header = ["case", "ref ms", "ref GB/s", "ref/copy", "fused ms", "fused GB/s", "fused/copy", "speed-up"]
    pyr, upd = [], []
    for model, (size, ratios, batches) in MODELS.items():
        for batch in batches[:1] if quick else batches:
            for dtype in dtypes:
                dt = str(dtype).replace("torch.", "")
                for target in targets:
                    a, nb = _pyramid_case(size, ratios, batch, dtype, target, device)
                    pyr.append(_row(f"{model} model B={batch} {dt} target={target}", noisy_pyramid, a, nb, copy, iters))
                a, nb = _update_case(size, ratios, batch, dtype, device)
                upd.append(_row(f"{model} model B={batch} {dt}", sampler_update, a, nb, copy, iters))
    common.write_report("diffusion_step", {
        "noisy_pyramid (all levels: pooled x0, x_t, target)": common.markdown_table(header, pyr),
        "sampler_update (all levels, DDPM posterior + noise, v-prediction, clip)": common.markdown_table(header, upd),
    }, args.out)


if __name__ == "__main__":
    main()
