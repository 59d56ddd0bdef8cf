"""Compile a step's Triton kernels in parallel, before the step first runs.

A fresh process compiles every Triton kernel specialisation the first time it launches, one after
the other: the 256x256 model's first forward at batch 2 launches 35 of them (group norm at each
level's shape, the upsample-conv's autotune configs), about 1.5 s each on a 2-core machine (52.6 s in
all), which is most of the time from process start to the first step. :func:`precompile` runs the step once with every not yet compiled
launch *skipped* (Triton's ``jit_cache_hook``), compiles what it collected in a pool of worker
processes into Triton's on-disk cache (with each one's launcher stub on a GPU), and returns; the step's
first real run then loads each kernel from the cache in milliseconds.

The dry run's skipped kernels write nothing, so its values are garbage: ``fn`` must have no effect
but its outputs (a forward under ``no_grad``, or a loss and ``torch.autograd.grad`` without an
optimizer step, see :func:`precompile_training`); the random number generators are restored after
it, so precompiling does not change what the run computes. A dry run that raises is reported as a
warning and skipped: the real step then compiles as usual (and raises its own errors). Autotuned kernels compile every config in
the pool and are benchmarked for real at their first real launch.

Workers are fresh interpreters (``python -c`` running :func:`_worker_main`, jobs on stdin) that target the
parent's GPU without touching it (:class:`CompileOnlyDriver`: no CUDA context); a kernel defined in the
caller's ``__main__`` script cannot be imported there and compiles at its first launch as usual.
``MDM_FAST_PRECOMPILE=0`` turns :func:`precompile` into a no-op.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from triton.backends.driver import DriverBase

_ENV = "MDM_FAST_PRECOMPILE"
MAX_WORKERS = 16
log = logging.getLogger(__name__)


@dataclass
class PrecompileStats:
    kernels: int  # specialisations collected by the dry run (compiled, or found in the disk cache)
    dry_run_s: float
    compile_s: float  # wall time of the parallel compilation
    workers: int
    failed_workers: int = 0

    def __str__(self) -> str:
        failed = f", {self.failed_workers} workers failed" if self.failed_workers else ""
        return (f"{self.kernels} Triton kernels compiled by {self.workers} workers in {self.compile_s:.1f} s "
                f"(dry run {self.dry_run_s:.1f} s{failed})")


# ---- a driver that compiles for a GPU without using it -------------------------------------------


class CompileOnlyDriver(DriverBase):
    """A Triton driver that compiles for ``GPUTarget("cuda", arch, warp_size)`` and never launches:
    launches call ``on_launch(name, metadata, grid)`` (if given) instead."""

    def __init__(self, arch: int = 90, warp_size: int = 32, on_launch: Optional[Callable] = None,
                 max_shared_mem: int = 227 * 1024, sms: int = 132):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, warp_size)
        self.on_launch = on_launch
        self.utils = _Utils(max_shared_mem, sms)

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("a compile-only driver builds no launchers")

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        def bench(fn, **kwargs):  # the autotuner "times" each config: compile it, report the same time
            fn()
            return 1.0

        return bench

    def launcher_cls(self, src, metadata):
        def launch(gx, gy, gz, *args):
            if self.on_launch is not None:
                self.on_launch(metadata.name, metadata, (gx, gy, gz))

        return launch


class _Utils:
    def __init__(self, max_shared_mem: int, sms: int):
        self.props = {"max_shared_mem": max_shared_mem, "multiprocessor_count": sms}

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024

    def get_device_properties(self, device):
        return self.props


# ---- the dry run ---------------------------------------------------------------------------------


Job = Tuple[str, str, str]  # (module, qualified name, Triton's serialized specialisation)


@contextlib.contextmanager
def _skipping_compiles(jobs: List[Job]) -> Iterator[None]:
    """Inside: every Triton launch that would compile is recorded in ``jobs`` and skipped."""
    from triton import knobs

    def hook(*, fn, compile, **kwargs):
        jit = fn.jit_function
        jobs.append((jit.fn.__module__, jit.fn.__qualname__, compile["specialization_data"]))
        return True  # skip: no compilation, no launch

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = previous


def _forget_autotuning(jobs: Sequence[Job]) -> None:
    """Drop the configs the autotuners 'chose' from the dry run's empty timings."""
    from triton.runtime.autotuner import Autotuner

    for module, qualname, _ in jobs:
        obj = getattr(importlib.import_module(module), qualname, None)
        while obj is not None:  # the module attribute may wrap the kernel: autotuner, heuristics
            if isinstance(obj, Autotuner):
                obj.cache.clear()
            obj = getattr(obj, "fn", None)


