"""Where the fast model's time goes: one step's GPU time by operator kind against its roofline floor,
its top kernels, and its top operators by host time.

    python -m benchmarks.profile_model [--model 256x256] [--kind forward|train] [--batch 32] [--out DIR]

Runs mdm_fast eager (bf16 autocast; a forward on weights cast once, as the sampler runs it, a train
step as the trainer runs it) under torch.profiler after a warm-up and writes markdown tables:

- the kernels' device time, filed under the operator kind of :mod:`benchmarks.roofline` (the
  outermost operator above the kernel's launch that has a kind), beside that kind's floor for the same
  step (the roofline's count on fake tensors, at the ceilings measured in this run): the kind with the
  most time over its floor is the one that holds the step back;
- the kernels that take the most device time, grouped by name, with their share of the step;
- the operators that take the most host (CPU) time: an eager step whose wall time exceeds its kernel
  time is host-bound, and this table says where the host goes.
"""
from __future__ import annotations

import argparse
import collections
import copy
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks import models as bm
from benchmarks import roofline
from benchmarks.common import ceilings, markdown_table, time_ms, write_report

UNFILED = "not filed (no operator above the launch)"
FLOOR_NOTE = ("ms: the device time of the kernels (device copies and fills included) the profiler saw, per step, "
              "each filed under the outermost operator above its launch that has a kind in benchmarks.roofline "
              f"(else '{roofline.OTHER}'); mdm_fast's Triton kernels that no operator holds (the profiler may "
              "link their launches to none), under their op's kind. floor: that kind's floor in "
              "benchmarks.roofline's count of the same step on fake tensors, at the ceilings measured in this run. "
              "'-': the profiled step ran no such kernel "
              f"(its total leaves that floor out). '{UNFILED}': kernel time with no operator above its launch "
              "(the total of the kernel table less the rows above it).")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["256x256", "1024x1024"], default="256x256")
    p.add_argument("--kind", choices=["forward", "train"], default="forward")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.profile_model needs a CUDA device")
    from mdm_fast import optimize

    name, cfg, size = bm.public_config(args.model)
    fast = optimize(copy.deepcopy(bm.build(args.model, fast=False)))
    if args.kind == "forward":  # the sampler's model: weights cast once, derived weights kept
        step = bm.forward_fn(bm.cast_once(fast), bm.inputs(fast, size, args.batch))
    else:
        wl = bm.Workload(args.model, args.kind, args.batch)
        step = bm.variants("quick", fast, fast, wl, size)["mdm_fast eager"]()
    for _ in range(3):
        step()
    wall = time_ms(step, warmup=0, iters=5)  # unprofiled, host included
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    c = ceilings()
    tally = roofline.count(name, cfg, size, args.kind, args.batch, c.bf16_tflops, c.copy_gbps)
    averages = prof.key_averages()
    kernels = kernel_entries(averages)
    host = [e for e in averages if e.device_type == DeviceType.CPU]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / args.steps / 1e3
    host_ms = sum(e.self_cpu_time_total for e in host) / args.steps / 1e3
    title = f"mdm_fast eager, {args.model} {args.kind} batch {args.batch}, bf16" + (
        ", weights cast once" if args.kind == "forward" else "")
    write_report(f"profile-{args.model.split('x')[0]}-{args.kind}-b{args.batch}", {
        f"GPU time by operator kind against its floor, {title}": markdown_table(
            ["operator kind", "kernels per step", "ms per step", "floor ms", "floor / ms", "ms over floor"],
            against_floor(by_kind(prof.events(), args.steps, kernels), tally.floor_ms, kernel_ms))
        + "\n\n" + FLOOR_NOTE,
        f"Top kernels, {title}": markdown_table(["kernel", "calls per step", "ms per step", "share"],
                                                _top(kernels, "self_device_time_total", args.steps, args.top)),
        f"Top operators by host time, {title}": markdown_table(
            ["operator", "calls per step", "self CPU ms per step", "share"],
            _top(host, "self_cpu_time_total", args.steps, args.top)),
        "Total": f"{kernel_ms:.2f} ms of kernel time per step; {wall:.2f} ms wall per step unprofiled "
                 f"(host included); {host_ms:.2f} ms of self CPU time in profiled operators per step "
                 "(profiling overhead included)."}, args.out,
        timing="Kernel times summed by the PyTorch profiler (CUPTI); host times are its CPU self times.")


