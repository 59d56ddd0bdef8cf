"""A model called with its convolution and linear weights cast ahead of the ops that read them, under autocast.

Under ``torch.autocast`` every convolution and linear layer casts its fp32 weight and bias at every
call: 459 casting kernels per forward of the public 256x256 model (counted on fake tensors), about 40%
of its kernels, which a CUDA-graph step replays one after another; a training step's backward casts
each of their gradients back to fp32, as many kernels again. Both wrappers call the model on copies
of those parameters in the autocast dtype (``torch.func.functional_call``): the same values autocast
would produce, without its kernels.

- :class:`CastWeights` (sampling, no gradients) casts once, when built, and copies the other
  parameters as they are (0.17M of the 256x256 model's 378M): the copies are the weights then (as a
  captured graph is), and, needing no gradient, they let the fast model keep what it derives from them
  (batched time and text projections, sub-pixel weights: :class:`mdm_fast.ops.time_proj.ParamCache`);
  after the weights change (loading, training), build a new one. :meth:`CastWeights.shared` hands the
  samplers of one frozen model one set of copies.
- :class:`CastEachCall` (training) casts at every call, all parameters in one multi-tensor copy
  (``torch._foreach_copy_``, a few kernels), differentiable: backward hands each parameter its
  gradient cast back to its dtype the same way. Parameters that need no gradient (a frozen inner
  model) are copied outside autograd, so nothing computes their gradients. Every gradient reaches
  its parameter at the end of backward: under DistributedDataParallel, whose all-reduce overlaps
  backward as gradients arrive, it works (tested) but leaves nothing to overlap.

Other parameters (norms, embeddings) keep their dtype, so the ops autocast runs in fp32 see what they
saw before, and so do the convolution biases a fast module hands to its own ops in fp32
(``fp32_params``: the ResNet's conv1 and conv2 biases, which its norm and bias pass add in fp32).
Sharded (FSDP2) parameters are left to autocast.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from mdm_fast.models.tensors import is_sharded


def cast_targets(model: nn.Module, dtype: torch.dtype) -> Dict[str, Tensor]:
    """name -> parameter: the convolution (any dimension, transposed too) and linear parameters of
    ``model`` that autocast to ``dtype`` would cast, less the modules' ``fp32_params``."""
    modules = dict(model.named_modules())
    kept = {_join(prefix, name) for prefix, m in modules.items() for name in getattr(m, "fp32_params", ())}
    targets: Dict[str, Tensor] = {}
    for prefix, module in modules.items():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            for name, p in module.named_parameters(recurse=False):
                key = _join(prefix, name)
                if key not in kept and not is_sharded(p) and p.is_floating_point() and p.dtype != dtype:
                    targets[key] = p
    return targets


class CastWeights:
    """``CastWeights(model, torch.bfloat16)(*args)`` = ``model(*args)`` with the parameters of
    :func:`cast_targets` replaced by ``dtype`` copies made now, and the others (not sharded) by copies
    in their own dtype; meant for no-grad calls under autocast to ``dtype``."""

    _live: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()  # (id(model), dtype) -> one in use

    @classmethod
    def shared(cls, model: nn.Module, dtype: torch.dtype) -> "CastWeights":
        """The CastWeights of ``model`` to ``dtype`` that a live sampler already holds, if it was made from
        the weights as they are now, else a new one: the samplers of one frozen model (one per batch
        shape of a sampling job) share one set of copies, and what the fast model derives from them.
        Never shared for weights that require a gradient (an optimiser may change them unseen, see
        :class:`mdm_fast.ops.time_proj.ParamCache`)."""
        from mdm_fast.ops.time_proj import ParamCache

        params = list(model.parameters())
        found = cls._live.get((id(model), dtype))
        if found is not None and found.model is model and found.key == ParamCache.key(params):
            return found
        made = cls(model, dtype)
        if ParamCache.keeps(params):
            cls._live[(id(model), dtype)] = made
        return made

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        from mdm_fast.ops.time_proj import ParamCache

        self.model = model
        self.key = ParamCache.key(list(model.parameters()))  # the weights the copies were made from
        self.params = cast_targets(model, dtype)  # name -> the model's parameter
        with torch.no_grad():
            copies: Dict[int, Tensor] = {}  # a parameter shared by two modules gets one copy
            self.copies = {k: copies.setdefault(id(p), p.detach().to(dtype)) for k, p in self.params.items()}
            for k, p in model.named_parameters():
                if k not in self.copies and not is_sharded(p):
                    self.copies[k] = copies.setdefault(id(p), p.detach().clone())

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.copies, args, kwargs, strict=False)


