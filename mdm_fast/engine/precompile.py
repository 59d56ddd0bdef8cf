"""Compile a step's Triton kernels in parallel, before the step first runs.

A fresh process compiles every Triton kernel specialisation the first time it launches, one after
the other: the 256x256 model's first forward at batch 2 launches 35 of them (group norm at each
level's shape, the upsample-conv's autotune configs), about 1.5 s each on a 2-core machine (52.6 s in
all), which is most of the time from process start to the first step. :func:`precompile` runs the
step once with every not yet compiled launch *skipped* (Triton's ``jit_cache_hook``); a pool of
worker processes compiles each kernel it finds into Triton's on-disk cache (with its launcher stub on
a GPU) while the dry run goes on, and :func:`precompile` returns when the last one is done; the
step's first real run then loads each kernel from the cache in milliseconds.

The dry run's skipped kernels write nothing, so its values are garbage: ``fn`` must have no effect
but its outputs (a forward under ``no_grad``, or a loss and ``torch.autograd.grad`` without an
optimizer step, see :func:`precompile_training`); the random number generators are restored after
it, so precompiling does not change what the run computes. A dry run that raises is reported as a
warning and skipped: the real step then compiles as usual (and raises its own errors). Autotuned
kernels compile every config in the pool and are benchmarked for real at their first real launch.

Workers are fresh interpreters (``python -c`` running :func:`_worker_main`, one job a line on stdin)
that target the parent's GPU without touching it (:class:`CompileOnlyDriver`: no CUDA context); a
kernel defined in the caller's ``__main__`` script cannot be imported there and compiles at its
first launch as usual. ``MDM_FAST_PRECOMPILE=0`` turns :func:`precompile` into a no-op.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
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
    dry_run_s: float  # the workers compile during it
    wait_s: float  # from the end of the dry run until the last worker finished
    workers: int
    failed_workers: int = 0

    def __str__(self) -> str:
        failed = f", {self.failed_workers} workers failed" if self.failed_workers else ""
        return (f"{self.kernels} Triton kernels compiled by {self.workers} workers during a {self.dry_run_s:.1f} s "
                f"dry run and {self.wait_s:.1f} s after it{failed}")


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
        def bench(fn, quantiles=None, **kwargs):  # the autotuner "times" each config: compile it, report the
            fn()  # same time, in the form of its failed configs' (a list when it asks for quantiles)
            return 1.0 if quantiles is None else [1.0] * len(quantiles)

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
def _skipping_compiles(jobs: List[Job], on_new: Optional[Callable[[Job], None]] = None) -> Iterator[None]:
    """Inside: every Triton launch that would compile is recorded in ``jobs`` and skipped; ``on_new`` gets
    each specialisation the first time it is seen."""
    from triton import knobs

    def hook(*, fn, compile, **kwargs):
        jit = fn.jit_function
        job = (jit.fn.__module__, jit.fn.__qualname__, compile["specialization_data"])
        if on_new is not None and job not in jobs:
            on_new(job)
        jobs.append(job)
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


class _Pool:
    """Fresh interpreters (:func:`_worker_main`) that compile jobs while the dry run is still finding
    them: no fork of a process holding a CUDA context, no re-import of the caller's main script. A
    worker starts for every ``per_worker`` jobs submitted, up to ``workers`` (each pays an interpreter
    start and a torch import, ~2-3 s, which the dry run hides); an idle worker takes the next job. A
    worker that fails stops taking jobs: what it had not compiled compiles at its first launch, as
    without precompiling."""

    def __init__(self, workers: int, per_worker: int = 2):
        self.workers, self.per_worker = workers, per_worker
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.procs: List[Tuple[subprocess.Popen, threading.Thread, "tempfile._TemporaryFileWrapper"]] = []
        self.submitted = 0
        self.header: Optional[str] = None  # the target, read from the parent's driver at the first job

    def submit(self, job: Job) -> None:
        if self.header is None:
            arch, warp_size = _target()
            self.header = json.dumps({"arch": arch, "warp_size": warp_size, "launcher": _launcher()})
        self.submitted += 1
        if len(self.procs) < min(self.workers, -(-self.submitted // self.per_worker)):
            self._start()
        self.jobs.put(job)

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        err = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty worker cannot block on it
        proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, env=env, text=True)
        feeder = threading.Thread(target=self._feed, args=(proc,), daemon=True)
        feeder.start()
        self.procs.append((proc, feeder, err))

    def _feed(self, proc: subprocess.Popen) -> None:
        """Hand ``proc`` one job at a time, the next when it reports the last one done."""
        try:
            proc.stdin.write(self.header + "\n")
            for job in iter(self.jobs.get, None):
                proc.stdin.write(json.dumps(job) + "\n")
                proc.stdin.flush()
                if not proc.stdout.readline():  # the worker died: its job compiles at first launch
                    return
            proc.stdin.close()
        except OSError:  # a broken pipe: the worker died
            pass

    def close(self) -> Tuple[int, int]:
        """Wait until every submitted job is compiled; (workers started, workers failed)."""
        for _ in self.procs:
            self.jobs.put(None)
        failed = 0
        for proc, feeder, err in self.procs:
            feeder.join()
            if proc.wait() != 0:
                failed += 1
                err.seek(0)
                log.warning("precompile worker failed (its kernels compile at first launch instead):\n%s",
                            err.read()[-2000:])
            err.close()
        return len(self.procs), failed

    def kill(self) -> None:
        for _ in self.procs:  # the feeders waiting for a job end too
            self.jobs.put(None)
        for proc, _, err in self.procs:
            proc.kill()
            proc.wait()
            err.close()


def _target() -> Tuple[int, int]:
    from triton.runtime import driver

    t = driver.active.get_current_target()
    return int(t.arch), int(t.warp_size)


def _enabled() -> bool:
    return os.environ.get(_ENV, "1") != "0"


def default_workers() -> int:
    """One worker per CPU this process may run on, at most MAX_WORKERS; where it may run on all of the
    machine's, its share of them among the node's torchrun processes (LOCAL_WORLD_SIZE), which all
    precompile at once: 8 ranks of 16 workers each would start 128 interpreters on one host."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus == os.cpu_count():  # not pinned to a share already (numactl, a launcher's binding)
        cpus //= max(int(os.environ.get("LOCAL_WORLD_SIZE") or 1), 1)
    return max(1, min(cpus, MAX_WORKERS))


