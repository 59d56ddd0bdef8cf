"""Where the fast model's time goes: the top GPU kernels of one 256x256 step, by total CUDA time.

    python -m benchmarks.profile_model [--kind forward|train] [--batch 32] [--out DIR]

Runs mdm_fast eager (bf16 autocast; a forward on weights cast once, as the sampler runs it, a train
step as the trainer runs it) under torch.profiler after a warm-up and writes markdown tables
of the kernels that take the most device time, grouped by name, with their share of the step, and of
the operators that take the most host (CPU) time: an eager step whose wall time exceeds its kernel
time is host-bound, and the second table says where the host goes.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import models as bm
from benchmarks.common import markdown_table, time_ms, write_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["forward", "train"], default="forward")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.profile_model needs a CUDA device")
    from mdm_fast import optimize

    fast = optimize(copy.deepcopy(bm.build("256x256", fast=False)))
    wl = bm.Workload("256x256", args.kind, args.batch)
    if args.kind == "forward":  # the sampler's model: weights cast once, derived weights kept
        step = bm.forward_fn(bm.cast_once(fast), bm.inputs(fast, 256, args.batch))
    else:
        step = bm.variants("quick", fast, fast, wl, 256)["mdm_fast eager"]()
    for _ in range(3):
        step()
    wall = time_ms(step, warmup=0, iters=5)  # unprofiled, host included
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    kernels = _top(averages, "self_device_time_total", args.steps, args.top)
    host = _top(averages, "self_cpu_time_total", args.steps, args.top)
    kernel_ms = sum(e.self_device_time_total for e in averages) / args.steps / 1e3
    host_ms = sum(e.self_cpu_time_total for e in averages) / args.steps / 1e3
    title = f"mdm_fast eager, {args.kind} batch {args.batch}, bf16" + (
        ", weights cast once" if args.kind == "forward" else "")
    write_report(f"profile-256-{args.kind}-b{args.batch}",
                 {f"Top kernels, {title}": markdown_table(["kernel", "calls per step", "ms per step", "share"],
                                                          kernels),
                  f"Top operators by host time, {title}": markdown_table(
                      ["operator", "calls per step", "self CPU ms per step", "share"], host),
                  "Total": f"{kernel_ms:.2f} ms of kernel time per step; {wall:.2f} ms wall per step unprofiled "
                           f"(host included); {host_ms:.2f} ms of self CPU time in profiled operators per step "
                           "(profiling overhead included)."}, args.out,
                 timing="Kernel times summed by the PyTorch profiler (CUPTI); host times are its CPU self times.")


def _top(averages, attr: str, steps: int, top: int):
    """Rows (name, calls per step, ms per step, share) of the events with the most ``attr``."""
    events = [e for e in averages if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [[e.key[:90], e.count // steps, getattr(e, attr) / steps / 1e3, f"{100 * getattr(e, attr) / total:.1f}%"]
            for e in events[:top]]


if __name__ == "__main__":
    main()
