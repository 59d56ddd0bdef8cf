"""``bias_add(x, bias, residual=None)``: ``x + bias[c] (+ residual)``, the bias of a convolution run
without one, added in one vectorised pass together with what follows it.

The fast ResNet runs its 3x3 convolutions without bias: ``conv2``'s is added here with the block's
skip (``h + x`` of the public code: one pass instead of cuDNN's broadcast bias pass and then the
residual add); ``conv1``'s is added by the group norm that reads its output
(``group_norm_act(..., input_bias=)``), so that no pass writes that sum. Backward: ``dx = dresidual
= dy``, ``dbias = dy`` summed over batch and pixels (fp32; fp64 for fp64).

x (B, C, H, W) fp16/bf16/fp32 (fp64: the ref backend), NCHW or channels_last; bias (C,) in any float dtype (an fp32
parameter under autocast is read as is); residual None or x's shape, dtype and layout.
Backends: ``triton`` (CUDA, or the CPU interpreter by name), ``ref`` (PyTorch: ``x + bias``, then
``+ residual``, each rounded to x's dtype, as the public code).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mdm_fast.ops import dispatch

OP = "bias_add"
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = _FAST_DTYPES + (torch.float64,)  # float64: the ref backend


def _channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _forward_impl(x: Tensor, bias: Tensor, residual: Optional[Tensor], backend: str) -> Tensor:
    if backend == "triton":
        from mdm_fast.kernels import bias_add as kernel

        return kernel.bias_add(x, bias.contiguous(), residual, _channels_last(x))  # the kernel reads bias[c]
    out = x + bias.to(x.dtype)[:, None, None]
    return out if residual is None else out + residual


_bias_add_op = torch.library.custom_op("mdm_fast::bias_add", mutates_args=())(_forward_impl)


@_bias_add_op.register_fake
def _(x, bias, residual, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    bias, residual = inputs[1], inputs[2]
    ctx.bias_dtype, ctx.has_residual = bias.dtype, residual is not None


def _backward(ctx, dy):
    n = ctx.needs_input_grad
    acc = dispatch.accumulation_dtype(dy.dtype)
    dbias = dy.sum(dim=(0, 2, 3), dtype=acc).to(ctx.bias_dtype) if n[1] else None  # (C,)
    return (dy if n[0] else None), dbias, (dy if ctx.has_residual and n[2] else None), None


_bias_add_op.register_autograd(_backward, setup_context=_setup_context)
_bias_add = dispatch.with_eager_path("BiasAdd", _bias_add_op, _forward_impl, _setup_context, _backward)


def _triton_reason(x, bias, residual) -> Optional[str]:
    return dispatch.first_reason(
        dispatch.triton_reason(x, bias, residual),
        dispatch.dtype_reason(_FAST_DTYPES, x, bias),
        None if x.is_contiguous() or _channels_last(x) else "x is neither NCHW- nor channels_last-dense",
        None if residual is None or residual.stride() == x.stride() else "residual's layout differs from x's")


dispatch.register(OP, {"ref": lambda *a: None, "triton": _triton_reason}, preference=["triton", "ref"])


def _check(x, bias, residual) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.dtype not in _DTYPES:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"bias_add: x must be a (B, C, H, W) float16/bfloat16/float32/float64 tensor, got {got}")
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (x.shape[1],) or not bias.is_floating_point():
        got = f"{tuple(bias.shape)} {bias.dtype}" if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias_add: bias must be a float tensor of shape ({x.shape[1]},), got {got}")
    if residual is not None and (not isinstance(residual, Tensor) or residual.shape != x.shape
                                 or residual.dtype != x.dtype):
        got = f"{tuple(residual.shape)} {residual.dtype}" if isinstance(residual, Tensor) else type(residual).__name__
        raise ValueError(f"bias_add: residual must be None or a {x.dtype} tensor of shape {tuple(x.shape)}, "
                         f"got {got}")
    for name, t in (("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"bias_add: {name} is on {t.device} but x is on {x.device}")


def bias_add(x: Tensor, bias: Tensor, residual: Optional[Tensor] = None, impl: str = "auto") -> Tensor:
    """``x + bias[None, :, None, None] (+ residual)`` in x's dtype and memory format (see the module notes)."""
    _check(x, bias, residual)
    backend = dispatch.resolve(OP, impl, x, bias, residual)
    return _bias_add(x, bias, residual, backend)
