"""Resampling on the NestedUNet hot path: sub-pixel upsample-conv, the nesting adapters, resize.

``upsample_conv3x3(x, weight, bias)`` == ``conv2d(interpolate(x, scale_factor=2), weight, bias,
padding=1)`` (every up block), computed from the low-resolution input as four 2x2 phase convs
(2.25x fewer FLOPs, no upsampled tensor). The public 3x3 weights stay the parameters; the phase
weights are derived from them (a (Cout, Cin, 16) tensor: 8-9 small kernels, ~10 us for 768 channels
on an H100) so gradients and the state_dict stay public; the derived weights of a weight that
needs no gradient (a sampler's cast copies) are kept while it lives and is unchanged: one derivation,
not one per step. Backends:

- ``ref``: the literal interpolate + conv2d.
- ``torch``: the four phases are exactly ``conv_transpose2d(x, W4, stride=2, padding=1)`` with a
  4x4 kernel ``W4 = M W M^T`` (M the 4x3 tap map below): one cuDNN call, output interleaved and
  bias fused by cuDNN, 16 MACs per low-res pixel and channel pair. ``TORCH_FORM = "phases"`` computes
  the same as ONE forward conv instead, a 2x2 kernel with 4 x Cout outputs (one per phase) over the
  1-padded input ((H+1) x (W+1) windows), whose phases are interleaved (and the bias added) by one
  copy: cuDNN's forward kernels instead of its transposed-conv (dgrad) kernels, for one extra pass
  over the output. Which is faster is measured by ``benchmarks/resample.py``.
- ``triton``: the implicit-GEMM kernel of :mod:`mdm_fast.kernels.upsample_conv`.

The backward of every non-ref backend is the adjoint of that transposed conv (cuDNN), with the
4x4 weight gradient mapped back to 3x3 through M^T.

The adapters of a NestedUNet level are PyTorch-only: both are 3x3 convs with hundreds of channels
where cuDNN is at its best, and the waste in the public code is elsewhere (a zero-padded batch
and a conv over samples whose result is dropped), which the ``torch`` backend removes:

- ``nested_inner_input``: conv_in(x_low) + in_adapter(feat) zero-padded to x_low's batch: the
  adapter runs on the bh samples only and is added in place into conv_in's fresh output.
- ``nested_outer_merge``: x + out_adapter(inner_out)[:bh]: the adapter runs on the first bh
  samples only and x is added in place into its fresh output.

``resize`` is F.interpolate in the input's dtype (CUDA's nearest/bilinear/bicubic kernels take
fp16/bf16 and accumulate in fp32), validated.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.weak
from torch import Tensor

from mdm_fast.ops import dispatch
from mdm_fast.ops.time_proj import ParamCache

_aten = torch.ops.aten
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# Per axis, output row 2m + p of the upsample-conv sees input rows m + p + t - 1 (t = 0, 1) with the
# 3x3 taps (t0, t1, t2) summed as: (p, t) = (0, 0): t0, (0, 1): t1 + t2, (1, 0): t0 + t1, (1, 1): t2.
# conv_transpose2d (stride 2, padding 1) puts input row i at output rows 2i - 1 + k, so its 4-tap
# kernel is K4[k] = [t2, t1 + t2, t0 + t1, t0]. Built from slices, without host constants, so the
# derivation runs under CUDA graph capture.


def _acc(weight: Tensor) -> Tensor:
    return weight.to(dispatch.accumulation_dtype(weight.dtype))  # taps summed in >= fp32


def _phase_taps(w: Tensor, dim: int) -> Tensor:
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2, t0 + t1, t2], dim)  # [(p, t)] = (0,0), (0,1), (1,0), (1,1)


def _transposed_taps(w: Tensor, dim: int) -> Tensor:
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t2, t1 + t2, t0 + t1, t0], dim)  # K4[k], k = 0..3


def _transposed_taps_adjoint(g: Tensor, dim: int) -> Tensor:
    k0, k1, k2, k3 = g.unbind(dim)
    return torch.stack([k2 + k3, k1 + k2, k0 + k1], dim)


def transposed_weight(weight: Tensor) -> Tensor:
    """(Cout, Cin, 3, 3) -> the (Cin, Cout, 4, 4) conv_transpose2d weight (stride 2, padding 1)."""
    w4 = _transposed_taps(_transposed_taps(_acc(weight), 2), 3)  # (Cout, Cin, 4, 4)
    return w4.transpose(0, 1).to(weight.dtype)


def phase_weights(weight: Tensor) -> Tensor:
    """(Cout, Cin, 3, 3) -> (2, 2, 2, 2, Cin, Cout) contiguous [py, px, ty, tx, ci, co]: phase (py, px)
    tap (ty, tx) multiplies input pixel (m + py + ty - 1, n + px + tx - 1) for output (2m+py, 2n+px)."""
    co, ci = weight.shape[:2]
    wp = _phase_taps(_phase_taps(_acc(weight), 2), 3).view(co, ci, 2, 2, 2, 2)  # [o, i, py, ty, px, tx]
    return wp.permute(2, 4, 3, 5, 1, 0).to(weight.dtype).contiguous()


_DERIVED = torch.utils.weak.WeakIdKeyDictionary()  # weight -> {derive: ParamCache}


def _derived(derive: Callable[[Tensor], Tensor], weight: Tensor) -> Tensor:
    """``derive(weight)``, kept while ``weight`` lives and rebuilt when it changes (:class:`ParamCache`:
    only for a weight that needs no gradient and is no inference tensor). Never kept for a traced one
    (fake, functional)."""
    if type(weight) not in (Tensor, torch.nn.Parameter) or not ParamCache.keeps([weight]):
        return derive(weight)
    caches = _DERIVED.setdefault(weight, {})
    if derive not in caches:
        caches[derive] = ParamCache()
    return caches[derive].get([weight], lambda: derive(weight))


def _phases_as_one_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], fmt: torch.memory_format) -> Tensor:
    """The upsample-conv as one 2x2 conv with the four phases as output channels, then interleaved:
    output (2m + py, 2n + px) is window (m + py, n + px) of the 1-padded input, phase (py, px)."""
    B, _, H, W = x.shape
    co = weight.shape[0]
    wp = _derived(phase_weights, weight)  # [py, px, ty, tx, ci, co]
    w2 = wp.permute(0, 1, 5, 4, 2, 3).reshape(4 * co, -1, 2, 2).contiguous(memory_format=fmt)  # [(py,px,co),ci,..]
    z = F.conv2d(x, w2, None, padding=1)  # (B, 4 co, H + 1, W + 1)
    sb, sc, sh, sw = z.stride()
    # (B, co, H, 2, W, 2)[b, c, m, py, n, px] = z[b, (py, px, c), m + py, n + px]
    phases = z.as_strided((B, co, H, 2, W, 2), (sb, sc, sh, 2 * co * sc + sh, sw, co * sc + sw))
    y = torch.empty((B, co, 2 * H, 2 * W), dtype=x.dtype, device=x.device, memory_format=fmt)
    out = y.view(B, co, H, 2, W, 2) if fmt == torch.contiguous_format else \
        y.permute(0, 2, 3, 1).view(B, H, 2, W, 2, co).permute(0, 5, 1, 2, 3, 4)
    if bias is None:
        out.copy_(phases)
    else:
        torch.add(phases, bias.view(co, 1, 1, 1, 1), out=out)
    return y


def _weight_grad_from_transposed(grad_w4: Tensor, dtype: torch.dtype) -> Tensor:
    """Adjoint of :func:`transposed_weight`: (Cin, Cout, 4, 4) -> (Cout, Cin, 3, 3)."""
    g = _transposed_taps_adjoint(_transposed_taps_adjoint(_acc(grad_w4), 2), 3)
    return g.transpose(0, 1).to(dtype)


def _memory_format(*tensors: Optional[Tensor]) -> torch.memory_format:
    """channels_last if any 4-D tensor is laid out (unambiguously) channels_last, else contiguous."""
    for t in tensors:
        if t is not None and t.dim() == 4 and not t.is_contiguous() \
                and t.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, needs: Sequence[bool],
                   stride: int = 1, padding: Optional[int] = None, transposed: bool = False):
    """(grad_x, grad_weight, grad_bias) of conv2d(x, weight, bias, stride, padding); None where not needed."""
    pad = weight.shape[-1] // 2 if padding is None else padding
    mask = [bool(needs[0]), bool(needs[1]), bool(needs[2]) and has_bias]
    if not any(mask):
        return None, None, None
    gx, gw, gb = _aten.convolution_backward(
        grad, x, weight, [weight.shape[1] if transposed else weight.shape[0]] if has_bias else None,
        [stride, stride], [pad, pad], [1, 1], transposed, [0, 0], 1, mask)
    return (gx if mask[0] else None), (gw if mask[1] else None), (gb if mask[2] else None)


def _conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)


# ---- upsample_conv3x3 ------------------------------------------------------------------------

TORCH_FORM = "transposed"  # the torch backend's formulation: "transposed" (one conv_transpose2d) or "phases"


def _upsample_conv3x3_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], impl: str) -> Tensor:
    fmt = _memory_format(x)
    if impl == "ref":
        y = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    elif impl == "torch" and TORCH_FORM == "phases":
        y = _phases_as_one_conv(x, weight, bias, fmt)
    elif impl == "torch":
        y = F.conv_transpose2d(x, _derived(transposed_weight, weight), bias, stride=2, padding=1)
    elif impl == "triton":
        from mdm_fast.kernels.upsample_conv import upsample_conv3x3_fwd

        B, _, H, W = x.shape
        y = torch.empty((B, weight.shape[0], 2 * H, 2 * W), dtype=x.dtype, device=x.device, memory_format=fmt)
        upsample_conv3x3_fwd(x, _derived(phase_weights, weight), None if bias is None else bias.contiguous(), y)
    else:
        raise ValueError(f"upsample_conv3x3: unknown backend {impl!r}")
    return y.contiguous(memory_format=fmt)


_upsample_conv3x3 = torch.library.custom_op("mdm_fast::upsample_conv3x3", mutates_args=())(_upsample_conv3x3_impl)


@_upsample_conv3x3.register_fake
def _(x, weight, bias, impl):
    B, _, H, W = x.shape
    return torch.empty((B, weight.shape[0], 2 * H, 2 * W), dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(x))


def _upsample_conv3x3_setup(ctx, inputs, output):
    x, weight, bias, impl = inputs
    ctx.save_for_backward(x, weight)
    ctx.impl = impl
    ctx.has_bias = bias is not None


def _upsample_conv3x3_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if ctx.impl == "ref":  # autograd of the literal formulation
        u = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, Cin, 2H, 2W)
        gu, gw, gb = _conv_backward(grad, u, weight, ctx.has_bias, needs)
        B, C, H, W = x.shape
        gx = None if gu is None else gu.reshape(B, C, H, 2, W, 2).sum((3, 5))
        return gx, gw, gb, None
    gx, gw4, gb = _conv_backward(grad, x, _derived(transposed_weight, weight), ctx.has_bias, needs,
                                 stride=2, padding=1, transposed=True)
    gw = None if gw4 is None else _weight_grad_from_transposed(gw4, weight.dtype)
    return gx, gw, gb, None


_upsample_conv3x3.register_autograd(_upsample_conv3x3_grad, setup_context=_upsample_conv3x3_setup)
_upsample_conv3x3_call = dispatch.with_eager_path("UpsampleConv3x3", _upsample_conv3x3, _upsample_conv3x3_impl,
                                                  _upsample_conv3x3_setup, _upsample_conv3x3_grad)


def _upsample_conv_order(x, weight, bias):
    """Measured on an H200 (benchmarks/resample.py, bf16, batch 32): the Triton sub-pixel kernel wins
    for narrow inputs at high resolution (32-64 channels: 2.5-3.4x over interpolate + conv, against
    1.4-2.5x for cuDNN's transposed conv; 128 channels: about even), cuDNN for 256+ channels."""
    return ["triton", "torch", "ref"] if x.shape[1] <= 128 else ["torch", "triton", "ref"]


def _triton_reason(x, weight, bias):
    return dispatch.first_reason(dispatch.triton_reason(x, weight, bias),
                                 dispatch.dtype_reason(_FLOATS, x))


dispatch.register(
    "upsample_conv3x3",
    {"ref": lambda *a: None, "torch": lambda *a: None, "triton": _triton_reason},
    preference=_upsample_conv_order,
)


def _check_float(name: str, t: Tensor, ndim: int, what: str, like: Optional[Tensor] = None) -> None:
    if not isinstance(t, Tensor) or t.dim() != ndim or not t.is_floating_point():
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating-point tensor of shape {what}, got {got}")
    if like is not None and (t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"{name} must have the dtype and device of the input ({like.dtype}, {like.device}), "
                         f"got {t.dtype} on {t.device}")


def _check_conv(prefix: str, weight: Tensor, bias: Optional[Tensor], cin: int, x: Tensor,
                square3: bool = False) -> None:
    what = "(Cout, Cin, 3, 3)" if square3 else "(Cout, Cin, k, k) with odd k"
    _check_float(f"{prefix}weight", weight, 4, what, x)
    k = weight.shape[-1]
    if weight.shape[1] != cin or weight.shape[2] != k or k % 2 != 1 or (square3 and k != 3):
        raise ValueError(f"{prefix}weight must have shape {what} with Cin = {cin}, got {tuple(weight.shape)}")
    if bias is not None:
        _check_float(f"{prefix}bias", bias, 1, "(Cout,)", x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def upsample_conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, impl: str = "auto") -> Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1), sub-pixel.

    x (B, Cin, H, W) NCHW or channels_last, weight (Cout, Cin, 3, 3), bias (Cout,) or None, all of
    x's dtype -> (B, Cout, 2H, 2W) in x's memory format.
    """
    _check_float("x", x, 4, "(B, Cin, H, W)")
    if x.shape[2] == 0 or x.shape[3] == 0:  # the backends disagreed (an empty result, or torch's errors)
        raise ValueError(f"x must have H, W >= 1, got {tuple(x.shape)}")
    _check_conv("", weight, bias, x.shape[1], x, square3=True)
    backend = dispatch.resolve("upsample_conv3x3", impl, x, weight, bias)
    return _upsample_conv3x3_call(x, weight, bias, backend)


# ---- nested_inner_input ----------------------------------------------------------------------


@torch.library.custom_op("mdm_fast::nested_inner_input", mutates_args=())
def _nested_inner_input(x_low: Tensor, conv_in_w: Tensor, conv_in_b: Optional[Tensor], feat: Optional[Tensor],
                        adapter_w: Optional[Tensor], adapter_b: Optional[Tensor], impl: str) -> Tensor:
    out = _conv_same(x_low, conv_in_w, conv_in_b)  # (bl, C, h, w)
    if feat is not None:
        bh, bl = feat.shape[0], x_low.shape[0]
        if impl == "ref":  # literal public code: zero-pad the adapter output to the low-res batch
            a = _conv_same(feat, adapter_w, adapter_b)
            if bh < bl:
                a = torch.cat([a, a.new_zeros(bl - bh, *a.shape[1:])], 0)
            out = out + a
        else:
            out[:bh] += _conv_same(feat, adapter_w, adapter_b)
    return out.contiguous(memory_format=_memory_format(x_low, feat))


@_nested_inner_input.register_fake
def _(x_low, conv_in_w, conv_in_b, feat, adapter_w, adapter_b, impl):
    bl, _, h, w = x_low.shape
    return torch.empty((bl, conv_in_w.shape[0], h, w), dtype=x_low.dtype, device=x_low.device,
                       memory_format=_memory_format(x_low, feat))


def _nested_inner_input_setup(ctx, inputs, output):
    x_low, conv_in_w, conv_in_b, feat, adapter_w, adapter_b, _ = inputs
    ctx.save_for_backward(x_low, conv_in_w, feat, adapter_w)
    ctx.biases = (conv_in_b is not None, adapter_b is not None)


def _nested_inner_input_grad(ctx, grad):
    x_low, conv_in_w, feat, adapter_w = ctx.saved_tensors
    n = ctx.needs_input_grad
    g_x, g_wi, g_bi = _conv_backward(grad, x_low, conv_in_w, ctx.biases[0], n[0:3])
    g_f = g_wa = g_ba = None
    if feat is not None:  # the zero padding's adjoint: the first bh samples of the gradient
        g_f, g_wa, g_ba = _conv_backward(grad[: feat.shape[0]], feat, adapter_w, ctx.biases[1], n[3:6])
    return g_x, g_wi, g_bi, g_f, g_wa, g_ba, None


_nested_inner_input.register_autograd(_nested_inner_input_grad, setup_context=_nested_inner_input_setup)


# ---- nested_outer_merge ----------------------------------------------------------------------


@torch.library.custom_op("mdm_fast::nested_outer_merge", mutates_args=())
def _nested_outer_merge(x: Tensor, inner_out: Tensor, adapter_w: Tensor, adapter_b: Optional[Tensor],
                        impl: str) -> Tensor:
    bh = x.shape[0]
    if impl == "ref":  # literal public code: adapter over every low-res sample, then slice
        out = x + _conv_same(inner_out, adapter_w, adapter_b)[:bh]
    else:
        out = _conv_same(inner_out[:bh], adapter_w, adapter_b)
        out += x
    return out.contiguous(memory_format=_memory_format(x, inner_out))


@_nested_outer_merge.register_fake
def _(x, inner_out, adapter_w, adapter_b, impl):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x, inner_out))


def _nested_outer_merge_setup(ctx, inputs, output):
    x, inner_out, adapter_w, adapter_b, _ = inputs
    ctx.save_for_backward(inner_out, adapter_w)
    ctx.bh = x.shape[0]
    ctx.has_bias = adapter_b is not None


def _nested_outer_merge_grad(ctx, grad):
    inner_out, adapter_w = ctx.saved_tensors
    n = ctx.needs_input_grad
    bh = ctx.bh
    g_i, g_w, g_b = _conv_backward(grad, inner_out[:bh], adapter_w, ctx.has_bias, n[1:4])
    if g_i is not None and bh < inner_out.shape[0]:  # samples the merge drops get zero gradient
        g_i = torch.cat([g_i, g_i.new_zeros(inner_out.shape[0] - bh, *g_i.shape[1:])], 0)
    return (grad if n[0] else None), g_i, g_w, g_b, None


_nested_outer_merge.register_autograd(_nested_outer_merge_grad, setup_context=_nested_outer_merge_setup)

_ALWAYS = {"ref": lambda *a: None, "torch": lambda *a: None}
dispatch.register("nested_inner_input", _ALWAYS, preference=["torch", "ref"])
dispatch.register("nested_outer_merge", _ALWAYS, preference=["torch", "ref"])


def nested_inner_input(x_low: Tensor, conv_in_w: Tensor, conv_in_b: Optional[Tensor], feat: Optional[Tensor],
                       adapter_w: Optional[Tensor], adapter_b: Optional[Tensor], impl: str = "auto") -> Tensor:
    """conv_in(x_low) + in_adapter(feat) zero-padded along the batch to x_low's batch.

    x_low (bl, Cx, h, w); conv_in_w (C, Cx, k, k); feat (bh, Cf, h, w) with bh <= bl, or None (the
    skip_inner_unet_input models: then adapter_w and adapter_b must be None); adapter_w
    (C, Cf, k', k'); odd kernels, 'same' padding. Returns (bl, C, h, w).
    """
    _check_float("x_low", x_low, 4, "(bl, Cx, h, w)")
    _check_conv("conv_in_", conv_in_w, conv_in_b, x_low.shape[1], x_low)
    if feat is None:
        if adapter_w is not None or adapter_b is not None:
            raise ValueError("feat is None (no in_adapter input) but adapter_w / adapter_b were given")
    else:
        _check_float("feat", feat, 4, "(bh, Cf, h, w)", x_low)
        bl, _, h, w = x_low.shape
        if feat.shape[0] > bl or feat.shape[2:] != (h, w):
            raise ValueError(f"feat must have shape (bh <= {bl}, Cf, {h}, {w}), got {tuple(feat.shape)}")
        if adapter_w is None:
            raise ValueError("feat given without adapter_w")
        _check_conv("adapter_", adapter_w, adapter_b, feat.shape[1], x_low)
        if adapter_w.shape[0] != conv_in_w.shape[0]:
            raise ValueError(f"adapter_w must have {conv_in_w.shape[0]} output channels like conv_in_w, "
                             f"got {tuple(adapter_w.shape)}")
    backend = dispatch.resolve("nested_inner_input", impl, x_low)
    return _nested_inner_input(x_low, conv_in_w, conv_in_b, feat, adapter_w, adapter_b, backend)


def nested_outer_merge(x: Tensor, inner_out: Tensor, adapter_w: Tensor, adapter_b: Optional[Tensor],
                       impl: str = "auto") -> Tensor:
    """x + out_adapter(inner_out)[:bh]: x (bh, C, h, w), inner_out (bl >= bh, Ci, h, w),
    adapter_w (C, Ci, k, k) odd k, 'same' padding. Returns (bh, C, h, w)."""
    _check_float("x", x, 4, "(bh, C, h, w)")
    _check_float("inner_out", inner_out, 4, "(bl, Ci, h, w)", x)
    if inner_out.shape[0] < x.shape[0] or inner_out.shape[2:] != x.shape[2:]:
        raise ValueError(f"inner_out must have shape (bl >= {x.shape[0]}, Ci, {x.shape[2]}, {x.shape[3]}), "
                         f"got {tuple(inner_out.shape)}")
    _check_conv("adapter_", adapter_w, adapter_b, inner_out.shape[1], x)
    if adapter_w.shape[0] != x.shape[1]:
        raise ValueError(f"adapter_w must have {x.shape[1]} output channels like x, got {tuple(adapter_w.shape)}")
    backend = dispatch.resolve("nested_outer_merge", impl, x)
    return _nested_outer_merge(x, inner_out, adapter_w, adapter_b, backend)


# ---- resize ----------------------------------------------------------------------------------

_RESIZE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def resize(x: Tensor, scale_factor: Optional[float] = None, size: Optional[Union[int, Tuple[int, int]]] = None,
           mode: str = "bicubic", antialias: bool = False) -> Tensor:
    """F.interpolate of (B, C, H, W) in x's own dtype (no float32 round trip), align_corners=False.

    Exactly one of ``scale_factor`` / ``size``. ``antialias`` (bilinear / bicubic only) low-pass
    filters when downsampling. The public residual-from-low-resolution path is
    ``resize(x0_low, scale_factor=ratio, mode="bicubic")``.
    """
    _check_float("x", x, 4, "(B, C, H, W)")
    if (scale_factor is None) == (size is None):
        raise ValueError("resize: give exactly one of scale_factor and size")
    if mode not in _RESIZE_MODES:
        raise ValueError(f"resize: mode must be one of {_RESIZE_MODES}, got {mode!r}")
    if antialias and mode not in ("bilinear", "bicubic"):
        raise ValueError(f"resize: antialias needs mode bilinear or bicubic, got {mode!r}")
    align = False if mode in ("bilinear", "bicubic") else None
    if antialias and x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        # CPU's antialias kernels take fp32/fp64 only (CUDA's take fp16/bf16): round trip off-GPU only
        return F.interpolate(x.float(), size=size, scale_factor=scale_factor, mode=mode, align_corners=align,
                             antialias=True).to(x.dtype)
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=align,
                         antialias=antialias)
