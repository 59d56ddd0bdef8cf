"""CUDA-graph runners: capture a step once per input signature, then replay it.

:class:`GraphedCallable` captures any function of tensors (nested lists/tuples allowed) into a CUDA
graph per input signature (shapes, dtypes, devices, and where the Nones are), with static input
buffers that each call copies into. The sampler's whole step (every resolution, guidance, the
sampler update) runs through it via ``Sampler.steps(..., step_fn=...)``: see :func:`graphed_sampler_step`.

:class:`GraphedTrainStep` captures forward + backward + optimizer step of a training step as one graph
(a fixed learning rate, a capturable optimizer: the benchmarks' loop); ``mdm-fast train`` instead replays
graphs of its micro-steps and updates eagerly (:class:`mdm_fast.train.graphed_step.GraphedMicroSteps`:
learning-rate schedule, accumulation, DDP, device-side skips).

Without CUDA (or with ``capture=False``) both run the same static-buffer logic eagerly, so it is
testable on a CPU.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

log = logging.getLogger(__name__)


_SIDE_STREAMS: Dict[int, "torch.cuda.Stream"] = {}


def capture_stream() -> "torch.cuda.Stream":
    """One side stream per device for the eager work before a capture and for the capture itself: a
    DDP wrapper built there, its warm-ups and its captured backward then share one stream (autograd
    otherwise synchronises the gradient accumulators' stream with the backward's)."""
    device = torch.cuda.current_device()
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream()
    return _SIDE_STREAMS[device]


@contextlib.contextmanager
def side_stream() -> Iterator[None]:
    """Run the block on :func:`capture_stream`, ordered after the current stream, which then waits for
    it: PyTorch's recipe for the eager work that precedes a capture (warm-up runs, building DDP)."""
    side = capture_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def end_generator_captures(generators: Sequence[torch.Generator]) -> None:
    """Take ``generators`` (and the default CUDA generator) out of capture mode after a failed capture.

    PyTorch ends a generator's capture only when the capture succeeds; after a failure every later
    draw from it, and every replay of a graph that registered it, fails with "Offset increment outside
    graph capture encountered unexpectedly". A one-kernel capture that registers the same generators
    and succeeds ends their capture mode (it draws nothing: seeds and offsets stay as they were)."""
    graph = torch.cuda.CUDAGraph()
    for g in generators:
        graph.register_generator_state(g)
    scratch = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
    with torch.cuda.graph(graph, stream=capture_stream()):
        scratch.add_(1)


def _signature(leaves) -> Tuple:
    return tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("const", x)
                 for x in leaves)


@dataclass
class _Entry:
    inputs: List[Any]  # static leaves (tensors are the buffers each call copies into)
    spec: Any
    outputs: Any = None
    graph: Optional[torch.cuda.CUDAGraph] = None


