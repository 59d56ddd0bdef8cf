"""The fast NestedUNet: the reference modules with forwards built from the fused ops.

Each fast class subclasses its reference class and only overrides ``forward`` (or one stage), so a
fast model has exactly the reference's parameters, buffers and state_dict: public checkpoints
load unchanged, and :func:`optimize` converts a reference model in place by swapping classes.

What changes on the hot path:
- ``silu(group_norm(x))``, ``silu(group_norm(h) * (1 + a) + b)`` and the attention/FFN norms are
  one fused op each (:func:`mdm_fast.ops.group_norm_act`);
- all ResNet time projections of a level are one GEMM per step: the level's time embedding is
  replaced by the concatenated projections ``P = silu(temb) @ W_cat^T + b_cat`` (B, sum 2C), and
  each ResNet reads its (scale, shift) columns; blocks that only need the batch size of ``temb``
  (temporal attention) see the same batch;
- attention reads q, k, v straight from the qkv conv's output and writes what proj_out reads
  (:func:`mdm_fast.ops.attention_from_qkv`); a query whose text keys are all masked gets zero from
  the text branch where the public code gives NaN; the 1-D attention of the LM head and of the
  temporal blocks runs the same op (:class:`FastSelfAttention1D`);
- when sampling, every attention layer's text keys and values come from one LayerNorm and one GEMM
  per forward (:mod:`mdm_fast.models.text_kv`);
- a 1x1 conv on channels_last activations is a GEMM with the bias in its epilogue (:class:`FastConv2d`);
  a ResNet's 3x3 convs run without bias, added by :func:`mdm_fast.ops.bias_add` (with the skip after conv2);
- nearest-2x upsampling + 3x3 conv is the sub-pixel conv (:func:`mdm_fast.ops.upsample_conv3x3`);
- the nesting adapters are fused steps without materialised zero padding;
- in training, a norm's output (and the attention FFN's GELU output) is not kept for the convolution
  that reads it but recomputed in backward (:func:`set_norm_recompute`, on by default): the same
  gradients, about 30% less activation memory.
There is no host synchronisation in ``forward``: checks use shapes only.
"""
from __future__ import annotations

import copy
import functools
import threading
import weakref
from typing import Callable, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mdm_fast import ops
from mdm_fast.models.tensors import is_sharded, same_view
from mdm_fast.models.text_kv import batched_text_kv, text_kv
from mdm_fast.ops.dispatch import impl_for
from mdm_fast.ops.time_proj import TimeProjections, found_once
from mdm_fast.reference.layers import ResNet, ResNetBlock, SelfAttention, SelfAttention1D, repeat_to_batch
from mdm_fast.reference.unet import NestedUNet, UNet


