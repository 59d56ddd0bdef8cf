"""Shared pieces of the benchmark suites: timing, the card's measured ceilings, markdown tables.

Every suite measures its variants side by side in one process and reports ratios, plus GB/s or
TFLOP/s against the ceilings measured on the same card in the same run (never datasheet values).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import hashlib
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from mdm_fast.files import write_text_atomic as write_atomic  # tables: temp file, fsync, rename

RESULTS = Path(__file__).parent / "results"


def card_name() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name()


def card_slug() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", card_name()).strip("-").lower()


def time_ms(fn: Callable[[], object], warmup: int = 5, iters: int = 20) -> float:
    """Median wall milliseconds per call of ``fn`` on an idle GPU: host overhead (Python, dispatch,
    launches) included, as an eager user sees it (CUDA events; the host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def knob(module, name: str, value) -> Iterator[None]:
    """``module.name = value`` inside the block, the previous value restored after: a tuning constant
    or formulation switch, timed side by side with its default."""
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


_FLUSH_BYTES = 256 << 20  # larger than any current L2 (H100/H200: 50 MB)
_SPIN_MS = 2.0  # longer than the host needs to enqueue one op's kernels


@functools.lru_cache(maxsize=None)
def _spin_cycles_per_ms() -> float:
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def device_ms(fn: Callable[[], object], warmup: int = 5, iters: int = 20) -> float:
    """Median GPU milliseconds of the kernels ``fn`` launches, without host overhead, with a cold L2.

    Before each timed call a spin kernel and a 256 MB fill are queued: while the GPU works through
    them the host enqueues the start event, ``fn``'s kernels and the end event, so the events see
    back-to-back kernels (the figure a CUDA graph replays at), and the fill evicts the inputs from L2
    (bandwidth is measured from DRAM, as for tensors larger than L2). On CPU: :func:`time_ms`.
    """
    if not torch.cuda.is_available():
        return time_ms(fn, warmup, iters)
    for _ in range(warmup):
        fn()
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    spin = int(_spin_cycles_per_ms() * _SPIN_MS)
    times: List[float] = []
    torch.cuda.synchronize()
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(spin)
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# Every Triton compilation of this process once record_triton_compiles() ran: (kernel name, seconds, kernel).
# Loads from Triton's disk cache pass through here too (in milliseconds).
TRITON_COMPILES: List[Tuple[str, float, object]] = []


def record_triton_compiles() -> List[Tuple[str, float, object]]:
    """Start recording Triton compilations into TRITON_COMPILES (idempotent). Call it before the first
    launch: each kernel looks ``triton.compiler.compile`` up when it first runs on a device."""
    import triton.compiler as tc

    if getattr(tc.compile, "_recorded", False):
        return TRITON_COMPILES
    original = tc.compile

    def compile(src, target=None, options=None, **kwargs):
        t0 = time.perf_counter()
        kernel = original(src, target=target, options=options, **kwargs)
        TRITON_COMPILES.append((kernel.metadata.name, time.perf_counter() - t0, kernel))
        return kernel

    compile._recorded = True
    tc.compile = compile
    return TRITON_COMPILES


@dataclass
class Ceilings:
    copy_gbps: float  # device-to-device copy, bytes read + written
    bf16_tflops: float  # large bf16 matmul


_CEILINGS: Optional[Ceilings] = None


def ceilings() -> Ceilings:
    """Measure (once per process) the copy bandwidth and bf16 matmul rate of this card."""
    global _CEILINGS
    if _CEILINGS is not None:
        return _CEILINGS
    if not torch.cuda.is_available():
        _CEILINGS = Ceilings(float("nan"), float("nan"))
        return _CEILINGS
    n = 1 << 30  # 1 GiB, far above L2
    buffers = [torch.empty(n, dtype=torch.uint8, device="cuda").random_(), torch.empty(n, dtype=torch.uint8,
                                                                                  device="cuda")]
    ms = device_ms(lambda: buffers[1].copy_(buffers[0]), warmup=3, iters=10)
    copy = 2 * n / ms / 1e6
    buffers.clear()
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = device_ms(lambda: a @ b, warmup=3, iters=10)
    tflops = 2 * m**3 / ms / 1e9
    _CEILINGS = Ceilings(copy, tflops)
    return _CEILINGS


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v != v:  # nan
                return "-"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


DEVICE_TIMES = ("Times are medians of GPU time (CUDA events around back-to-back kernels, host overhead hidden "
                "behind a queued spin kernel, L2 flushed before each call).")
WALL_TIMES = "Times are medians of wall time per call (CUDA events on an idle GPU, host overhead included)."


def source_fingerprint() -> str:
    """8 hex digits of a hash of mdm_fast's and the benchmarks' Python sources: names the code that ran
    where git cannot (a copied tree whose .git is stale); ``python -c "from benchmarks.common import
    source_fingerprint as f; print(f())"`` at a commit gives that commit's."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted([*root.glob("mdm_fast/**/*.py"), *root.glob("benchmarks/*.py")]):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:8]


def revision() -> str:
    """The mdm_fast commit the numbers come from (+ "with local changes" if the tree differs from it), and
    the sources' fingerprint."""
    root = Path(__file__).resolve().parents[1]
    fingerprint = f"sources {source_fingerprint()}"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"an unknown commit ({fingerprint})"
    return f"commit {sha}" + (" with local changes" if dirty else "") + f" ({fingerprint})"


def report_head(suite: str, timing: str = DEVICE_TIMES) -> str:
    """A table file's header: the card, the time, mdm_fast's commit, torch and CUDA, the ceilings measured
    in this run and how ``timing`` was taken."""
    c = ceilings()
    return (f"# {suite} on {card_name()}\n\nMeasured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"mdm_fast at {revision()}, torch {torch.__version__}"
            + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")
            + f". Ceilings measured in the same run: copy {c.copy_gbps:.0f} GB/s (read + write), "
            f"bf16 matmul {c.bf16_tflops:.0f} TFLOP/s. {timing}\n\n")


def write_report(suite: str, sections: Dict[str, str], out_dir: Optional[Path] = None,
                 timing: str = DEVICE_TIMES, echo: bool = True) -> Path:
    """Write ``<out_dir>/<suite>-<card>.md`` with a header naming the card, versions, ceilings and timing
    (and print it, with ``echo``)."""
    out_dir = Path(out_dir or os.environ.get("MDM_FAST_BENCH_OUT", RESULTS))
    body = []
    for title, table in sections.items():
        body += [f"## {title}", "", table, ""]
    path = write_atomic(out_dir / f"{suite}-{card_slug()}.md", report_head(suite, timing) + "\n".join(body))
    if echo:
        print(path.read_text())
    return path


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--suite", choices=["quick", "full"], default="quick")
    p.add_argument("--out", type=Path, default=None, help="folder for the markdown table")
    return p
