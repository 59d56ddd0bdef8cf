"""GroupNorm + per-sample scale-shift + SiLU as one op:

    group_norm_act(x, G, weight, bias, eps, scale, shift, act) = act(group_norm(x) * (1 + scale) + shift)

the three call sites of MDM: ``silu(norm1(x))`` and ``silu(norm_out(x))`` (no scale/shift) and the
ResNet's ``silu(norm2(h) * (1 + ta) + tb)``. ``scale``/``shift`` are (B, C), broadcast over space.

Input: (B, C, H, W) or (B, C, T, H, W), NCHW-contiguous or channels_last(_3d); the output keeps
the input's memory format (any other strides are made contiguous first). 5-D (video) input is
reshaped as the public model runs video: its T frames folded into the batch, (B*T, C, H, W), so that
each frame is normalised on its own, with a sample's scale and shift repeated for each of its frames
(``ResNet.forward``'s repeat); a channels_last_3d input folds without a copy. Statistics and
arithmetic are fp32 for every input dtype.

Backends: ``triton`` (:mod:`mdm_fast.kernels.group_norm`), ``cuda`` (``csrc/group_norm.cu``
through ``mdm_fast._C``) and ``ref`` (the public PyTorch formulation; its backward is autograd
through it). The forward saves only x and the (B, G) fp32 mean and rstd.

``input_bias``: a (C,) bias added to x before the norm, ``group_norm(x + input_bias[c])``: the bias of
the convolution that produced x, which then runs without it (the fast ResNet's ``conv1`` before ``norm2``),
so that no pass writes the sum. The kernels add it to the channels' statistics, in fp32; its gradient is
dx summed over the batch and the pixels, which the triton kernels get from the sums they already make
(with sum_s xhat), without a pass over dx.

``moments``: the op that produced a channels_last x may hand over x's partial moments, written as it
wrote x (``concat_channels_for_norm``); the triton backend's split path then skips its statistics pass
(one read of x fewer). The other backends ignore them.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mdm_fast.kernels.sizes import cdiv
from mdm_fast.ops import dispatch

OP = "group_norm_act"
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = _FAST_DTYPES + (torch.float64,)  # the ref backend also runs fp64 (test oracle)
_ACTS = ("silu", None)


# ---- the public formulation ----------------------------------------------------------------


def reference(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
              scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, act: Optional[str] = "silu") -> Tensor:
    """The public code's ops, unfused: ``F.silu(F.group_norm(x) * (1 + scale) + shift)``; 5-D x per frame."""
    if x.dim() == 5:
        return _on_frames(reference, x, num_groups, weight, bias, eps, scale=scale, shift=shift, act=act)
    h = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        h = h * (1 + scale[:, :, None, None])  # (B, C) -> (B, C, 1, 1)
    if shift is not None:
        h = h + shift[:, :, None, None]
    return F.silu(h) if act == "silu" else h


# ---- layout --------------------------------------------------------------------------------


def _channels_last_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _is_channels_last(x: Tensor) -> bool:
    """True for a channels_last(_3d)-dense tensor that is not also NCHW-contiguous."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=_channels_last_format(x))


def _format(x: Tensor) -> torch.memory_format:
    return _channels_last_format(x) if _is_channels_last(x) else torch.contiguous_format


def _fold_frames(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W): a view of channels_last_3d x (then channels_last), else a copy."""
    B, C, T, H, W = x.shape
    return x.transpose(1, 2).reshape(B * T, C, H, W)