def precompile(fn: Callable, *args, workers: Optional[int] = None, **kwargs) -> Optional[PrecompileStats]:
    """Run ``fn(*args, **kwargs)`` dry and compile the Triton kernels it would compile, in parallel, each
    from the moment the dry run finds it (the dry run's first CUDA library calls, seconds on a GPU,
    hide the workers' start and most of the compilation).

    ``fn`` must have no effect but its outputs (see the module notes); its result is discarded. Returns
    what was done, or None when disabled (``MDM_FAST_PRECOMPILE=0``) or the dry run failed. Under
    Triton's CPU interpreter nothing is compiled (the interpreter does not compile).
    """
    if not _enabled():
        return None
    jobs: List[Job] = []
    pool = _Pool(workers or default_workers())

    def submit(job: Job) -> None:
        if job[0] != "__main__":  # a kernel of the caller's main script cannot be imported by a worker
            pool.submit(job)

    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            with _skipping_compiles(jobs, submit):
                fn(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    except Exception as e:  # an optimisation only: the real step will compile (and fail) on its own
        pool.kill()
        log.warning("precompile: the dry run failed (%s: %s); kernels compile at their first launch",
                    type(e).__name__, e)
        return None
    finally:
        _forget_autotuning(jobs)
    dry = time.perf_counter() - t0
    started, failed = pool.close()
    return PrecompileStats(pool.submitted, dry, time.perf_counter() - t0 - dry, started, failed)


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
    """A worker of :class:`_Pool`: the target on stdin's first line, then one job a line; "done" on stdout
    after each. Whatever compiling prints goes to stderr, so stdout carries the replies only."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    target = json.loads(sys.stdin.readline())
    for line in sys.stdin:
        _compile_jobs([tuple(json.loads(line))], target["arch"], target["warp_size"], target["launcher"])
        print("done", file=reply, flush=True)
