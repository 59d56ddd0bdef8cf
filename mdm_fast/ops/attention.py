"""Attention of MDM's blocks: self-attention plus key-masked cross-attention on the same queries.

    attention(q, k, v, k_cond, v_cond, cond_mask) =
        softmax(q k^T * scale) v + softmax(q k_cond^T * scale, cond_mask) v_cond

the sum the public ``SelfAttention`` computes (its 1/sqrt(sqrt(d)) on q and k is scale = 1/sqrt(d)).
Backends: ``triton`` (one fused flash kernel, :mod:`mdm_fast.kernels.attention`), ``sdpa`` (two
``F.scaled_dot_product_attention`` calls and a sum), ``flash_attn`` / ``xformers`` (that library's
kernel for the unmasked self branch, SDPA for a key-masked text branch; when installed) and ``ref``
(the public einsum formulation, softmax in fp32, fp64 for fp64; the kernels take fp16/bf16/fp32,
sdpa and ref also fp64). ``impl="auto"`` follows the measured order in the
``dispatch.register`` call below.

Masked keys: a query whose keys in a branch are all masked gets ZERO from that branch (the public
code gives NaN there), with finite gradients.

:func:`attention_from_qkv` is the layout-fused form for the 2-D block: it reads q, k, v straight
from the 1x1 qkv conv's output (B, 3C, L) and the text keys/values from the ``kv_cond`` Linear's
output (B, T, 2C), and returns (B, C, L), the layout ``proj_out`` reads; no transposes around it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mdm_fast.ops import dispatch

OP = "attention"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # the kernels'
_DTYPES = _FLOATS + (torch.float64,)  # float64: the ref and sdpa backends
_TRITON_MAX_HEAD_DIM = 128  # the triton kernel keeps one (padded) head row in registers


# ---- backends ------------------------------------------------------------------------------


def _ref_branch(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], scale: float) -> Tensor:
    """Public formulation: einsum scores, softmax in fp32 (or fp64) cast back, einsum with v; (B, H, L, d)."""
    s = math.sqrt(scale)  # applied to q and k separately, as the public code does (fp16 range)
    w = torch.einsum("bhld,bhsd->bhls", q * s, k * s)
    if keep is not None:
        any_key = keep.any(-1)  # (B,)
        w = w.masked_fill(~(keep | ~any_key[:, None])[:, None, None, :], float("-inf"))
    w = torch.softmax(w.to(dispatch.accumulation_dtype(w.dtype)), dim=-1).to(q.dtype)
    out = torch.einsum("bhls,bhsd->bhld", w, v)
    return out if keep is None else out * any_key[:, None, None, None]


def _sdpa_branch(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], scale: float) -> Tensor:
    if keep is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    any_key = keep.any(-1)  # (B,); rows of all-masked batches attend everywhere, then are zeroed
    mask = (keep | ~any_key[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out * any_key[:, None, None, None].to(out.dtype)


def _flash_attn_branch(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], scale: float) -> Tensor:
    """flash-attn's ``flash_attn_func`` on (B, L, H, d) views; unmasked keys only (see _LIBRARY_BRANCH)."""
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return out.transpose(1, 2)  # (B, H, L, d)


def _xformers_branch(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], scale: float) -> Tensor:
    """xformers' ``memory_efficient_attention`` on (B, L, H, d) views; unmasked keys only."""
    from xformers.ops import memory_efficient_attention

    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)  # (B, H, L, d)


_BRANCH = {"ref": _ref_branch, "sdpa": _sdpa_branch, "flash_attn": _flash_attn_branch,
           "xformers": _xformers_branch}
# flash_attn / xformers run the unmasked self branch (the L x L one: nearly all the FLOPs); a key-masked
# branch (the text tokens, <= 128 keys) goes to SDPA: neither library takes a per-sample key padding mask
# without packing the keys, which synchronises the host and breaks CUDA-graph capture.
_LIBRARY_BRANCH = ("flash_attn", "xformers")


def _torch_attention(backend, q, k, v, k_cond, v_cond, cond_mask, self_mask, scale) -> Tensor:
    branch = _BRANCH[backend]
    out = branch(q, k, v, self_mask, scale)
    if k_cond is not None:
        text = _BRANCH["sdpa"] if backend in _LIBRARY_BRANCH and cond_mask is not None else branch
        out = out + text(q, k_cond, v_cond, cond_mask, scale)
    return out


