"""Every cross-attention layer's text keys and values as one GEMM per forward, when sampling.

Each public attention layer computes ``kv_cond(norm_cond(cond))``: a LayerNorm of the same text
features with its own affine (gamma_l, beta_l), then its own ``nn.Linear(D, 2C)`` (W_l, b_l). The
256x256 model has 31 such layers, so a step launches 31 LayerNorms (each reading and writing the
whole text in fp32 under autocast) and 31 GEMMs. With ``n`` the text normalised without affine,

    kv_l = (n * gamma_l + beta_l) @ W_l^T + b_l = n @ (W_l * gamma_l)^T + (W_l @ beta_l + b_l),

so one LayerNorm without affine and one GEMM against the folded weights of every layer give them
all (:class:`TextProjections`): the same values up to rounding (the fold is computed in fp32, then
cast once to the compute dtype), as close to the reference as the per-layer path.

Only without gradients (sampling): in training the fold would cost passes over the weights and
their gradients every step. The folded weights are cached as the batched time projections are
(:class:`mdm_fast.ops.time_proj.ParamCache`: for parameters that need no gradient, such as a sampler's
copies; folded at every call from trainable ones). The layers' results are column views of one
(B, T, sum 2C) tensor, alive during the forward (at batch 32 with 128 tokens: 0.37 GB in bf16 for the
256x256 model).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdm_fast.models.tensors import is_sharded, same_view
from mdm_fast.ops.dispatch import accumulation_dtype
from mdm_fast.ops.time_proj import ParamCache, found_once


class TextProjections:
    """``layers``: attention modules with ``norm_cond`` (nn.LayerNorm over D) and ``kv_cond``
    (nn.Linear(D, 2C) with bias), all with the same D and LayerNorm eps."""

    def __init__(self, layers: Sequence[nn.Module]):
        self.layers = list(layers)  # a plain list: no new state_dict entries
        self.sizes = [m.kv_cond.out_features for m in self.layers]
        self._cache = ParamCache()

    @staticmethod
    def compatible(layers: Sequence[nn.Module]) -> bool:
        """Whether the layers can share one GEMM: same text width and eps, an affine-or-not LayerNorm
        over the last dim, a Linear with bias."""
        if not layers:
            return False
        ref = layers[0].norm_cond
        return all(isinstance(m.norm_cond, nn.LayerNorm) and isinstance(m.kv_cond, nn.Linear)
                   and m.kv_cond.bias is not None and m.norm_cond.normalized_shape == ref.normalized_shape
                   and len(ref.normalized_shape) == 1 and m.norm_cond.eps == ref.eps
                   and m.kv_cond.in_features == ref.normalized_shape[0] for m in layers)

    def _params(self) -> List[Optional[Tensor]]:
        return [p for m in self.layers
                for p in (m.kv_cond.weight, m.kv_cond.bias, m.norm_cond.weight, m.norm_cond.bias)]

    def weight_bias(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """(sum 2C, D) folded weight in ``dtype`` and (sum 2C,) folded bias in fp32."""
        return self._cache.get(self._params(), lambda: self._folded(dtype), extra=dtype)

    def _folded(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        with torch.autocast(self.layers[0].kv_cond.weight.device.type, enabled=False):  # the fold in fp32
            w, b = zip(*(self._fold(m, dtype) for m in self.layers))
            return torch.cat(w).to(dtype), torch.cat(b)

    @staticmethod
    def _fold(m: nn.Module, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """The layer's folded (2C, D) weight and (2C,) bias in fp32 (fp64 for fp64), from its Linear's parameters in
        ``dtype`` (what autocast would multiply by: a model whose weights were cast once folds the same)."""
        acc = accumulation_dtype(dtype)
        w, b = m.kv_cond.weight.to(dtype).to(acc), m.kv_cond.bias.to(dtype).to(acc)
        gamma, beta = m.norm_cond.weight, m.norm_cond.bias
        if beta is not None:
            b = b + w @ beta.to(acc)
        if gamma is not None:
            w = w * gamma.to(acc)
        return w, b

    def __call__(self, cond: Tensor) -> List[Tensor]:
        """cond (B, T, D) -> each layer's ``kv_cond(norm_cond(cond))`` (B, T, 2C), views of one tensor."""
        norm = self.layers[0].norm_cond
        dtype = torch.get_autocast_dtype(cond.device.type) if torch.is_autocast_enabled(cond.device.type) \
            else self.layers[0].kv_cond.weight.dtype
        w, b = self.weight_bias(dtype)
        n = F.layer_norm(cond, norm.normalized_shape, None, None, norm.eps)  # (B, T, D)
        kv = F.linear(n.to(dtype), w, b.to(dtype))  # (B, T, sum 2C)
        return list(kv.split(self.sizes, dim=-1))


def _cross_attention_layers(model: nn.Module, kind: type) -> List[nn.Module]:
    """The model's ``kind`` layers with text cross-attention, found once (a forward must not walk the
    module tree: the eager sampler is bound by the host)."""
    return found_once(model, "_cross_attention_layers",
                      lambda: [m for m in model.modules() if isinstance(m, kind) and m.has_cross])


def _wanted(layers: Sequence[nn.Module], cond: Optional[Tensor]) -> bool:
    """Sampling only: no gradient to any of the layers' parameters, no torch.compile trace, no sharded
    (FSDP2) weights, a (B, T, D) text and layers that can share one GEMM."""
    if cond is None or cond.dim() != 3 or torch.compiler.is_compiling() or not TextProjections.compatible(layers):
        return False
    params = [p for m in layers for p in (*m.kv_cond.parameters(), *m.norm_cond.parameters())]
    if any(is_sharded(p) for p in params):
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))


@contextlib.contextmanager
def batched_text_kv(model: nn.Module, kind: type, cond: Optional[Tensor]) -> Iterator[None]:
    """Inside: every ``kind`` attention layer of ``model`` that is called with this ``cond`` (or a view
    of all of it, :func:`same_view`) takes its text keys and values from one batched projection
    (:class:`TextProjections`), computed here; other calls, and calls outside, project as usual.
    Nested uses for the same ``cond`` (an inner level of the same model) change nothing."""
    layers = [m for m in _cross_attention_layers(model, kind) if m.__dict__.get("_text_kv") is None]
    if not _wanted(layers, cond):
        yield
        return
    tp = model.__dict__.get("_text_projections")
    if tp is None or tp.layers != layers:
        tp = model.__dict__["_text_projections"] = TextProjections(layers)
    for m, kv in zip(layers, tp(cond)):
        m.__dict__["_text_kv"] = (cond, kv)
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("_text_kv", None)


def text_kv(layer: nn.Module, cond: Tensor) -> Tensor:
    """``layer.kv_cond(layer.norm_cond(cond))`` (B, T, 2C), from the batched projection when one is
    in place for this ``cond`` (:func:`batched_text_kv`)."""
    pre = layer.__dict__.get("_text_kv")
    if pre is not None and same_view(pre[0], cond):
        return pre[1]
    return layer.kv_cond(layer.norm_cond(cond))