def _w(p: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """A parameter in the activation's dtype (autocast does this for torch ops, not custom ops)."""
    return None if p is None else p.to(like.dtype)


def _impl(module: nn.Module, op: str) -> str:
    """The module's backend preference for ``op`` (see :func:`mdm_fast.ops.dispatch.impl_for`)."""
    return impl_for(op, getattr(module, "impl", "auto"))


_local = threading.local()  # in_checkpoint: inside a checkpointed block, which recomputes everything anyway


class _Recompute:
    """What autograd keeps instead of a norm's output: how to compute it again."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn = fn


def _recompute_wanted(module: nn.Module) -> bool:
    # is_compiling first: under torch.compile this is a constant and nothing else is traced
    return (not torch.compiler.is_compiling() and getattr(module, "recompute_norms", False)
            and torch.is_grad_enabled() and not getattr(_local, "in_checkpoint", False))


def _recomputed_input(module: nn.Module, produce: Callable[[], torch.Tensor],
                      consumer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``consumer(produce())``, where the layer that consumes ``produce()``'s output keeps, for its
    backward, not that output but ``produce`` itself (a saved-tensor hook), and backward calls it again.
    ``produce`` must be cheap, deterministic (the same bits again) and bind its inputs, which autograd
    keeps anyway (a norm's input, an activation's input). Only in training with
    ``module.recompute_norms`` set (the default), and not inside a checkpointed block or torch.compile."""
    y = produce()
    if not (_recompute_wanted(module) and y.requires_grad):
        return consumer(y)
    # autograd's views of views all have the root as _base. A weak reference: autograd keeps this hook
    # with every tensor it saves, and a strong one would keep y alive until backward (5.3 GB more at the
    # 256x256 model's train step, batch 16, bf16)
    root = weakref.ref(y if y._base is None else y._base)
    dtype, offset = y.dtype, y.storage_offset()

    def pack(t: torch.Tensor):
        # y, or a view of it (a 1x1 conv run as a GEMM saves y's (B*H*W, C) view): kept as its geometry
        r = root()
        if r is None or not (t is r or t._base is r) or t.dtype != dtype:
            return t
        view = (tuple(t.shape), t.stride(), t.storage_offset() - offset)
        return _Recompute(functools.partial(_again, produce, view))

    def unpack(p):
        return p.fn() if isinstance(p, _Recompute) else p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return consumer(y)


def _again(produce: Callable[[], torch.Tensor], view) -> torch.Tensor:
    """``produce()`` computed again (the same bits and layout), seen as the saved ``view`` of it."""
    shape, stride, offset = view
    with torch.no_grad():
        y = produce()
    return y.as_strided(shape, stride, y.storage_offset() + offset)


def _norm_then(module: nn.Module, consumer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               norm: nn.GroupNorm, **kwargs) -> torch.Tensor:
    """``consumer(group_norm_act(x, norm's parameters, **kwargs))`` with the norm's output recomputed in
    backward (:func:`_recomputed_input`; the norm's own backward keeps only x): a ResNet keeps x and h
    instead of x, norm1(x), h and norm2(h)."""
    impl = _impl(module, "group_norm_act")
    if not _recompute_wanted(module):
        return consumer(ops.group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, impl=impl,
                                           **kwargs))
    # the backend is fixed now: backward may run on another thread, where use_impl() does not apply
    impl = ops.dispatch.resolve("group_norm_act", impl, x, norm.weight, norm.bias, kwargs.get("scale"),
                                kwargs.get("shift"), kwargs.get("input_bias"))
    return _recomputed_input(module, functools.partial(ops.group_norm_act, x, norm.num_groups, norm.weight,
                                                       norm.bias, norm.eps, impl=impl, **kwargs), consumer)


