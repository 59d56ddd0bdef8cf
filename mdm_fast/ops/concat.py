"""``concat_channels(a, b)``: ``torch.cat((a, b), dim=1)``, the decoder's concatenation of its skips, and
``concat_channels_for_norm(a, b, num_groups)``, which also hands the norm that reads the result its
partial moments.

The public decoder concatenates a skip activation onto x before every up-path ResNet, whose first op
normalises the concatenation (``norm1``). For a channels_last result that group_norm_act cuts into
parts (its split path, see :mod:`mdm_fast.kernels.group_norm`), the triton backend writes each part's
per-channel moments as it copies: ``group_norm_act(..., moments=)`` then skips its statistics pass.

a (B, C1, H, W), b (B, C2, H, W) of one dtype; the result keeps their memory format (channels_last from
the triton backend). Backward: the
gradient's two channel slices (views, as torch.cat's backward). Backends: ``triton`` (channels_last-dense
inputs: a row copy at the copy rate, :mod:`mdm_fast.kernels.concat`), ``ref`` (torch.cat; NCHW inputs
are two contiguous blocks per sample, which torch.cat copies well).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mdm_fast.ops import dispatch
from mdm_fast.ops.group_norm_act import check_moments_groups, moments_or_none, no_moments

OP = "concat_channels"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def _moments_plan(a: Tensor, b: Tensor, num_groups: int):
    """The norm's split plan for the (B, C1 + C2, H, W) channels_last result, or None (no moments)."""
    from mdm_fast.kernels import group_norm as gn

    return gn.moments_plan((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]), num_groups, a.device,
                           a.element_size())


def _forward_impl(a: Tensor, b: Tensor, num_groups: int, backend: str) -> Tuple[Tensor, Tensor]:
    """(the concatenation, its partial moments (2, B, nsplit, C) fp32, or an empty tensor: none)."""
    plan = _moments_plan(a, b, num_groups) if backend == "triton" else None
    if backend == "triton":
        from mdm_fast.kernels import concat as kernel

        out, moments = kernel.concat(a, b, plan)
    else:
        out, moments = torch.cat((a, b), dim=1), None
    return out, (moments if moments is not None else no_moments(a))


_concat_op = torch.library.custom_op("mdm_fast::concat_channels", mutates_args=())(_forward_impl)


@_concat_op.register_fake
def _(a, b, num_groups, backend):
    if backend != "triton":
        return torch.cat((a, b), dim=1), no_moments(a)
    B, _, H, W = a.shape
    out = torch.empty((B, a.shape[1] + b.shape[1], H, W), dtype=a.dtype, device=a.device,
                      memory_format=torch.channels_last)
    plan = _moments_plan(a, b, num_groups)
    if plan is None:
        return out, no_moments(a)
    return out, a.new_empty((2, B, plan.nsplit, out.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.c1 = inputs[0].shape[1]
    dispatch.non_differentiable(ctx, output[1])


def _backward(ctx, dout, _dmoments):
    if dout is None:
        return None, None, None, None
    return dout[:, :ctx.c1], dout[:, ctx.c1:], None, None


_concat_op.register_autograd(_backward, setup_context=_setup_context)
_concat = dispatch.with_eager_path("ConcatChannels", _concat_op, _forward_impl, _setup_context, _backward)


def _triton_reason(a, b) -> Optional[str]:
    return dispatch.first_reason(
        dispatch.triton_reason(a, b),
        dispatch.dtype_reason(_DTYPES, a, b),
        None if a.dtype == b.dtype else f"a is {a.dtype} and b {b.dtype} (torch.cat promotes)",
        None if _channels_last(a) and _channels_last(b) else "the inputs are not both channels_last-dense",
        None if a.numel() and b.numel() else "an empty input (nothing to launch)")


dispatch.register(OP, {"ref": lambda *a: None, "triton": _triton_reason}, preference=["triton", "ref"])


def _check(a, b) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"concat_channels: {name} must be a (B, C, H, W) float tensor, got {got}")
    if (a.shape[0], *a.shape[2:]) != (b.shape[0], *b.shape[2:]) or a.device != b.device:
        raise ValueError(f"concat_channels: a {tuple(a.shape)} on {a.device} and b {tuple(b.shape)} on {b.device} "
                         f"must share the batch, height, width and device")


def concat_channels(a: Tensor, b: Tensor, impl: str = "auto") -> Tensor:
    """``torch.cat((a, b), dim=1)`` (see the module notes)."""
    return concat_channels_for_norm(a, b, 0, impl)[0]


def concat_channels_for_norm(a: Tensor, b: Tensor, num_groups: int,
                             impl: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    """(``torch.cat((a, b), dim=1)``, moments or None): moments are the partial moments that
    ``group_norm_act(out, num_groups, ..., moments=)`` takes, where the triton backend ran and that norm
    takes its split path; None elsewhere (the norm then computes its statistics itself)."""
    _check(a, b)
    check_moments_groups("concat_channels_for_norm", num_groups)
    backend = dispatch.resolve(OP, impl, a, b)
    out, moments = _concat(a, b, num_groups, backend)
    return out, moments_or_none(moments)