class CastEachCall:
    """``CastEachCall(fn, model, torch.bfloat16)(*args)`` = ``fn(*args)`` with ``model``'s parameters of
    :func:`cast_targets` cast to ``dtype`` by one multi-tensor copy at every call, gradients flowing back
    to them. ``fn`` is ``model`` or a module that calls it (a DistributedDataParallel wrapper). Outside
    autocast to ``dtype`` (on the parameters' device type), ``fn(*args)`` as it is."""

    def __init__(self, fn: nn.Module, model: nn.Module, dtype: torch.dtype):
        prefix = next(name for name, m in fn.named_modules() if m is model)
        self.fn, self.dtype = fn, dtype
        targets = cast_targets(model, dtype)
        unique: Dict[int, int] = {}  # a parameter shared by two modules is cast once
        self.params: List[Tensor] = []
        self.slots: List[Tuple[str, int]] = []  # (name under fn, index into params)
        for name, p in targets.items():
            if id(p) not in unique:
                unique[id(p)] = len(self.params)
                self.params.append(p)
            self.slots.append((_join(prefix, name), unique[id(p)]))

    def __call__(self, *args, **kwargs):
        if not self.params:
            return self.fn(*args, **kwargs)
        device = self.params[0].device.type
        if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != self.dtype:
            return self.fn(*args, **kwargs)
        copies = cast_all(self.params, self.dtype)
        return torch.func.functional_call(self.fn, {name: copies[i] for name, i in self.slots}, args, kwargs,
                                          strict=False)


def cast_all(params: Sequence[Tensor], dtype: torch.dtype) -> List[Tensor]:
    """``[p.to(dtype) for p in params]`` (same layouts) in one multi-tensor copy; those that require a
    gradient get it back cast to their own dtype, the same way."""
    grad = [i for i, p in enumerate(params) if p.requires_grad and torch.is_grad_enabled()]
    out: List[Tensor] = [None] * len(params)  # type: ignore[list-item]
    if grad:
        for i, t in zip(grad, _CastAll.apply(dtype, *(params[i] for i in grad))):
            out[i] = t
    rest = [i for i in range(len(params)) if out[i] is None]
    if rest:
        with torch.no_grad():
            for i, t in zip(rest, _copy_cast([params[i] for i in rest], [dtype] * len(rest))):
                out[i] = t
    return out


class _CastAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dtype, *params):
        ctx.dtypes = [p.dtype for p in params]
        return tuple(_copy_cast(params, [dtype] * len(params)))

    @staticmethod
    def backward(ctx, *grads):
        present = [i for i, g in enumerate(grads) if g is not None]
        out = [None] * len(grads)
        for i, g in zip(present, _copy_cast([grads[i] for i in present], [ctx.dtypes[i] for i in present])):
            out[i] = g
        return (None, *out)


def _copy_cast(tensors: Sequence[Tensor], dtypes: Sequence[torch.dtype]) -> List[Tensor]:
    """Copies of ``tensors`` in ``dtypes``, each with its source's layout, by one ``_foreach_copy_``."""
    out = [torch.empty_like(t, dtype=d) for t, d in zip(tensors, dtypes)]
    if out:
        torch._foreach_copy_(out, list(tensors))
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