def _unfold_frames(y: Tensor, shape: torch.Size, memory_format: torch.memory_format) -> Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W) in ``memory_format``."""
    B, C, T, H, W = shape
    return y.reshape(B, T, C, H, W).transpose(1, 2).contiguous(memory_format=memory_format)


class _FramesInBatch(torch.autograd.Function):
    """The public model's video layout, (B, C, T, H, W) -> (B*T, C, H, W), with x's gradient in x's
    memory format (autograd through the transpose would hand NCDHW x a (B, T, C, H, W)-strided one)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape, ctx.memory_format = x.shape, _format(x)
        return _fold_frames(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _unfold_frames(grad, ctx.shape, ctx.memory_format)


def _per_frame(t: Optional[Tensor], frames: int) -> Optional[Tensor]:
    """A sample's (B, C) scale or shift for each of its frames: (B*T, C)."""
    return None if t is None else t.repeat_interleave(frames, dim=0)


def _on_frames(fn: Callable[..., Tensor], x: Tensor, *args, scale: Optional[Tensor], shift: Optional[Tensor],
               **kwargs) -> Tensor:
    """``fn`` (the op or the reference) on 5-D x with its frames in the batch, a sample's scale and shift
    for each frame; the result in x's shape and memory format."""
    frames = x.shape[2]
    y = fn(_FramesInBatch.apply(x), *args, scale=_per_frame(scale, frames), shift=_per_frame(shift, frames),
           **kwargs)  # (B*T, C, H, W)
    return _unfold_frames(y, x.shape, _format(x))


class _DenseCopy(torch.autograd.Function):
    """``x.contiguous()`` whose gradient comes back in x's memory format (autograd's would be the copy's)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.memory_format = _format(x)
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous(memory_format=ctx.memory_format)


def _group_stats(x: Tensor, num_groups: int, eps: float) -> Tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(x.float().unflatten(1, (num_groups, -1)).flatten(2), dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)  # (B, G) fp32


def _plus_input_bias(x: Tensor, input_bias: Optional[Tensor]) -> Tensor:
    """x + input_bias[c] in x's dtype promoted to at least fp32 (x itself without an input bias)."""
    if input_bias is None:
        return x
    ct = torch.promote_types(x.dtype, torch.float32)
    return x.to(ct) + input_bias.to(ct)[(...,) + (None,) * (x.dim() - 2)]


# ---- backends: forward -> (y, mean, rstd); backward -> (dx, dweight, dbias, dscale, dshift) fp32 params


def _ref_forward(x, weight, bias, scale, shift, num_groups, eps, silu, moments=None, input_bias=None):
    xb = _plus_input_bias(x, input_bias)
    y = reference(xb, num_groups, weight, bias, eps, scale, shift, "silu" if silu else None).to(x.dtype)
    return (y.contiguous(memory_format=_format(x)), *_group_stats(xb, num_groups, eps))


def _ref_backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, silu, input_bias=None):
    """The analytic gradient in PyTorch ops (autograd is not available inside a custom op's backward)."""
    B, C = x.shape[:2]
    ct = torch.promote_types(x.dtype, torch.float32)
    gain = 1 + scale.to(ct) if scale is not None else x.new_ones((B, C), dtype=ct)  # (B, C)
    k = gain * weight.to(ct) if weight is not None else gain  # z = xhat * k + d
    d = gain * bias.to(ct) if bias is not None else torch.zeros_like(gain)
    if shift is not None:
        d = d + shift.to(ct)
    # unflatten / flatten, not reshape(B, ..., -1): an empty batch (B = 0) has no -1 to infer
    xb = _plus_input_bias(x, input_bias).to(ct).unflatten(1, (num_groups, -1)).flatten(2)  # (B, G, C/G * S)
    xhat = ((xb - mean[..., None]) * rstd[..., None]).unflatten(2, (C // num_groups, -1)).flatten(1, 2)  # (B, C, S)
    dz = dy.to(ct).flatten(2)
    if silu:
        z = xhat * k[..., None] + d[..., None]
        sg = torch.sigmoid(z)
        dz = dz * sg * (1 + z * (1 - sg))
    s1, s2 = dz.sum(-1), (dz * xhat).sum(-1)  # (B, C)
    n = xhat.shape[-1] * (C // num_groups)
    c1 = (k * s1).unflatten(1, (num_groups, -1)).sum(-1) / n  # (B, G)
    c2 = (k * s2).unflatten(1, (num_groups, -1)).sum(-1) / n
    expand = lambda t: t.repeat_interleave(C // num_groups, dim=1)[..., None]  # (B, G) -> (B, C, 1)
    dx = expand(rstd) * (dz * k[..., None] - expand(c1) - xhat * expand(c2))  # (B, C, S)
    dx_terms = None if input_bias is None else dx.sum(2)  # (B, C), from dx before it is rounded
    dx = dx.reshape(x.shape).to(x.dtype).contiguous(memory_format=_format(x))
    terms, dscale, dshift = _param_grads(s1, s2, weight, bias, scale, dx_terms)
    return dx, terms.float(), dscale.float(), dshift.float()


def _param_grads(s1: Tensor, s2: Tensor, weight, bias, scale,
                 dx_terms: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """From s1 = sum_s dz, s2 = sum_s dz * xhat (B, C): the per-sample terms (2, B, C) of dweight and
    dbias, with ``dx_terms`` (sum_s dx, (B, C), with an input bias) as a third row, and dscale, dshift
    (B, C)."""
    dscale = s2 * weight.float() if weight is not None else s2.clone()
    if bias is not None:
        dscale = dscale + s1 * bias.float()
    gain = 1 + scale.float() if scale is not None else 1.0  # (B, C)
    rows = [gain * s2, gain * s1] + ([] if dx_terms is None else [dx_terms])
    return torch.stack(rows), dscale, s1


def _small(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _triton_forward(x, weight, bias, scale, shift, num_groups, eps, silu, moments=None, input_bias=None):
    from mdm_fast.kernels import group_norm as kern

    return kern.forward(x, _small(weight), _small(bias), _small(scale), _small(shift), num_groups, eps, silu,
                        _is_channels_last(x), moments, _small(input_bias))


def _triton_backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, silu, input_bias=None):
    from mdm_fast.kernels import group_norm as kern

    w, b, sc, sh, xb = (_small(t) for t in (weight, bias, scale, shift, input_bias))
    dy = dy.contiguous(memory_format=_format(x))
    dx, dshift, dscale, gs = kern.backward(dy, x, w, b, sc, sh, mean, rstd, num_groups, silu, _is_channels_last(x),
                                           xb)
    return dx, gs, dscale, dshift  # the kernels wrote the per-sample terms of dweight, dbias (, dinput_bias)


# -- cuda (mdm_fast._C): raw pointers, fp32 parameters, the caller's stream

_CUDA_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CUDA_COEF_STRIDE = 8  # floats per (sample, channel) of the coefficient workspace (kCoefStride)


def _f32_ptr(t: Optional[Tensor]) -> Tuple[int, Optional[Tensor]]:
    if t is None:
        return 0, None
    t = t.float().contiguous()
    return t.data_ptr(), t  # keep the converted tensor alive across the launch


def _cuda_rows(S: int, channels_last: bool) -> int:
    return min(S, 1024 if channels_last else 4096)  # rows per partial-statistics block


def _cuda_forward(x, weight, bias, scale, shift, num_groups, eps, silu, moments=None, input_bias=None):
    from mdm_fast._ext import ext

    B, C, S = x.shape[0], x.shape[1], x[0, 0].numel()
    cl = _is_channels_last(x)
    rows = _cuda_rows(S, cl)
    nchunk = cdiv(S, rows)
    y = torch.empty_like(x)
    mean = torch.empty(B, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    pmean = torch.empty(B, nchunk, C, device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    coef = torch.empty(B, C, _CUDA_COEF_STRIDE, device=x.device, dtype=torch.float32)
    params = [_f32_ptr(t) for t in (weight, bias, scale, shift, input_bias)]
    ext.group_norm_fwd(x.data_ptr(), y.data_ptr(), *(p for p, _ in params), mean.data_ptr(), rstd.data_ptr(),
                       pmean.data_ptr(), pm2.data_ptr(), coef.data_ptr(), B, C, S, num_groups, rows, cl, float(eps),
                       silu, _CUDA_DTYPE[x.dtype], torch.cuda.current_stream(x.device).cuda_stream)
    return y, mean, rstd


def _cuda_backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, silu, input_bias=None):
    from mdm_fast._ext import ext

    B, C, S = x.shape[0], x.shape[1], x[0, 0].numel()
    cl = _is_channels_last(x)
    dy = dy.contiguous(memory_format=_format(x))
    rows = _cuda_rows(S, cl)
    nchunk = cdiv(S, rows)
    dx = torch.empty_like(x)
    f32 = dict(device=x.device, dtype=torch.float32)
    ps1, ps2 = torch.empty(B, nchunk, C, **f32), torch.empty(B, nchunk, C, **f32)
    s1, s2 = torch.empty(B, C, **f32), torch.empty(B, C, **f32)
    coef = torch.empty(B, C, _CUDA_COEF_STRIDE, **f32)
    params = [_f32_ptr(t) for t in (weight, bias, scale, shift, input_bias)]
    ext.group_norm_bwd(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), *(p for p, _ in params),
                       mean.data_ptr(), rstd.data_ptr(), ps1.data_ptr(), ps2.data_ptr(), s1.data_ptr(),
                       s2.data_ptr(), coef.data_ptr(), B, C, S, num_groups, rows, cl, silu,
                       _CUDA_DTYPE[x.dtype], torch.cuda.current_stream(x.device).cuda_stream)
    dx_terms = None if input_bias is None else dx.sum(dim=list(range(2, dx.dim())), dtype=torch.float32)
    return (dx, *_param_grads(s1, s2, weight, bias, scale, dx_terms))


_FORWARD: Dict[str, Callable] = {"ref": _ref_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD: Dict[str, Callable] = {"ref": _ref_backward, "triton": _triton_backward, "cuda": _cuda_backward}


# ---- custom ops ----------------------------------------------------------------------------


def _forward_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                  shift: Optional[Tensor], num_groups: int, eps: float, act: str, backend: str,
                  moments: Optional[Tensor] = None,
                  input_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y in x's dtype and memory format, mean/rstd (B, G) fp32 (of x + input_bias).
    act: "silu" or "none". moments: x's partial moments from its producer (the triton backend uses them,
    the others ignore them). input_bias: (C,) or None."""
    return _FORWARD[backend](x, weight, bias, scale, shift, num_groups, eps, act == "silu", moments, input_bias)


group_norm_act_fwd = torch.library.custom_op("mdm_fast::group_norm_act_fwd", mutates_args=())(_forward_impl)


@group_norm_act_fwd.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, act, backend, moments=None, input_bias=None):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   scale: Optional[Tensor], shift: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   num_groups: int, eps: float, act: str, backend: str,
                   input_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dparams, dscale, dshift): dparams (2, C) fp32 holds dweight and dbias, and dinput_bias as a
    third row with an input bias (dx summed over the batch and the pixels: from the unrounded fp32
    values on the ref and triton backends, from dx in x's dtype on the cuda one; dx is also the
    gradient of x + input_bias); dscale and dshift (B, C) in scale's and shift's
    dtypes (fp32 where absent: computed either way). The backends hand over the per-sample terms of
    dparams: one sum over the batch makes them."""
    dx, terms, dscale, dshift = _BACKWARD[backend](dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps,
                                                   act == "silu", input_bias)
    return dx, terms.sum(1), _in_dtype_of(dscale, scale), _in_dtype_of(dshift, shift)


def _in_dtype_of(g: Tensor, t: Optional[Tensor]) -> Tensor:
    return g if t is None else g.to(t.dtype)


group_norm_act_bwd = torch.library.custom_op("mdm_fast::group_norm_act_bwd", mutates_args=())(_backward_impl)


@group_norm_act_bwd.register_fake
def _(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, act, backend, input_bias=None):
    B, C = x.shape[:2]
    dparams = x.new_empty((2 if input_bias is None else 3, C), dtype=torch.float32)
    dscale, dshift = (x.new_empty((B, C), dtype=torch.float32 if t is None else t.dtype) for t in (scale, shift))
    return torch.empty_like(x), dparams, dscale, dshift


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, act, backend = inputs[:9]
    input_bias = inputs[10] if len(inputs) > 10 else None
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, input_bias, mean, rstd)
    ctx.config = (num_groups, eps, act, backend)
    dispatch.non_differentiable(ctx, mean, rstd)


def _grads(ctx, dy, backward: Callable) -> tuple:
    if dy is None:
        return (None,) * 11
    x, weight, bias, scale, shift, input_bias, mean, rstd = ctx.saved_tensors
    dx, dparams, dscale, dshift = backward(dy, x, weight, bias, scale, shift, mean, rstd, *ctx.config, input_bias)
    grads = [*dparams[:2], dscale, dshift]
    wanted = (weight, bias, scale, shift)
    dinput_bias = dparams[2].to(input_bias.dtype) if input_bias is not None and ctx.needs_input_grad[10] else None
    return (dx, *(g.to(t.dtype) if t is not None else None for g, t in zip(grads, wanted)), None, None, None, None,
            None, dinput_bias)


torch.library.register_autograd("mdm_fast::group_norm_act_fwd",
                                lambda ctx, dy, _dmean, _drstd: _grads(ctx, dy, group_norm_act_bwd),
                                setup_context=_setup_context)
_group_norm_act = dispatch.with_eager_path("GroupNormAct", group_norm_act_fwd, _forward_impl, _setup_context,
                                           lambda ctx, dy, _dmean, _drstd: _grads(ctx, dy, _backward_impl),
                                           first_order=True)


# ---- validation and backend reasons --------------------------------------------------------


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ---- the op that produces a norm's input and hands it its moments (concat_channels_for_norm)


def check_moments_groups(op: str, num_groups) -> None:
    """A producer's ``num_groups``: the group count of the norm that reads its output, 0 for no moments."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"{op}: num_groups must be an int >= 0 (0: no moments), got {num_groups!r}")


def no_moments(like: Tensor) -> Tensor:
    """What a producer's custom op returns for "no moments" (an empty fp32 tensor: custom ops return tensors)."""
    return like.new_empty((0,), dtype=torch.float32)


def moments_or_none(moments: Tensor) -> Optional[Tensor]:
    """A producer's moments output as its public function returns it: None for :func:`no_moments`."""
    return moments if moments.numel() else None


def _check_param(name: str, t: Optional[Tensor], shape: Tuple[int, ...], x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise ValueError(f"group_norm_act: {name} must be a Tensor of shape {shape} or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"group_norm_act: {name} must have shape {shape} (x is {tuple(x.shape)}), "
                         f"got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"group_norm_act: {name} must be float16, bfloat16, float32 or float64, "
                         f"got {_dtype_name(t.dtype)}")
    if t.device != x.device:
        raise ValueError(f"group_norm_act: {name} is on {t.device} but x is on {x.device}")


def _check(x, num_groups, weight, bias, eps, scale, shift, act, input_bias) -> None:
    if not isinstance(x, Tensor) or x.dim() not in (4, 5):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"group_norm_act: x must be (B, C, H, W) or (B, C, T, H, W), got {got}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"group_norm_act: x must be float16, bfloat16 or float32 (float64 on the ref backend), "
                         f"got {_dtype_name(x.dtype)}")
    B, C = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm_act: num_groups must be a positive int dividing the {C} channels, "
                         f"got {num_groups!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"group_norm_act: eps must be a non-negative float, got {eps!r}")
    if act not in _ACTS:
        raise ValueError(f"group_norm_act: act must be 'silu' or None, got {act!r}")
    _check_param("weight", weight, (C,), x)
    _check_param("bias", bias, (C,), x)
    _check_param("scale", scale, (B, C), x)
    _check_param("shift", shift, (B, C), x)
    _check_param("input_bias", input_bias, (C,), x)


def _ref_reason(x, *params) -> Optional[str]:
    return None


def _triton_reason(x, *params) -> Optional[str]:
    return dispatch.first_reason(dispatch.triton_reason(x, *params),
                                 dispatch.dtype_reason(_FAST_DTYPES, x, *params))


def _cuda_reason(x, *params) -> Optional[str]:
    if x.device.type != "cuda":
        return f"no CUDA device: x is on {x.device.type} (the cuda backend needs CUDA tensors)"
    from mdm_fast import _ext

    if _ext.ext is not None and not hasattr(_ext.ext, "group_norm_fwd"):
        return "mdm_fast._C was built without the group_norm kernels; reinstall the package"
    return dispatch.first_reason(dispatch.cuda_ext_reason(x, *params),
                                 dispatch.dtype_reason(_FAST_DTYPES, x, *params))


# Preference: triton first (its fused single-pass path covers most of the model's groups in one launch);
# the cuda backend always runs the split three-pass path. Revisit with benchmarks/group_norm.py.
dispatch.register(OP, {"ref": _ref_reason, "triton": _triton_reason, "cuda": _cuda_reason},
                  preference=["triton", "cuda", "ref"])


# ---- the public function -------------------------------------------------------------------


def _plain_reference(x, num_groups, weight, bias, eps, scale, shift, act, input_bias) -> Tensor:
    """The ref backend outside torch.compile: the public formula in fp32 (fp64 kept) with PyTorch's own
    kernels and autograd, which on a CPU is faster than the custom op's formula-by-formula backward.
    Under torch.compile the custom op (same numbers, traceable) runs instead."""
    acc = dispatch.accumulation_dtype(x.dtype)
    up = [None if t is None else t.to(acc) for t in (x, weight, bias, scale, shift)]
    if x.device.type == "cpu" and _is_channels_last(x):
        # PyTorch's CPU group-norm backward crashes (SIGSEGV, torch 2.13) on channels_last x when x's gradient
        # is not wanted but the weights' are
        up[0] = _DenseCopy.apply(up[0])
    y = reference(_plus_input_bias(up[0], input_bias), num_groups, up[1], up[2], eps, up[3], up[4], act)
    return y.to(x.dtype).contiguous(memory_format=_format(x))


def group_norm_act(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float = 1e-5, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                   act: Optional[str] = "silu", impl: str = "auto", moments: Optional[Tensor] = None,
                   input_bias: Optional[Tensor] = None) -> Tensor:
    """``act(group_norm(x + input_bias[c], num_groups, weight, bias, eps) * (1 + scale) + shift)``.

    x: (B, C, H, W) or (B, C, T, H, W) fp16/bf16/fp32, NCHW or channels_last (kept in the output); 5-D x
    is normalised per frame, with each sample's scale and shift for all its frames.
    weight, bias, input_bias: (C,) or None. scale, shift: (B, C) or None. act: "silu" or None.
    impl: "auto", "ref", "triton" or "cuda" (see :mod:`mdm_fast.ops.dispatch`).
    moments: x's partial moments from the op that produced x (``concat_channels_for_norm``), or None;
    the triton backend then skips its statistics pass, the others ignore them.
    """
    _check(x, num_groups, weight, bias, eps, scale, shift, act, input_bias)
    if x.dim() == 5:  # frames in the batch; moments are a channels_last 4-D producer's
        # resolved on x itself: an explicit backend that cannot run names x's shape, not the folded one
        backend = dispatch.resolve(OP, impl, x, weight, bias, scale, shift, input_bias)
        return _on_frames(group_norm_act, x, num_groups, weight, bias, eps, scale=scale, shift=shift, act=act,
                          impl=backend, input_bias=input_bias)
    if moments is not None and (not isinstance(moments, Tensor) or moments.dtype != torch.float32
                                or moments.dim() != 4 or tuple(moments.shape[1:4:2]) != tuple(x.shape[:2])):
        got = f"{tuple(moments.shape)} {moments.dtype}" if isinstance(moments, Tensor) else type(moments).__name__
        raise ValueError(f"group_norm_act: moments must be None or a (2, {x.shape[0]}, parts, {x.shape[1]}) float32 "
                         f"tensor from x's producer, got {got}")
    if not (x.is_contiguous() or _is_channels_last(x)):
        x, moments = x.contiguous(), None  # (a producer's moments follow its dense layout)
    backend = dispatch.resolve(OP, impl, x, weight, bias, scale, shift, input_bias)
    if backend == "ref" and not torch.compiler.is_compiling():
        return _plain_reference(x, num_groups, weight, bias, eps, scale, shift, act, input_bias)
    return _group_norm_act(x, weight, bias, scale, shift, num_groups, float(eps), act or "none", backend,
                           moments, input_bias)[0]