class GraphedCallable:
    """``fn(*args)`` with tensor arguments, replayed from a CUDA graph.

    The first call with a new signature warms ``fn`` up on a side stream (``warmup`` runs, whose
    results are discarded: ``fn`` must not have side effects other than its outputs, or
    ``before_warmup`` / ``after_warmup`` must save and restore what they change), captures it, and
    replays. Outputs are cloned unless ``clone_outputs=False`` (then they are the graph's static
    buffers, overwritten by the next replay).

    ``generators``: the CUDA generators ``fn`` draws from (besides the default one), registered with
    each graph: a replay draws from their current seed and offset and advances them, as an eager call
    would; the warm-up's draws are undone. ``max_graphs``: signatures beyond that many run ``fn``
    eagerly (counted in ``eager_calls``). ``eager_on_error``: a warm-up or capture that raises is
    logged, ``after_warmup`` undoes what it did, and ``fn`` runs eagerly from then on (an error of
    ``fn`` itself then surfaces from that eager call). ``capture=False`` runs ``fn`` eagerly on the
    static buffers (the default on CPU).
    """

    def __init__(self, fn: Callable, warmup: int = 2, capture: Optional[bool] = None, clone_outputs: bool = True,
                 pool=None, generators: Sequence[torch.Generator] = (), before_warmup: Optional[Callable] = None,
                 after_warmup: Optional[Callable] = None, max_graphs: Optional[int] = None,
                 eager_on_error: bool = False):
        self.fn = fn
        self.warmup = warmup
        self.capture = torch.cuda.is_available() if capture is None else capture
        self.clone_outputs = clone_outputs
        self.pool = pool
        self.generators = list(generators)
        self.before_warmup, self.after_warmup = before_warmup, after_warmup
        self.max_graphs = max_graphs
        self.eager_on_error = eager_on_error
        self.eager_calls = 0
        self._entries: Dict[Tuple, _Entry] = {}

    @property
    def num_graphs(self) -> int:
        return len(self._entries)

    def __call__(self, *args):
        leaves, spec = tree_flatten(args)
        key = (str(spec), _signature(leaves))
        entry = self._entries.get(key)
        if entry is None and self.max_graphs is not None and len(self._entries) >= self.max_graphs:
            self.eager_calls += 1
            return self.fn(*args)
        if entry is None:
            entry = self._entries[key] = self._build(leaves, spec)
        else:
            for static, x in zip(entry.inputs, leaves):
                if isinstance(x, torch.Tensor):
                    static.copy_(x)
        if entry.graph is not None:
            entry.graph.replay()
            out = entry.outputs
        else:
            out = self.fn(*tree_unflatten(entry.inputs, entry.spec))
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out) if self.clone_outputs else out

    def _build(self, leaves, spec) -> _Entry:
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        entry = _Entry(static, spec)
        if not self.capture:
            return entry
        args = tree_unflatten(static, spec)
        generators = self.generators + [torch.cuda.default_generators[torch.cuda.current_device()]]
        states = [g.get_state() for g in generators]
        t0 = time.perf_counter()
        try:
            entry.graph, entry.outputs = self._capture(args)
            log.info("captured CUDA graph %d (%d warm-up runs and the capture: %.1f s)", len(self._entries) + 1,
                     self.warmup, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001  (reported, then the same function runs eagerly, or re-raised)
            entry.graph = entry.outputs = None
            self._recover(generators, e)
            if not self.eager_on_error:
                raise
            log.warning("CUDA-graph capture failed (%s: %s); running eagerly from now on", type(e).__name__, e)
            self.capture = False
            if self.after_warmup is not None:
                self.after_warmup()
        finally:
            for g, state in zip(generators, states):  # the first call draws what an eager first call would
                g.set_state(state)
        return entry

    @staticmethod
    def _recover(generators, error: Exception) -> None:
        """After a failed warm-up or capture: the generators usable again (see :func:`end_generator_captures`)."""
        try:
            end_generator_captures(generators)
        except Exception as e:  # noqa: BLE001  (the CUDA context itself is broken: nothing runs on it)
            raise RuntimeError(f"a CUDA-graph capture failed ({type(error).__name__}: {error}) and left the CUDA "
                               "generators unusable; run without graphs (config cuda_graphs: off, or "
                               "mdm-fast sample --cuda-graphs off)") from e

    def _capture(self, args):
        if self.before_warmup is not None:
            self.before_warmup()
        with side_stream():
            for _ in range(self.warmup):
                self.fn(*args)
        if self.after_warmup is not None:
            self.after_warmup()
        graph = torch.cuda.CUDAGraph()
        for g in self.generators:
            graph.register_generator_state(g)
        # thread_local: a data-loader thread pinning memory meanwhile does not invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream(), capture_error_mode="thread_local"):
            outputs = self.fn(*args)
        return graph, outputs


def graphed_sampler_step(sampler, denoise: Callable, capture: Optional[bool] = None, pool=None) -> GraphedCallable:
    """``step_fn`` for ``sampler.steps(denoise, x_t, step_fn=...)``: the whole denoising step of every
    level (model, guidance, sampler update) captured once per batch shape and replayed. ``pool``
    (``torch.cuda.graph_pool_handle()``): a memory pool shared with the captured steps of other samplers
    run one at a time (the batch shapes of one sampling job): a step keeps nothing in the pool between
    replays but its outputs (its inputs are copied into buffers outside it, and outputs are cloned), so
    the pool holds the largest step's activations once rather than each step's."""
    def step(x_t, times, g_t, g_s, noise):
        with torch.no_grad():
            return sampler.step(denoise, x_t, times, g_t, g_s, noise)

    return GraphedCallable(step, capture=capture, eager_on_error=True, pool=pool)


class GraphedTrainStep:
    """forward + backward + optimizer step of ``loss_fn(*batch) -> scalar loss``, as one CUDA graph.

    ``optimizer`` must be an Adam/AdamW with ``capturable=True`` and a tensor learning rate (set it
    with :meth:`set_lr`, which a scheduler's value can feed). Before capture, ``warmup`` steps run
    with the learning rate at 0 and the optimizer's moments are reset afterwards, so the parameters
    are untouched: replay k is training step k. ``max_grad_norm`` clips inside the graph (no host
    sync). Random numbers drawn inside ``loss_fn`` come from the default CUDA generator, advanced at
    every replay. ``capture=False`` runs the same steps eagerly.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                 max_grad_norm: Optional[float] = None, warmup: int = 3, capture: Optional[bool] = None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.max_grad_norm = max_grad_norm
        self.warmup = warmup
        self.capture = torch.cuda.is_available() if capture is None else capture
        if self.capture:
            self._check_optimizer()
        self._static: Optional[List[Any]] = None
        self._spec = None
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._loss: Optional[torch.Tensor] = None

    def _check_optimizer(self) -> None:
        if not isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(f"GraphedTrainStep: expected torch.optim.Adam/AdamW, got {type(self.optimizer).__name__}")
        for group in self.optimizer.param_groups:
            if not group.get("capturable") or not isinstance(group["lr"], torch.Tensor):
                raise ValueError("GraphedTrainStep: the optimizer needs capturable=True and lr=torch.tensor(...) "
                                 "(e.g. AdamW(params, lr=torch.tensor(1e-4, device='cuda'), capturable=True))")

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _step(self) -> torch.Tensor:
        loss = self.loss_fn(*tree_unflatten(self._static, self._spec))
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, *batch) -> torch.Tensor:
        leaves, spec = tree_flatten(batch)
        if self._static is None:
            self._static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
            self._spec = spec
            if self.capture:
                self._capture()
        elif str(spec) != str(self._spec) or _signature(leaves) != _signature(self._static):
            raise ValueError("GraphedTrainStep: every batch must have the shapes, dtypes and devices of the first "
                             f"({_signature(self._static)}), got {_signature(leaves)}")
        for static, x in zip(self._static, leaves):
            if isinstance(x, torch.Tensor):
                static.copy_(x)
        if self._graph is None:
            self.optimizer.zero_grad(set_to_none=True)
            return self._step()
        self._graph.replay()
        return self._loss.clone()

    def _capture(self) -> None:
        lrs = [g["lr"].clone() for g in self.optimizer.param_groups]
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        rng = generator.get_state()
        self.set_lr(0.0)
        with side_stream():
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        generator.set_state(rng)  # the first replay draws what an eager first step would
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"].copy_(lr)
        self._reset_optimizer_state()
        self.optimizer.zero_grad(set_to_none=True)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, stream=capture_stream()):
            self._loss = self._step()

    def _reset_optimizer_state(self) -> None:
        """Undo the warm-up's effect on the moments and step counts (the parameters did not move)."""
        for state in self.optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    v.zero_()
