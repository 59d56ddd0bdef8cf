"""Backend selection for the fused ops.

Every op has backends ``ref`` (PyTorch, always available), ``triton`` and ``cuda`` (the compiled
``mdm_fast._C`` extension). Each backend of each op registers a *reason function*: given the
op's arguments it returns ``None`` when the backend can run them, or a short sentence saying
why it cannot. ``impl="auto"`` picks the first runnable backend in the op's preference order (Triton's CPU
interpreter only runs when asked for by name);
an explicitly requested backend that cannot run raises :class:`BackendUnavailable` with the
reason. The choice is overridden globally by ``MDM_FAST_IMPL`` or :func:`use_impl`.

Resolution happens in Python *before* the custom op is called, and the concrete backend name
is passed to the op as a string argument, so ``torch.compile`` and CUDA graphs see one fixed
kernel per call site.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

BACKENDS = ("ref", "triton", "cuda", "sdpa", "torch", "flash_attn", "xformers")
# sdpa: PyTorch scaled_dot_product_attention (attention); torch: a faster pure-PyTorch formulation
# (cuDNN does the work, e.g. the sub-pixel upsample-conv as one transposed conv); flash_attn, xformers:
# those libraries' attention kernels, where they are installed (attention)
_ENV_VAR = "MDM_FAST_IMPL"

ReasonFn = Callable[..., Optional[str]]


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


@dataclass
class OpBackends:
    name: str
    preference: Union[List[str], Callable[..., Sequence[str]]]  # auto order, best first (or per inputs)
    reasons: Dict[str, ReasonFn] = field(default_factory=dict)

    def order(self, *args, **kwargs) -> Sequence[str]:
        return self.preference(*args, **kwargs) if callable(self.preference) else self.preference


_REGISTRY: Dict[str, OpBackends] = {}
_local = threading.local()


def register(op_name: str, reasons: Dict[str, ReasonFn],
             preference: Union[Sequence[str], Callable[..., Sequence[str]]]) -> None:
    """Declare the backends of ``op_name``: a reason function per backend, and the auto order, or
    a function of the op's arguments giving it (where the fastest backend depends on the shape)."""
    for b in reasons:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r} for op {op_name}; expected one of {BACKENDS}")
    if "ref" not in reasons:
        raise ValueError(f"op {op_name} must have a 'ref' backend")
    _REGISTRY[op_name] = OpBackends(op_name, preference if callable(preference) else list(preference),
                                    dict(reasons))


def registered_ops() -> Dict[str, OpBackends]:
    return dict(_REGISTRY)


