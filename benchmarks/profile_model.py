"""Where the fast model's time goes: the top GPU kernels of one 256x256 step, by total CUDA time.

    python -m benchmarks.profile_model [--kind forward|train] [--batch 32] [--out DIR]

Runs mdm_fast eager (bf16 autocast) under torch.profiler after a warm-up and writes a markdown table
of the kernels that take the most device time, grouped by name, with their share of the step.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import models as bm
from benchmarks.common import markdown_table, write_report


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
    step = bm.variants("quick", fast, fast, wl, 256)["mdm_fast eager"]()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    rows = [[e.key[:90], e.count // args.steps, e.self_device_time_total / args.steps / 1e3,
             f"{100 * e.self_device_time_total / total:.1f}%"] for e in events[:args.top]]
    table = markdown_table(["kernel", "calls per step", "ms per step", "share"], rows)
    write_report(f"profile-256-{args.kind}-b{args.batch}",
                 {f"Top kernels, mdm_fast eager, {args.kind} batch {args.batch}, bf16": table,
                  "Total": f"{total / args.steps / 1e3:.2f} ms of kernel time per step"}, args.out,
                 timing="Times are kernel times summed by the PyTorch profiler (CUPTI).")


if __name__ == "__main__":
    main()