# ---- triton backend: custom ops on (B, H, L, d) tensors -----------------------------------------
# ref and sdpa are plain differentiable PyTorch (torch.compile traces them as they are); the
# triton kernels sit behind forward and backward custom ops so torch.compile and CUDA graphs treat
# each as one opaque call.


def _kernels():
    from mdm_fast.kernels import attention  # imports triton: only when the triton backend runs

    return attention



def _lse_like(q: Tensor) -> Tensor:
    return q.new_empty((2, *q.shape[:3]), dtype=torch.float32)  # (2, B, H, L): both branches


def _attention_fwd_impl(q: Tensor, k: Tensor, v: Tensor, k_cond: Optional[Tensor], v_cond: Optional[Tensor],
                   cond_mask: Optional[Tensor], self_mask: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = _kernels().forward(q, k, v, k_cond, v_cond, cond_mask, self_mask, scale, out)
    return out, lse


_attention_fwd = torch.library.custom_op("mdm_fast::attention_fwd", mutates_args=())(_attention_fwd_impl)


@_attention_fwd.register_fake
def _(q, k, v, k_cond, v_cond, cond_mask, self_mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), _lse_like(q)


def _attention_bwd_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_cond: Optional[Tensor],
                   v_cond: Optional[Tensor], cond_mask: Optional[Tensor], self_mask: Optional[Tensor],
                   out: Tensor, lse: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _grad_buffers(q, k, v, k_cond, v_cond)
    _kernels().backward(grad_out, q, k, v, k_cond, v_cond, cond_mask, self_mask, out, lse, scale, *grads)
    return tuple(g if g is not None else q.new_empty((0,)) for g in grads)


_attention_bwd = torch.library.custom_op("mdm_fast::attention_bwd", mutates_args=())(_attention_bwd_impl)


def _grad_buffers(q, k, v, k_cond, v_cond):
    return [None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (q, k, v, k_cond, v_cond)]


@_attention_bwd.register_fake
def _(grad_out, q, k, v, k_cond, v_cond, cond_mask, self_mask, out, lse, scale):
    return tuple(g if g is not None else q.new_empty((0,)) for g in _grad_buffers(q, k, v, k_cond, v_cond))


def _attention_setup(ctx, inputs, output):
    q, k, v, k_cond, v_cond, cond_mask, self_mask, scale = inputs
    out, lse = output
    dispatch.non_differentiable(ctx, lse)
    ctx.save_for_backward(q, k, v, k_cond, v_cond, cond_mask, self_mask, out, lse)
    ctx.scale = scale


def _attention_grad(ctx, grad_out, backward: Callable) -> tuple:
    if grad_out is None:
        return (None,) * 8
    q, k, v, k_cond, v_cond, cond_mask, self_mask, out, lse = ctx.saved_tensors
    dq, dk, dv, dkc, dvc = backward(grad_out, q, k, v, k_cond, v_cond, cond_mask, self_mask, out, lse, ctx.scale)
    has_cond = k_cond is not None
    return dq, dk, dv, dkc if has_cond else None, dvc if has_cond else None, None, None, None


_attention_fwd.register_autograd(lambda ctx, grad_out, _glse: _attention_grad(ctx, grad_out, _attention_bwd),
                                 setup_context=_attention_setup)
_attention = dispatch.with_eager_path(
    "Attention", _attention_fwd, _attention_fwd_impl, _attention_setup,
    lambda ctx, grad_out, _glse: _attention_grad(ctx, grad_out, _attention_bwd_impl), first_order=True)


# ---- layout-fused custom ops: qkv (B, 3C, L), kv_cond (B, T, 2C) -> (B, C, L) ------------------


def _qkv_views(qkv: Tensor, heads: int):
    """q, k, v as (B, H, L, d) views of the qkv conv output (B, 3C, L); channel = head * d + i."""
    return [t.unflatten(1, (heads, -1)).transpose(2, 3) for t in qkv.chunk(3, dim=1)]


def _kv_views(kv_cond: Optional[Tensor], heads: int):
    """k_cond, v_cond as (B, H, T, d) views of the kv_cond Linear output (B, T, 2C)."""
    if kv_cond is None:
        return None, None
    return [t.unflatten(2, (heads, -1)).transpose(1, 2) for t in kv_cond.chunk(2, dim=-1)]


def _out_view(out: Tensor, heads: int) -> Tensor:
    return out.unflatten(1, (heads, -1)).transpose(2, 3)  # (B, C, L) -> (B, H, L, d)


def _token_major(qkv: Tensor) -> bool:
    """True when the channels of (B, 3C, L) are contiguous (the qkv conv ran channels_last)."""
    return qkv.stride(1) == 1 and qkv.shape[2] > 1


def _qkv_out(qkv: Tensor) -> Tensor:
    """(B, C, L) in qkv's layout, so that proj_out reads what its conv wants (NCHW or channels_last)."""
    B, C3, L = qkv.shape
    if _token_major(qkv):
        return qkv.new_empty((B, L, C3 // 3)).transpose(1, 2)
    return qkv.new_empty((B, C3 // 3, L))


def _dkv_like(qkv: Tensor, kv_cond: Optional[Tensor]) -> Tensor:
    if kv_cond is None:
        return qkv.new_empty((0,))
    return torch.empty_like(kv_cond, memory_format=torch.contiguous_format)


def _attention_qkv_fwd_impl(qkv: Tensor, kv_cond: Optional[Tensor], cond_mask: Optional[Tensor], heads: int,
                       scale: float) -> Tuple[Tensor, Tensor]:
    out = _qkv_out(qkv)
    lse = _kernels().forward(*_qkv_views(qkv, heads), *_kv_views(kv_cond, heads), cond_mask, None, scale,
                             _out_view(out, heads))
    return out, lse


_attention_qkv_fwd = torch.library.custom_op("mdm_fast::attention_qkv_fwd", mutates_args=())(_attention_qkv_fwd_impl)


@_attention_qkv_fwd.register_fake
def _(qkv, kv_cond, cond_mask, heads, scale):
    return _qkv_out(qkv), _lse_like(_qkv_views(qkv, heads)[0])


def _attention_qkv_bwd_impl(grad_out: Tensor, qkv: Tensor, kv_cond: Optional[Tensor], cond_mask: Optional[Tensor],
                       out: Tensor, lse: Tensor, heads: int, scale: float) -> Tuple[Tensor, Tensor]:
    dqkv = torch.empty_like(qkv)  # qkv's layout: the qkv conv's backward reads it
    dkv = _dkv_like(qkv, kv_cond)
    grads = [*_qkv_views(dqkv, heads), *_kv_views(None if kv_cond is None else dkv, heads)]
    _kernels().backward(_out_view(grad_out, heads), *_qkv_views(qkv, heads), *_kv_views(kv_cond, heads),
                        cond_mask, None, _out_view(out, heads), lse, scale, *grads)
    return dqkv, dkv


_attention_qkv_bwd = torch.library.custom_op("mdm_fast::attention_qkv_bwd", mutates_args=())(_attention_qkv_bwd_impl)


@_attention_qkv_bwd.register_fake
def _(grad_out, qkv, kv_cond, cond_mask, out, lse, heads, scale):
    return torch.empty_like(qkv), _dkv_like(qkv, kv_cond)


def _attention_qkv_setup(ctx, inputs, output):
    qkv, kv_cond, cond_mask, heads, scale = inputs
    out, lse = output
    dispatch.non_differentiable(ctx, lse)
    ctx.save_for_backward(qkv, kv_cond, cond_mask, out, lse)
    ctx.heads, ctx.scale = heads, scale


def _attention_qkv_grad(ctx, grad_out, backward: Callable) -> tuple:
    if grad_out is None:
        return (None,) * 5
    qkv, kv_cond, cond_mask, out, lse = ctx.saved_tensors
    dqkv, dkv = backward(grad_out, qkv, kv_cond, cond_mask, out, lse, ctx.heads, ctx.scale)
    return dqkv, dkv if kv_cond is not None else None, None, None, None


_attention_qkv_fwd.register_autograd(
    lambda ctx, grad_out, _glse: _attention_qkv_grad(ctx, grad_out, _attention_qkv_bwd),
    setup_context=_attention_qkv_setup)
_attention_qkv = dispatch.with_eager_path(
    "AttentionQKV", _attention_qkv_fwd, _attention_qkv_fwd_impl, _attention_qkv_setup,
    lambda ctx, grad_out, _glse: _attention_qkv_grad(ctx, grad_out, _attention_qkv_bwd_impl), first_order=True)


# ---- dispatch ------------------------------------------------------------------------------


def _triton_reason(q, k, v, k_cond=None, v_cond=None, self_mask=None) -> Optional[str]:
    return dispatch.first_reason(
        dispatch.triton_reason(q, k, v, k_cond, v_cond),
        dispatch.dtype_reason(_FLOATS, q),
        None if q.shape[-1] <= _TRITON_MAX_HEAD_DIM
        else f"head dim {q.shape[-1]} > {_TRITON_MAX_HEAD_DIM} (the triton kernel keeps a head in registers)",
    )


def _library_reason(package: str, dtypes: Tuple[torch.dtype, ...], max_head_dim: int):
    def reason(q, k=None, v=None, k_cond=None, v_cond=None, self_mask=None) -> Optional[str]:
        return dispatch.first_reason(
            dispatch.package_reason(package, q, k, v, k_cond, v_cond),
            dispatch.dtype_reason(dtypes, q),
            None if q.shape[-1] <= max_head_dim and q.shape[-1] % 8 == 0
            else f"head dim {q.shape[-1]} (needs a multiple of 8, at most {max_head_dim})",
            None if self_mask is None else f"a key mask on the self branch ({package} gets unmasked keys here)",
        )

    return reason


# Measured on an H200 (benchmarks/results/attention-nvidia-h200.md, bf16, GPU time): the fused Triton
# kernel beats the SDPA pair's forward (1.35x at 1024 tokens, 1.63x at 256) and reads the public layout
# in place, where SDPA needs head-dim-contiguous copies; its backward is 0.86x the pair's. auto picks
# Triton, then SDPA. flash_attn and xformers (not installed on any machine measured so far) run when asked
# for by name.
dispatch.register(
    OP,
    {"ref": lambda *a, **k: None, "sdpa": lambda *a, **k: None, "triton": _triton_reason,
     "flash_attn": _library_reason("flash_attn", (torch.float16, torch.bfloat16), 256),
     "xformers": _library_reason("xformers", _FLOATS, 256)},
    preference=("triton", "sdpa", "ref"),
)


# ---- validation and public functions ---------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def _check_tensor(name: str, t: Tensor, shape: Sequence[Optional[int]], what: str, ref: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor of shape {what}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {what}, got {_shape(t)}")
    if t.dtype != ref.dtype or t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64 like q ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but q is on {ref.device}")


def _check_mask(name: str, mask: Tensor, shape: Tuple[int, int], what: str, ref: Tensor) -> Tensor:
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        got = _shape(mask) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must have shape {what} = {shape} (nonzero = keep), got {got}")
    if mask.is_complex():
        raise ValueError(f"{name} must be bool, integer or float, got {mask.dtype}")
    if mask.device != ref.device:
        raise ValueError(f"{name} is on {mask.device} but q is on {ref.device}")
    return mask if mask.dtype == torch.bool else mask != 0  # (B, keys) bool


def _check_cond(q, k_cond, v_cond, cond_mask):
    B, H, _, d = q.shape
    if (k_cond is None) != (v_cond is None):
        raise ValueError("k_cond and v_cond must be given together (or both None)")
    if k_cond is None:
        if cond_mask is not None:
            raise ValueError("cond_mask given without k_cond / v_cond")
        return None
    _check_tensor("k_cond", k_cond, (B, H, None, d), "(B, heads, T, d) matching q", q)
    T = k_cond.shape[2]
    _check_tensor("v_cond", v_cond, (B, H, T, d), "(B, heads, T, d) like k_cond", q)
    if T == 0:
        raise ValueError("k_cond has T = 0 text tokens; pass k_cond=None for no text branch")
    return None if cond_mask is None else _check_mask("cond_mask", cond_mask, (B, T), "(B, T)", q)


def _scale(scale: Optional[float], d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if not math.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"scale must be a finite float > 0, got {scale}")
    return float(scale)


def attention(q: Tensor, k: Tensor, v: Tensor, k_cond: Optional[Tensor] = None, v_cond: Optional[Tensor] = None,
              cond_mask: Optional[Tensor] = None, scale: Optional[float] = None, impl: str = "auto",
              self_mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T * scale) v + softmax(q k_cond^T * scale, cond_mask) v_cond, shape (B, heads, L, d).

    q (B, heads, L, d); k, v (B, heads, S, d) (S = L for self-attention); k_cond, v_cond
    (B, heads, T, d) or None (plain self-attention); cond_mask (B, T), nonzero = keep (bool, int or
    float); self_mask (B, S), nonzero = keep, masks the self branch's keys (the 1-D attention of
    the LM head); scale defaults to 1/sqrt(d). q, k, v, k_cond, v_cond share one dtype (float16,
    bfloat16, float32, or float64 on the sdpa and ref backends) and device; any strides.

    A query whose keys in a branch are ALL masked gets zero from that branch (the public code
    gives NaN), and finite gradients.
    """
    if not isinstance(q, Tensor) or q.dim() != 4 or q.dtype not in _DTYPES or q.shape[3] == 0:
        got = f"{_shape(q)} {q.dtype}" if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"q must be a (B, heads, L, d) float16/bfloat16/float32/float64 tensor with d >= 1, "
                         f"got {got}")
    B, H, _, d = q.shape
    _check_tensor("k", k, (B, H, None, d), "(B, heads, S, d) matching q", q)
    _check_tensor("v", v, tuple(k.shape), "(B, heads, S, d) like k", q)
    if k.shape[2] == 0:
        raise ValueError("k has no keys (S = 0)")
    keep_cond = _check_cond(q, k_cond, v_cond, cond_mask)
    keep_self = None if self_mask is None else _check_mask("self_mask", self_mask, (B, k.shape[2]), "(B, S)", q)
    backend = dispatch.resolve(OP, impl, q, k, v, k_cond, v_cond, self_mask=keep_self)
    if backend != "triton":
        return _torch_attention(backend, q, k, v, k_cond, v_cond, keep_cond, keep_self, _scale(scale, d))
    out, _ = _attention(q, k, v, k_cond, v_cond, keep_cond, keep_self, _scale(scale, d))
    return out


def attention_from_qkv(qkv: Tensor, kv_cond: Optional[Tensor], cond_mask: Optional[Tensor], heads: int,
                       scale: Optional[float] = None, impl: str = "auto") -> Tensor:
    """The 2-D block's attention straight from its projections; returns (B, C, L).

    qkv (B, 3C, L): the 1x1 qkv conv output flattened over pixels, split as q, k, v =
    qkv.chunk(3, dim=1), each channel c = head * d + i. kv_cond (B, T, 2C) or None: the
    ``kv_cond`` Linear output, k_cond, v_cond = kv_cond.chunk(2, dim=-1) with the same channel
    order. cond_mask (B, T) nonzero = keep. Same result as :func:`attention` on those views
    (including the all-masked-row rule), in qkv's layout (channel- or token-major) for ``proj_out``.
    """
    if not isinstance(qkv, Tensor) or qkv.dim() != 3 or qkv.dtype not in _DTYPES:
        got = f"{_shape(qkv)} {qkv.dtype}" if isinstance(qkv, Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must be a (B, 3*C, L) float16/bfloat16/float32/float64 tensor, got {got}")
    B, C3, L = qkv.shape
    if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or C3 % (3 * heads) != 0:
        raise ValueError(f"qkv has {C3} channels: expected 3 * C with C divisible by heads={heads}")
    C = C3 // 3
    q, k, v = _qkv_views(qkv, heads)
    if kv_cond is not None:
        _check_tensor("kv_cond", kv_cond, (B, None, 2 * C), f"(B, T, 2*C) = ({B}, T, {2 * C})", qkv)
        if kv_cond.shape[1] == 0:
            raise ValueError("kv_cond has T = 0 text tokens; pass kv_cond=None for no text branch")
    k_cond, v_cond = _kv_views(kv_cond, heads)
    keep_cond = _check_cond(q, k_cond, v_cond, cond_mask)
    backend = dispatch.resolve(OP, impl, q, k, v, k_cond, v_cond)
    if backend != "triton":
        if not _token_major(qkv):  # SDPA's fused kernels need the head dim contiguous (else: its fp32 math path)
            q, k, v = _qkv_views(qkv.transpose(1, 2).contiguous().transpose(1, 2), heads)
        out = _torch_attention(backend, q, k, v, k_cond, v_cond, keep_cond, None, _scale(scale, C // heads))
        if _token_major(qkv):  # (B, H, L, d) -> (B, C, L) in qkv's layout
            return out.transpose(1, 2).reshape(B, L, C).transpose(1, 2)
        return out.transpose(2, 3).reshape(B, C, L).contiguous()
    out, _ = _attention_qkv(qkv, kv_cond, keep_cond, heads, _scale(scale, C // heads))
    return out