def _without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` without its bias (the caller adds it, see :func:`mdm_fast.ops.bias_add`)."""
    return conv._conv_forward(x, conv.weight, None)


class FastConv2d(nn.Conv2d):
    """A 1x1 convolution on a channels_last input runs as the GEMM it is, over the (B*H*W, C) view, with
    the bias added in the GEMM's epilogue: cuDNN adds a convolution's bias in a separate broadcast pass
    (on an H200 the 256x256 forward at batch 32 spent 18 ms of 78 in those passes, 145 of its 212
    convolutions being 1x1: benchmarks/results/profile-256-forward-b32-nvidia-h200-66b5828.md). Any other
    convolution, or input layout, runs as nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._is_pointwise(x):
            return super().forward(x)
        y = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)  # (B, H, W, Cout)
        return y.permute(0, 3, 1, 2)  # (B, Cout, H, W), channels_last

    def _is_pointwise(self, x: torch.Tensor) -> bool:
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding in ((0, 0), "valid")
                and self.dilation == (1, 1) and self.groups == 1 and x.dim() == 4
                and x.is_contiguous(memory_format=torch.channels_last))


class FastResNet(ResNet):
    recompute_norms = True  # see set_norm_recompute
    fp32_params = ("conv1.bias", "conv2.bias")  # read by norm2 and ops.bias_add as they are (CastWeights)
    # first column of this block's (scale, shift) in the level's batched projections; None: the level
    # passes the time embedding itself and the block projects it (FSDP-sharded weights)
    proj_offset: Optional[int] = None

    def forward(self, x: torch.Tensor, proj: torch.Tensor,
                input_moments: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_moments: x's partial moments from the op that produced it (the up path's concatenation,
        ``ops.concat_channels_for_norm``), which norm1 then does not compute again; None: norm1 does."""
        # the 3x3 convolutions run without their bias: norm2 adds conv1's to what it reads (no pass writes
        # the sum), ops.bias_add adds conv2's in one vectorised pass with the skip (the public h + x)
        h = _norm_then(self, functools.partial(_without_bias, self.conv1), x, self.norm1, moments=input_moments)
        ta, tb = self._scale_shift(proj)
        ta, tb = repeat_to_batch(ta, h.size(0)), repeat_to_batch(tb, h.size(0))  # (B, C)
        h = _norm_then(self, lambda y: _without_bias(self.conv2, self.dropout(y)), h, self.norm2, scale=ta,
                       shift=tb, input_bias=self.conv1.bias)
        if self.config.output_channels != self.config.num_channels:
            x = self.conv3(x)
        fused = x.dtype == h.dtype and x.stride() == h.stride()  # else type promotion or mixed layouts, as h + x
        out = ops.bias_add(h, self.conv2.bias, residual=x if fused else None, impl=_impl(self, "bias_add"))
        return out if fused else out + x

    def _scale_shift(self, proj: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """This block's (scale, shift) columns of the level's projections (its own projection of the time
        embedding when ``proj_offset`` is None); the split the level made when gradients flow
        (:meth:`FastUNetMixin.time_embedding`), if it is of this ``proj`` (or a view of all of it). A compiled
        forward makes no split (and torch 2.11's dynamo cannot trace the module ``__dict__``'s ``pop``)."""
        split = None if torch.compiler.is_compiling() else self.__dict__.pop("_split_proj", None)
        if split is not None and same_view(split[0], proj):
            return split[1], split[2]
        c, off = self.config.output_channels, self.proj_offset
        if off is None:
            proj, off = self.time_layer(F.silu(proj)), 0
        return proj[:, off:off + c], proj[:, off + c:off + 2 * c]


class FastSelfAttention(SelfAttention):
    recompute_norms = True
    def forward(self, x, cond=None, cond_mask=None):
        b, c, h, w = x.shape
        qkv = _norm_then(self, self.qkv, x, self.norm, act=None)  # (B, 3C, H, W)
        kv_cond = text_kv(self, cond).to(qkv.dtype) if self.has_cross else None  # (B, T, 2C)
        mask = cond_mask if self.has_cross else None
        out = ops.attention_from_qkv(qkv.flatten(2), kv_cond, mask, self.num_heads,
                                     impl=_impl(self, "attention"))  # (B, C, L)
        x = x + self.proj_out(out.reshape(b, c, h, w))
        if self.ffn is not None:
            norm, conv1, _, conv2 = self.ffn
            h = _norm_then(self, conv1, x, norm, act=None)  # (B, 4C, H, W), kept by the GELU
            x = _recomputed_input(self, functools.partial(F.gelu, h), conv2) + x
        return x


class FastSelfAttention1D(SelfAttention1D):
    """The LM head's and the temporal blocks' attention over (B, L, C) tokens: the same op, its key mask on
    the self branch, on head views of the qkv Linear's output (a sample whose keys are all masked gets zero
    where the public code gives NaN)."""

    def attention(self, q, k, v, mask=None):  # (B, L, C) each
        b, length, width = q.shape
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        if self.pos_emb is not None:
            q, k = self.pos_emb.rotate_queries_or_keys(q), self.pos_emb.rotate_queries_or_keys(k)
        out = ops.attention(q, k, v, self_mask=mask, impl=_impl(self, "attention"))  # (B, h, L, d)
        return out.transpose(1, 2).reshape(b, length, width)


class FastResNetBlock(ResNetBlock):
    checkpointing = False  # recompute this block's activations in backward (set_activation_checkpointing)

    def forward(self, x, temb, skip_activations=None, return_activations=False, conditioning=None,
                cond_mask=None):
        run = super().forward
        if not (self.checkpointing and torch.is_grad_enabled()):
            return run(x, temb, skip_activations, return_activations, conditioning, cond_mask)
        has_skips = skip_activations is not None

        def body(x, temb, conditioning, cond_mask, *skips):  # the recomputation gets a fresh skip list
            _local.in_checkpoint = True
            try:
                return run(x, temb, list(skips) if has_skips else None, return_activations, conditioning, cond_mask)
            finally:
                _local.in_checkpoint = False

        return checkpoint(body, x, temb, conditioning, cond_mask, *(skip_activations or []), use_reentrant=False)

    def _skip_then_resnet(self, i, x, temb, skip_activations):
        """The up path's concatenation as ``ops.concat_channels_for_norm``: a row copy (channels_last) that
        also hands the ResNet's norm1 its partial moments. NCHW activations (an NCHW model, the temporal
        mode's frame reshapes) are concatenated by torch.cat, whatever backend the model asks for."""
        resnet = self.resnets[i]
        if (skip_activations is None or not isinstance(resnet, FastResNet)
                or not all(t.is_contiguous(memory_format=torch.channels_last) for t in (x, skip_activations[0]))):
            return super()._skip_then_resnet(i, x, temb, skip_activations)
        x, moments = ops.concat_channels_for_norm(x, skip_activations.pop(0), resnet.norm1.num_groups,
                                                  impl=_impl(self, "concat_channels"))
        return resnet(x, temb, input_moments=moments)

    def _resample(self, x, temb):
        if self.upsample_output and not self.resamples_frames:
            w, b = _w(self.resample.weight, x), _w(self.resample.bias, x)
            return ops.upsample_conv3x3(x, w, b, impl=_impl(self, "upsample_conv3x3"))
        return super()._resample(x, temb)


class FastUNetMixin:
    """Stage overrides shared by the fast UNet and NestedUNet."""

    recompute_norms = True  # the output layer's norm

    def _time_projections(self) -> Optional[TimeProjections]:
        """The level's batched ResNet time projections, or None while its weights are FSDP-sharded
        (each block's weights are gathered only inside that block, so the blocks project themselves)."""
        tp = found_once(self, "_tp", lambda: TimeProjections([m.time_layer for m in self._own_resnets()]))
        batched = not is_sharded(tp.layers[0].weight)
        if self.__dict__.get("_batched") != (batched, tp):  # (re)assign the blocks' columns on a change only
            offsets = [sum(tp.sizes[:i]) for i in range(len(tp.sizes))] if batched else [None] * len(tp.sizes)
            for m, off in zip(self._own_resnets(), offsets):
                m.proj_offset = off
            self.__dict__["_batched"] = (batched, tp)
        return tp if batched else None

    def _own_resnets(self):  # found once: a training forward asks for them every step
        return found_once(self, "_resnets", lambda: [m for m in _own_modules(self) if isinstance(m, ResNet)])

    def time_embedding(self, times, cond_emb, micros):
        temb = super().time_embedding(times, cond_emb, micros)  # (B, temporal_dim)
        tp = self._time_projections()
        if tp is None:
            return temb
        w, b = tp.weight_bias()
        proj = F.linear(F.silu(temb), w.to(temb.dtype), b.to(temb.dtype))  # (B, sum 2C): every ResNet's (a, b)
        if proj.requires_grad and not torch.compiler.is_compiling():
            # one split for all blocks (TimeProjections.pairs): per 256x256 train step, 62 zero-filled slice
            # gradients and 58 adds fewer in backward
            for m, (a, b) in zip(self._own_resnets(), tp.pairs(proj)):
                m.__dict__["_split_proj"] = (proj, a, b)
        return proj

    def forward_denoising(self, x_t, times, cond_emb=None, conditioning=None, cond_mask=None, micros=None):
        """The reference's, with every attention layer's text keys and values from one GEMM when
        sampling (:func:`mdm_fast.models.text_kv.batched_text_kv`), and the text mask made bool once
        (the attention op would convert it in every layer; the reference reads ``mask == 0`` alike)."""
        if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
            raise RuntimeError("the fast model does not run under torch.func transforms (grad, vmap, jacrev, ...): "
                               "its custom ops have no functorch rules; run the reference model "
                               "(mdm_fast.reference.build_model, the same state_dict) there")
        if cond_mask is not None and cond_mask.dtype != torch.bool:
            cond_mask = cond_mask != 0  # (B, T)
        try:
            with batched_text_kv(self, FastSelfAttention, conditioning):
                return super().forward_denoising(x_t, times, cond_emb, conditioning, cond_mask, micros)
        except BaseException:  # the splits of the blocks it did not reach (inner levels' too) would hold
            for m in self.modules():  # the graph, and block deepcopy (so ModelEma), until the next forward
                m.__dict__.pop("_split_proj", None)
            raise

    def forward_output_layer(self, x):
        n_in, n_out = self._frame_grid("output")
        if n_in != 1 or n_out != 1:
            return super().forward_output_layer(x)
        return _norm_then(self, self.conv_out, x, self.norm_out)


class FastUNet(FastUNetMixin, UNet):
    """The fast UNet (also the innermost level of a fast NestedUNet)."""


class FastNestedUNet(FastUNetMixin, NestedUNet):
    def _fused_adapters(self) -> bool:
        """The inner level is a plain UNet that convolves its input as one image. (This level's temporal mode
        changes nothing here: between its down and up blocks the frames are tiled back into one image.)"""
        inner = self.inner_unet
        return type(inner) is FastUNet and not inner.config.temporal_mode

    def forward_inner(self, x, x_t_low, times, cond_emb, conditioning, cond_mask, micros):
        """The inner UNet with the adapters fused: conv_in(x_low) + in_adapter(x) as one step (no zero
        padding for a mixed batch), and x + out_adapter(inner features) as another."""
        if not self._fused_adapters():
            return super().forward_inner(x, x_t_low, times, cond_emb, conditioning, cond_mask, micros)
        inner, ad, oa = self.inner_unet, self.in_adapter, self.out_adapter
        (x_low,) = x_t_low
        x_in = ops.nested_inner_input(x_low.to(x.dtype), _w(inner.conv_in.weight, x), _w(inner.conv_in.bias, x),
                                      x if ad is not None else None, _w(ad.weight, x) if ad is not None else None,
                                      _w(ad.bias, x) if ad is not None else None,
                                      impl=_impl(self, "nested_inner_input"))
        low_out, inner_x = inner.forward_body(x_in, inner.time_embedding(times, cond_emb, micros), conditioning,
                                              cond_mask)
        x = ops.nested_outer_merge(x, inner_x, _w(oa.weight, x), _w(oa.bias, x),
                                   impl=_impl(self, "nested_outer_merge"))
        return x, low_out


FAST_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.Conv2d: FastConv2d,
    ResNet: FastResNet,
    SelfAttention: FastSelfAttention,
    SelfAttention1D: FastSelfAttention1D,
    ResNetBlock: FastResNetBlock,
    UNet: FastUNet,
    NestedUNet: FastNestedUNet,
}


def _own_modules(level: nn.Module):
    """Modules of a UNet level, the inner UNet excluded, in registration order."""
    inner = getattr(level, "inner_unet", None)
    skip = set(id(m) for m in inner.modules()) if inner is not None else set()
    return [m for m in level.modules() if id(m) not in skip]


def convert(model: nn.Module, impl: str = "auto", channels_last: bool = True) -> nn.Module:
    """Swap every reference module of ``model`` for its fast class, in place (see set_channels_last)."""
    ops.dispatch.requested_impl(impl)  # validates the name
    set_channels_last(model, channels_last)
    for m in model.modules():
        fast = FAST_CLASSES.get(type(m))
        if fast is not None:
            m.__class__ = fast
        if isinstance(m, tuple(FAST_CLASSES.values())):
            m.impl = impl
            m.__dict__.pop("_tp", None)
            m.__dict__.pop("_batched", None)
    return model


def set_channels_last(model: nn.Module, enabled: bool = True) -> None:
    """Lay every 4-D weight (the 2-D convolutions) out channels_last, or back to NCHW; in place, the same
    Parameter objects. The convolutions then run NHWC and so does everything between them, where cuDNN
    converts around each bf16 NCHW convolution (no committed table compares the two layouts: the early
    H200 runs that did had an NCHW path fixed since). The state_dict's values are unchanged (checkpoints
    load either way)."""
    fmt = torch.channels_last if enabled else torch.contiguous_format
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=fmt)


def set_activation_checkpointing(model: nn.Module, levels=None, enabled: bool = True) -> None:
    """Recompute activations in backward, block by block, for the nesting ``levels`` given (0 = the
    outermost; None = all): trades about one extra forward for the activation memory of those levels."""
    level_modules = [model]
    while hasattr(level_modules[-1], "inner_unet"):
        level_modules.append(level_modules[-1].inner_unet)
    chosen = range(len(level_modules)) if levels is None else levels
    for i in chosen:
        for m in _own_modules(level_modules[i]):
            if isinstance(m, FastResNetBlock):
                m.checkpointing = enabled


def set_norm_recompute(model: nn.Module, enabled: bool = True) -> None:
    """Whether training recomputes each group norm's output (and the attention FFN's GELU output) in
    backward instead of keeping it for the convolution that reads it (on by default; see
    ``_recomputed_input``): the 256x256 model keeps 40% fewer activation bytes, for one extra
    memory-bound pass per norm in backward, with bit-identical gradients."""
    for m in model.modules():
        if isinstance(m, (FastResNet, FastSelfAttention, FastUNetMixin)):
            m.recompute_norms = enabled


def is_fast(model: nn.Module) -> bool:
    return isinstance(model, (FastUNet, FastNestedUNet))


def copy_fast(model: nn.Module, impl: str = "auto") -> nn.Module:
    return convert(copy.deepcopy(model), impl)
