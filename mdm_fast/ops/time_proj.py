"""All ResNet time projections of one UNet level as one GEMM per step.

Every public ResNet computes ``time_layer(silu(temb)).chunk(2, dim=1)`` -> (scale a, shift b) with its
own small ``nn.Linear(temb_dim, 2 * C)``: dozens of tiny GEMMs per denoising step, each reading the
same ``silu(temb)``. :class:`TimeProjections` evaluates ``F.linear(silu(temb), W_cat, b_cat)`` once
and hands each block views of its columns.

The parameters stay the blocks' own (the object is not an ``nn.Module``, so the state_dict is
untouched). ``W_cat`` is built from them:

- from parameters that require a gradient (training, or sampling a model being trained): ``torch.cat``
  of the parameters on every call, so autograd routes each block's gradient back to its own weight
  through cat's backward (a split: views, no copies). The price is one copy of the time-layer weights
  per step (about 2 * sum(2 C) * temb_dim bytes in bf16, e.g. ~20 MB for the 256x256 model's outer
  level: ~10 us on an H100), far below the launch overhead of the dozens of small GEMMs it replaces;
- from parameters that need none (a sampler's cast copies, an EMA or frozen model): the
  concatenation is cached (:class:`ParamCache`).

Ask for the projections where temb is known, once per level and step; each ResNet then takes its
(scale, shift) pair, widened with :func:`expand_batch` like the public ResNet when its activations
carry more samples than temb (``einops.repeat(t, "b c h w -> (b n) c h w")`` = repeat_interleave).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook


def expand_batch(t: Tensor, batch: int) -> Tensor:
    """The public ResNet's rule: (b, ...) -> (batch, ...) by repeat_interleave when batch > b."""
    if batch > t.shape[0]:
        if batch % t.shape[0]:
            raise ValueError(f"batch {batch} is not a multiple of the time embedding's batch {t.shape[0]}")
        return t.repeat_interleave(batch // t.shape[0], dim=0)
    return t


class ParamCache:
    """Values built from parameters: one per set of parameter objects, kept while those objects live
    and none of them changes (data pointer, in-place version counter: ``load_state_dict`` and ``copy_``
    bump it; dtype, device) and the ``extra`` key (hashable, say the dtype built for) is the same. For
    weights derived for sampling (concatenated, folded). Several sets (and extra keys) keep a value each
    (the cast copies of two samplers of one model): a CUDA graph captured with one set's value reads
    memory that stays its own while the other set runs.
    Built anew at every call when a parameter requires a gradient: an optimiser may update it, and a
    fused one (``torch.optim.AdamW(fused=True)``) leaves version counters as they were, so a key cannot
    see it (requires_grad, not the grad mode: a custom op runs its implementation with gradients off, in
    a training step too).
    Sampling keeps the value through parameters that need no gradient: the copies of
    :class:`mdm_fast.models.CastWeights`, an EMA model, a model after ``requires_grad_(False)``.
    A write through ``p.data`` (``p.data.mul_(d)``, an old EMA idiom) bumps no version counter: after
    one, :meth:`forget_all` (``mdm_fast.models.forget_derived_weights()``) makes every cache rebuild.
    Every optimizer step makes the values rebuild too (:meth:`forget_values`, a global post-step hook):
    a model frozen to sample, unfrozen for a fused step and frozen again would otherwise find its old
    values under unchanged counters.
    The values are not pickled (``torch.save(model)``): a loaded model builds them again."""

    _epoch = 0  # bumped by forget_all and every optimizer step: part of every key
    structure = 0  # bumped by forget_all only: the fast models find their module lists again (found_once)

    def __init__(self):
        # (ids of the parameters, extra) -> (weak references to them, key, value)
        self._entries: Dict[Tuple[Tuple[int, ...], Any], Tuple[list, list, Any]] = {}

    def __getstate__(self) -> dict:  # weak references do not pickle; the values are rebuilt after a load
        return {**self.__dict__, "_entries": {}}

    @classmethod
    def forget_all(cls) -> None:
        cls.forget_values()
        cls.structure += 1

    @classmethod
    def forget_values(cls) -> None:
        cls._epoch += 1

    @staticmethod
    def keeps(params: Sequence[Optional[Tensor]]) -> bool:
        """Whether a value built from ``params`` is kept: none of them requires a gradient or is an
        inference tensor (made under torch.inference_mode: no version counter tells its changes)."""
        inference = not torch.compiler.is_compiling()  # dynamo cannot trace is_inference(): a graph break
        return not any(p is not None and (p.requires_grad or (inference and p.is_inference())) for p in params)

    @staticmethod
    def key(params: Sequence[Optional[Tensor]], extra: Any = None) -> list:
        """What tells a change of ``params`` (the same objects) apart."""
        key: list = [None if p is None else (p.data_ptr(), p._version, p.dtype, p.device) for p in params]
        return key + [extra, ParamCache._epoch]

    def get(self, params: Sequence[Optional[Tensor]], build: Callable[[], Any], extra: Any = None) -> Any:
        params = list(params)
        if not self.keeps(params):
            return build()
        # the values of parameter sets that died go (a sampler's cast copies, dropped with it)
        self._entries = {k: e for k, e in self._entries.items() if _alive(e[0])}
        ids, key = (tuple(id(p) for p in params), extra), self.key(params, extra)
        e = self._entries.get(ids)
        if e is None or not _same(e[0], params) or e[1] != key:
            refs = [None if p is None else weakref.ref(p) for p in params]
            e = self._entries[ids] = (refs, key, build())
        return e[2]


register_optimizer_step_post_hook(lambda optimizer, args, kwargs: ParamCache.forget_values())


def found_once(module: nn.Module, name: str, find: Callable[[], Any]) -> Any:
    """``find()``, kept in ``module.__dict__[name]`` (a forward must not walk the module tree: the eager
    sampler is bound by the host) until :meth:`ParamCache.forget_all` (``forget_derived_weights``, after
    a submodule of a model that ran was replaced)."""
    entry = module.__dict__.get(name)
    if entry is None or entry[0] != ParamCache.structure:
        entry = module.__dict__[name] = (ParamCache.structure, find())
    return entry[1]


def _alive(refs: list) -> bool:
    """Whether every parameter a list of weak references (None: a slot without one) points to lives."""
    return all(r is None or r() is not None for r in refs)


def _same(refs: list, params: list) -> bool:
    """Whether the weak references point to exactly ``params`` (an id can be reused after a death)."""
    return all(p is None if r is None else r() is p for r, p in zip(refs, params))


class TimeProjections:
    """``layers``: the ResNets' ``time_layer`` modules (nn.Linear, same in_features, with bias), in
    the order the per-block results should come back."""

    def __init__(self, layers: Sequence[nn.Linear]):
        layers = list(layers)
        if not layers:
            raise ValueError("TimeProjections needs at least one nn.Linear")
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Linear) or layer.bias is None or layer.out_features % 2:
                raise ValueError(f"layers[{i}] must be an nn.Linear(temb_dim, 2 * C) with bias, got {layer!r}")
            if layer.in_features != layers[0].in_features:
                raise ValueError(f"layers[{i}] has in_features {layer.in_features}, expected "
                                 f"{layers[0].in_features} like layers[0]")
        self.layers = layers  # a plain list: not submodules, so no new state_dict entries
        self.sizes = [layer.out_features for layer in layers]
        self._cache = ParamCache()

    def _params(self) -> list:
        return [p for layer in self.layers for p in (layer.weight, layer.bias)]

    def weight_bias(self) -> Tuple[Tensor, Tensor]:
        """(sum 2C, temb_dim) weight and (sum 2C,) bias of the concatenated projection."""
        params = self._params()
        return self._cache.get(params, lambda: (torch.cat(params[0::2]), torch.cat(params[1::2])))

    def __call__(self, temb: Tensor, batch: Optional[int] = None) -> List[Tuple[Tensor, Tensor]]:
        """temb (B, temb_dim) -> per layer (scale, shift), each (B, C) (or (batch, C), see expand_batch)."""
        w, b = self.weight_bias()
        if temb.dim() != 2 or temb.shape[1] != w.shape[1]:
            raise ValueError(f"temb must have shape (B, {w.shape[1]}), got {tuple(temb.shape)}")
        proj = F.linear(F.silu(temb), w, b)  # (B, sum 2C)
        if batch is not None:
            proj = expand_batch(proj, batch)
        return self.pairs(proj)

    def pairs(self, proj: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """(B, sum 2C) projections -> per layer (scale, shift) views, (B, C) each, from one split: its
        backward is one cat (a slice per layer would zero-fill a (B, sum 2C) gradient each, then sum them)."""
        halves = proj.split([c // 2 for c in self.sizes for _ in range(2)], dim=1)
        return list(zip(halves[0::2], halves[1::2]))