def kernel_entries(averages) -> list:
    """The kernels (and device copies and fills) of ``prof.key_averages()``: device entries, less the GPU
    spans of record_function ranges (``Optimizer.step#AdamW.step`` around every optimiser step), which
    would count their kernels again."""
    return [e for e in averages if e.device_type != DeviceType.CPU and not e.is_user_annotation]


def by_kind(events: Sequence, steps: int, kernels: Sequence = ()) -> Dict[str, Tuple[float, float]]:
    """kind -> (kernels per step, ms per step) over a profile's events (``prof.events()``): every kernel
    once, under the kind (:func:`benchmarks.roofline.kind_of`) of the outermost operator above its launch
    that has one, else ``roofline.OTHER``. ``kernels``: the profile's kernel entries (:func:`kernel_entries`);
    of those that are mdm_fast's Triton kernels, the calls no operator holds go to their op's kind
    (:func:`benchmarks.roofline.triton_kernel_kinds`)."""
    out: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    held: Dict[str, List[float]] = collections.defaultdict(lambda: [0, 0.0])  # kernel name -> calls, us
    for e in events:
        if not e.kernels:
            continue
        chain = []  # the launching operator and its callers, innermost first
        caller = e
        while caller is not None:
            chain.append(caller.name)
            caller = caller.cpu_parent
        kind = next((k for k in map(roofline.kind_of, reversed(chain)) if k), roofline.OTHER)
        out[kind][0] += len(e.kernels) / steps
        out[kind][1] += sum(k.duration for k in e.kernels) / steps / 1e3  # us -> ms
        for k in e.kernels:
            held[k.name][0] += 1
            held[k.name][1] += k.duration
    triton_kinds = roofline.triton_kernel_kinds()
    for entry in kernels:
        kind = triton_kinds.get(entry.key)
        calls, us = entry.count - held[entry.key][0], entry.self_device_time_total - held[entry.key][1]
        if kind is not None and calls > 0:
            out[kind][0] += calls / steps
            out[kind][1] += us / steps / 1e3
    return {k: (n, ms) for k, (n, ms) in out.items()}


def against_floor(measured: Dict[str, Tuple[float, float]], floor_ms: Dict[str, float],
                  kernel_ms: float = 0.0) -> List[list]:
    """Rows (kind, kernels per step, ms, floor ms, floor / ms, ms over floor), the most ms over floor
    first, kinds the step did not run last, and a total over the kinds it ran. ``kernel_ms``: all kernel
    time per step; what of it no kind holds (over 1 us) is a row of its own (UNFILED)."""
    unfiled = kernel_ms - sum(ms for _, ms in measured.values())
    if unfiled > 1e-3:
        measured = {**measured, UNFILED: (0, unfiled)}
    rows = []
    for kind in sorted(set(measured) | set(floor_ms)):
        n, ms = measured.get(kind, (0, math.nan))
        floor = floor_ms.get(kind, 0.0)
        rows.append([kind, round(n), ms, floor, _percent(floor, ms), ms - floor])
    ran = [r for r in rows if not math.isnan(r[2])]
    rows.sort(key=lambda r: (math.isnan(r[5]), -r[5] if not math.isnan(r[5]) else 0.0))
    ms, floor = sum(r[2] for r in ran), sum(r[3] for r in ran)
    return rows + [["total (the kinds run)", sum(r[1] for r in ran), ms, floor, _percent(floor, ms), ms - floor]]


def _percent(part: float, whole: float) -> str:
    """part / whole as a whole percentage; '-' where whole is not positive (or NaN: nothing measured)."""
    return f"{100 * part / whole:.0f}%" if whole > 0 else "-"


def _top(events, attr: str, steps: int, top: int):
    """Rows (name, calls per step, ms per step, share) of the events with the most ``attr``."""
    events = [e for e in events if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [[e.key[:90], e.count // steps, getattr(e, attr) / steps / 1e3, f"{100 * getattr(e, attr) / total:.1f}%"]
            for e in events[:top]]


if __name__ == "__main__":
    main()