def _compile_jobs(jobs: Sequence[Job], arch: int, warp_size: int, launcher: Optional[str] = None) -> None:
    """In a worker: compile specialisations into Triton's disk cache (no GPU, no CUDA context), and with
    ``launcher`` ("module:class", the parent's driver's launcher) build each one's launcher too."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(CompileOnlyDriver(arch, warp_size))  # never driver.active: no GPU probe, no context
    launcher_cls = None
    if launcher is not None:
        module, name = launcher.split(":")
        launcher_cls = getattr(importlib.import_module(module), name)
    for module, qualname, data in jobs:
        obj = getattr(importlib.import_module(module), qualname)
        while not isinstance(obj, JITFunction):
            obj = obj.fn  # autotuner / heuristics wrappers
        kernel = obj.preload(data)
        if launcher_cls is not None:  # a C stub per argument signature, compiled into the same cache
            launcher_cls(kernel.src, kernel.metadata)


def _launcher() -> Optional[str]:
    """The active driver's launcher class as "module:class" (NVIDIA's builds a C stub per kernel signature
    at its first launch, ~1 s of gcc, into Triton's cache); None for the compile-only driver."""
    from triton.runtime import driver

    cls = driver.active.launcher_cls
    return f"{cls.__module__}:{cls.__qualname__}" if isinstance(cls, type) else None


_WORKER = "from mdm_fast.engine.precompile import _worker_main; _worker_main()"


def _run_workers(jobs: Sequence[Job], workers: int, arch: int, warp_size: int, launcher: Optional[str]) -> int:
    """Compile ``jobs`` in ``workers`` fresh interpreters (:func:`_worker_main`, jobs on stdin): no fork
    of a process holding a CUDA context, no re-import of the caller's main script.
    Returns how many workers failed (their kernels then compile at their first launch, as without this)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    procs = []
    for w in range(workers):
        payload = json.dumps({"arch": arch, "warp_size": warp_size, "launcher": launcher,
                              "jobs": list(jobs[w::workers])})
        proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, text=True)
        proc.stdin.write(payload)
        proc.stdin.close()
        procs.append(proc)
    failed = 0
    for proc in procs:
        err = proc.stderr.read()
        if proc.wait() != 0:
            failed += 1
            log.warning("precompile worker failed (its kernels compile at first launch instead):\n%s", err[-2000:])
    return failed


def _target() -> Tuple[int, int]:
    from triton.runtime import driver

    t = driver.active.get_current_target()
    return int(t.arch), int(t.warp_size)


def _enabled() -> bool:
    return os.environ.get(_ENV, "1") != "0"


def precompile(fn: Callable, *args, workers: Optional[int] = None, **kwargs) -> Optional[PrecompileStats]:
    """Run ``fn(*args, **kwargs)`` dry and compile the Triton kernels it would compile, in parallel.

    ``fn`` must have no effect but its outputs (see the module notes); its result is discarded. Returns
    what was done, or None when disabled (``MDM_FAST_PRECOMPILE=0``) or the dry run failed. Under
    Triton's CPU interpreter nothing is compiled (the interpreter does not compile).
    """
    if not _enabled():
        return None
    jobs: List[Job] = []
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            with _skipping_compiles(jobs):
                fn(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    except Exception as e:  # an optimisation only: the real step will compile (and fail) on its own
        log.warning("precompile: the dry run failed (%s: %s); kernels compile at their first launch",
                    type(e).__name__, e)
        return None
    finally:
        _forget_autotuning(jobs)
    dry = time.perf_counter() - t0
    # a kernel defined in the caller's main script cannot be imported by a worker: it compiles at launch
    unique = [j for j in dict.fromkeys(jobs) if j[0] != "__main__"]
    # each worker pays an interpreter start and a torch import (~2-3 s): give each a few kernels
    n = workers or min(os.cpu_count() or 1, MAX_WORKERS, -(-len(unique) // 2))
    n = max(1, min(n, len(unique)))
    t1 = time.perf_counter()
    failed = _run_workers(unique, n, *_target(), _launcher()) if unique else 0
    return PrecompileStats(len(unique), dry, time.perf_counter() - t1, n, failed)


def precompile_training(loss_fn: Callable, params: Sequence[torch.Tensor], *args,
                        workers: Optional[int] = None, **kwargs) -> Optional[PrecompileStats]:
    """:func:`precompile` of a training step's forward and backward: ``loss_fn(*args, **kwargs)`` and its
    gradients with respect to ``params`` through ``torch.autograd.grad`` (nothing is accumulated into
    ``.grad`` and no optimizer runs, so the model and optimizer are untouched)."""
    params = [p for p in params if p.requires_grad]

    def step():
        with torch.enable_grad():
            loss = loss_fn(*args, **kwargs)
            return torch.autograd.grad(loss, params, allow_unused=True) if params and loss.requires_grad else loss

    return precompile(step, workers=workers)


def _worker_main() -> None:
    """A worker of :func:`_run_workers`: its jobs, target and warp size come as JSON on stdin."""
    task = json.loads(sys.stdin.read())
    _compile_jobs([tuple(j) for j in task["jobs"]], task["arch"], task["warp_size"], task["launcher"])