def _check_name(impl: str, source: str = "impl") -> str:
    if impl != "auto" and impl not in BACKENDS:
        raise ValueError(f"{source} must be 'auto' or one of {BACKENDS}, got {impl!r}")
    return impl


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Force ``impl`` for every op this thread calls inside the block (``"auto"`` restores automatic
    choice); other threads, started inside it or not, keep theirs (``MDM_FAST_IMPL`` sets every thread's)."""
    _check_name(impl)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(impl)
    try:
        yield
    finally:
        stack.pop()


def requested_impl(impl: str = "auto") -> str:
    """The backend asked for: the call's ``impl``, else :func:`use_impl`, else ``MDM_FAST_IMPL``."""
    _check_name(impl)
    if impl != "auto":
        return impl
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto"
    return _check_name(env, f"the environment variable {_ENV_VAR}")


def why_not(op_name: str, backend: str, *args, **kwargs) -> Optional[str]:
    """None if ``backend`` can run ``op_name`` on these arguments, else the reason."""
    op = _REGISTRY[op_name]
    fn = op.reasons.get(backend)
    if fn is None:
        return f"op {op_name} has no {backend} backend"
    return fn(*args, **kwargs)


def impl_for(op_name: str, impl: str) -> str:
    """``impl`` if ``op_name`` has that backend, else "auto": a model-wide preference (say "triton")
    applies to the ops that have it and leaves the others to automatic choice."""
    _check_name(impl)
    return impl if impl in _REGISTRY[op_name].reasons else "auto"


def resolve(op_name: str, impl: str, *args, **kwargs) -> str:
    """The concrete backend that will run ``op_name`` on these arguments. A global request
    (:func:`use_impl`, ``MDM_FAST_IMPL``) is a preference as :func:`impl_for` makes it: ops without that
    backend choose automatically; an op that has it but cannot run these inputs raises, saying why. An
    empty input runs the ref backend, whatever was asked."""
    op = _REGISTRY[op_name]
    want = requested_impl(impl)  # a bad name raises, empty input or not
    if _empty(args):  # nothing to compute (a mixed batch's empty top level): PyTorch's ops take empty tensors
        return "ref"
    if impl == "auto" and want != "auto":
        want = impl_for(op_name, want)
    if want != "auto":
        reason = why_not(op_name, want, *args, **kwargs)
        if reason is not None:
            raise BackendUnavailable(f"{op_name}: backend {want!r} cannot run: {reason}")
        return want
    for backend in op.order(*args, **kwargs):
        if backend == "triton" and _on_interpreter(args, kwargs):
            continue  # the interpreter is for testing kernels: it runs only when asked for by name
        if backend in op.reasons and why_not(op_name, backend, *args, **kwargs) is None:
            return backend
    return "ref"


def _empty(args) -> bool:
    """The first tensor argument has no elements (an op's input, or its batch's per-sample values)."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return first is not None and first.numel() == 0


def _on_interpreter(args, kwargs) -> bool:
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    return triton_interpreting() and not any(t.device.type == "cuda" for t in tensors)


# ---- common reasons shared by the ops ------------------------------------------------------


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the PyTorch backends sum and normalise in: fp32, or fp64 for fp64 (a float64 model stays float64
    throughout). A plain branch: torch.promote_types would dispatch an op the roofline counts."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_interpreting() -> bool:
    """TRITON_INTERPRET read as triton reads it: 1, true, on, yes or y, in any case."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # ~90 us while triton is not imported yet


def triton_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if not _triton_installed():
        return "the triton package is not installed"
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and triton_interpreting():
            continue
        return (f"tensor on {t.device.type} (triton needs CUDA, or CPU with TRITON_INTERPRET=1 "
                "set before triton is imported)")
    return None


def cuda_ext_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """The compiled extension runs CUDA tensors once ``mdm_fast._C`` is built."""
    from mdm_fast import _ext

    if _ext.ext is None:
        return f"the CUDA extension mdm_fast._C is not built ({_ext.load_error})"
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            return f"tensor on {t.device.type} (the cuda backend needs CUDA tensors)"
    return None


def package_reason(package: str, *tensors: Optional[torch.Tensor]) -> Optional[str]:
    """A third-party CUDA library backend: the package must import and the tensors be on CUDA."""
    if importlib.util.find_spec(package) is None:
        return f"the {package} package is not installed"
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            return f"tensor on {t.device.type} ({package} needs CUDA tensors)"
    return None


def dtype_reason(allowed: Sequence[torch.dtype], *tensors: Optional[torch.Tensor]) -> Optional[str]:
    for t in tensors:
        if t is not None and t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            return (f"dtype {str(t.dtype).replace('torch.', '')} not supported (supported: {names}): "
                    f"the input of shape {tuple(t.shape)}")
    return None


def first_reason(*reasons: Optional[str]) -> Optional[str]:
    for r in reasons:
        if r is not None:
            return r
    return None


# ---- the eager path of the differentiable custom ops -------------------------------------------


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors: Optional[torch.Tensor]) -> bool:
    """Nothing is tracing: not torch.compile, no Python dispatch mode (make_fx, FakeTensorMode, ...),
    plain tensors or parameters (no subclass such as DTensor or FakeTensor)."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(t is None or type(t) in _PLAIN for t in tensors))


def non_differentiable(ctx, *outputs: torch.Tensor) -> None:
    """Mark side outputs (statistics, moments, log-sum-exps) as carrying no gradient, and have autograd
    pass None for them to the backward instead of a zero tensor it would fill per call (356 fills in a
    256x256 train step's backward). The backward then gets None for its main output's gradient too when
    nothing downstream needs it."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


class _SecondDerivative(torch.autograd.Function):
    """Passes a backward's results on; differentiating through them raises (see :func:`_first_order`)."""

    @staticmethod
    def forward(ctx, name, n, *grads_then_saved):  # the op's saved tensors tie the results to its inputs
        ctx.name = name
        return grads_then_saved[:n]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name}: no second derivative: its backward kernels make no graph; run the op "
                           "with impl='ref' where a gradient is differentiated again (create_graph=True)")


def _first_order(name: str, backward: Callable) -> Callable:
    """``backward`` whose results, under create_graph=True, raise when differentiated again (as
    ``once_differentiable`` does only where the incoming gradients themselves need a gradient: a gradient
    penalty's second derivative through the op would be silently zero)."""
    def wrapped(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        saved = ctx.saved_tensors
        out = backward(ctx, *grads)
        out = out if isinstance(out, tuple) else (out,)
        return _SecondDerivative.apply(name, len(out), *[o if o is None else o.detach().requires_grad_() for o in out],
                                       *saved)

    return wrapped


def with_eager_path(name: str, op: Callable, forward: Callable, setup_context: Callable,
                    backward: Callable, first_order: bool = False) -> Callable:
    """``op(*args)`` (a custom op with a registered autograd formula) as a plain function. Outside tracing
    (:func:`plain_eager` of its tensor arguments) the custom op's dispatch is skipped, which costs about
    0.2-0.3 ms of host time per forward + backward on a CPU host (more than the kernel itself at most of
    the model's shapes): with no gradient wanted ``forward`` runs directly, else an autograd.Function made
    of ``forward``, the op's ``setup_context`` and ``backward`` (one that calls the backward
    implementation directly). torch.compile, export and other tracing see the custom op. ``first_order``:
    the backward runs kernels that make no graph, so a second derivative through it raises
    (:func:`_first_order`) instead of coming out silently zero."""
    def forward_with_ctx(ctx, *args):  # the ctx-first form: apply() binds no signature (~80 us saved per call)
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    grad = _first_order(name, backward) if first_order else backward
    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_with_ctx),
                                                 "backward": staticmethod(grad)})

    def call(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not plain_eager(*tensors):
            return op(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return fn.apply(*args)
        return forward(*args)

    return call
