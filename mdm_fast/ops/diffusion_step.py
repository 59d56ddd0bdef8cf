"""The diffusion process's element-wise math, and its two fused multi-resolution ops.

This module holds the ONLY copy of the formulas (prediction <-> x0, targets, noising, thresholds,
the DDPM/DDIM step); the training loss and the samplers of :mod:`mdm_fast.diffusion` call them, and
the Triton kernels (:mod:`mdm_fast.kernels.diffusion_step`) are tested against them.

Notation: ``g`` is gamma (alpha_bar, the signal variance) at step t, ``g_s`` at the earlier step s;
``kind`` is the prediction parameterisation: ``"eps"`` (public DDPM/DDIM), ``"v"`` (V_PREDICTION) or
``"x0"``. Every formula broadcasts; ``g`` is usually (B, 1, 1, 1).

Fused ops (torch.library custom ops ``mdm_fast::noisy_pyramid`` / ``mdm_fast::sampler_update``,
backends ``ref`` and ``triton``, chosen by :mod:`mdm_fast.ops.dispatch`):

- :func:`noisy_pyramid`: from the top-resolution images and one noise draw per level, every level's
  average-pooled image (divided by the level's signal scale), its noisy input and its loss target,
  in one pass over the top image.
- :func:`sampler_update`: one sampler step of every level in one launch: x0 from the prediction,
  clipping, the DDPM posterior or DDIM step, injected noise, and the equivalent noise of the result.

Neither op has a gradient: the pyramid's inputs are data (images, noise, gammas) and the sampler runs
under ``no_grad``; the differentiable pieces of the loss (prediction conversions, the residual) use
the plain formulas below. Arithmetic is fp32 (fp64 for fp64 inputs, ref only); outputs take the input's dtype.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mdm_fast.ops import dispatch

KINDS = ("eps", "v", "x0")
THRESHOLDS = ("none", "clip", "dynamic", "dynamic_if")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_LEVELS = 4


# ---- the formulas (public samplers.py semantics) -------------------------------------------


def noisy(x0: Tensor, eps: Tensor, g: Tensor) -> Tensor:
    """x_t = sqrt(g) x0 + sqrt(1 - g) eps."""
    return g.sqrt() * x0 + (1 - g).sqrt() * eps


def target_from(x0: Tensor, eps: Tensor, g: Tensor, kind: str) -> Tensor:
    """What a model of parameterisation ``kind`` should output for (x0, eps) at gamma g."""
    if kind == "eps":
        return eps
    if kind == "v":
        return g.sqrt() * eps - (1 - g).sqrt() * x0
    if kind == "x0":
        return x0
    raise ValueError(f"prediction kind must be one of {KINDS}, got {kind!r}")


def x0_from_pred(x_t: Tensor, pred: Tensor, g: Tensor, kind: str) -> Tensor:
    if kind == "eps":
        return (x_t - pred * (1 - g).sqrt()) / g.sqrt()
    if kind == "v":
        return x_t * g.sqrt() - pred * (1 - g).sqrt()
    if kind == "x0":
        return pred
    raise ValueError(f"prediction kind must be one of {KINDS}, got {kind!r}")


def pred_from_x0(x_t: Tensor, x0: Tensor, g: Tensor, kind: str) -> Tensor:
    if kind == "eps":
        return (x_t - x0 * g.sqrt()) / (1 - g).sqrt()
    if kind == "v":
        return (g.sqrt() * x_t - x0) / (1 - g).sqrt()
    if kind == "x0":
        return x0
    raise ValueError(f"prediction kind must be one of {KINDS}, got {kind!r}")


def _dynamic_threshold(x: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen's dynamic thresholding: per sample s = clamp(quantile(|x|, ratio), 1, max); clip(x, s) / s."""
    flat = x.float().reshape(x.shape[0], -1)  # (B, CHW)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(1, max_value)[:, None]
    return (torch.clamp(flat, -s, s) / s).reshape(x.shape).to(x.dtype)


def threshold(x0: Tensor, kind: str, signal_scale: float = 1.0) -> Tensor:
    """The public ``clip_sample``: threshold x0 * scale in image units, then back to level units."""
    s = signal_scale
    if kind == "none":
        return x0
    if kind == "clip":
        return (x0 * s).clip(-1, 1) / s
    if kind == "dynamic":
        return _dynamic_threshold(x0 * s, 0.995, 100.0) / s
    if kind == "dynamic_if":
        return _dynamic_threshold(x0 * s, 0.95, 1.5) / s
    raise ValueError(f"threshold must be one of {THRESHOLDS}, got {kind!r}")


def step(x_t: Tensor, x0: Tensor, g: Tensor, g_s: Tensor, eta: Optional[float],
         noise: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """From x_t and a (thresholded) x0, the sample at step s and its equivalent noise.

    ``eta`` None: the DDPM posterior mean; a number: DDIM with that eta (0 = deterministic, no noise).
    ``noise``: the injected noise, scaled by the posterior std (times eta for DDIM); None adds none.
    The returned eps is (x_s - sqrt(g_s) x0) / sqrt(1 - g_s); at g_s = 1 (the last step) it is the
    noise estimate at t instead of the public code's division by zero.
    """
    alpha = g / g_s
    beta = 1 - alpha
    var = beta * (1 - g_s) / (1 - g)  # posterior variance, beta_tilde
    if eta is None:
        x_s = x0 * beta * g_s.sqrt() / (1 - g) + x_t * alpha.sqrt() * (1 - g_s) / (1 - g)
    else:
        eps_t = (x_t - x0 * g.sqrt()) / (1 - g).sqrt()
        var = (eta**2) * var
        x_s = x0 * g_s.sqrt() + eps_t * (1 - g_s - var).clamp_min(0).sqrt()
        if eta == 0:
            noise = None
    if noise is not None:
        x_s = x_s + var.sqrt() * noise
    last = g_s >= 1
    eps = (x_s - g_s.sqrt() * x0) / torch.where(last, 1.0, 1 - g_s).sqrt()
    eps = torch.where(last, (x_t - x0 * g.sqrt()) / (1 - g).sqrt(), eps)  # no host sync (CUDA graphs)
    return x_s, eps


# ---- validation ------------------------------------------------------------------------------


def _acc(t: Tensor) -> Tensor:
    """fp32 arithmetic for every dtype but fp64 (kept, so the ref backend can serve as an fp64 oracle)."""
    return t.to(dispatch.accumulation_dtype(t.dtype))


def _per_sample(g: Tensor, level: int, like: Tensor) -> Tensor:
    return g[level].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))  # (B, 1, 1, 1)


def _check_gammas(name: str, g: Tensor, levels: int, batch: int) -> None:
    if not isinstance(g, Tensor) or g.shape != (levels, batch):
        shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"{name} must be a ({levels}, {batch}) tensor (levels, batch), got {shape}")


def _check_common(op: str, tensors: dict, signal_scales: Sequence[float]) -> None:
    """One device for every tensor (a mixed call ran the fake kernels: uninitialised memory), signal
    scales finite and > 0 (each level's image is divided by its scale)."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: every tensor must be on one device, got "
                         + ", ".join(f"{name} on {d}" for name, d in devices.items()))
    if not all(0 < s < math.inf for s in signal_scales):
        raise ValueError(f"{op}: signal_scales must be finite and > 0, got {list(signal_scales)}")


def _check_pyramid(images: Tensor, ratios: Sequence[int], gammas: Tensor, noises: Sequence[Tensor],
                   signal_scales: Sequence[float], target: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype not in _DTYPES:
        raise ValueError("noisy_pyramid: images must be a floating (B, C, H, W) tensor")
    B, C, H, W = images.shape
    L = len(ratios)
    if L < 1 or ratios[0] != 1:
        raise ValueError(f"noisy_pyramid: ratios must start with 1 (the top level), got {list(ratios)}")
    for a, b in zip(ratios, ratios[1:]):
        if b % a or b <= a:
            raise ValueError(f"noisy_pyramid: each ratio must be a multiple (> 1) of the previous, got {list(ratios)}")
    if H % ratios[-1] or W % ratios[-1]:
        raise ValueError(f"noisy_pyramid: image size {H}x{W} not divisible by the largest ratio {ratios[-1]}")
    if len(noises) != L or len(signal_scales) != L:
        raise ValueError(f"noisy_pyramid: need one noise tensor and one signal scale per level ({L}), got "
                         f"{len(noises)} and {len(signal_scales)}")
    for r, n in zip(ratios, noises):
        want = (B, C, H // r, W // r)
        if not isinstance(n, Tensor) or tuple(n.shape) != want or n.dtype not in _DTYPES:
            raise ValueError(f"noisy_pyramid: the noise of ratio {r} must be a floating {want} tensor, got "
                             f"{tuple(n.shape) if isinstance(n, Tensor) else type(n).__name__}")
    _check_gammas("noisy_pyramid: gammas", gammas, L, B)
    _check_common("noisy_pyramid", {"images": images, "gammas": gammas,
                                    **{f"noises[{i}]": n for i, n in enumerate(noises)}}, signal_scales)
    if target not in KINDS:
        raise ValueError(f"noisy_pyramid: target must be one of {KINDS}, got {target!r}")


def _check_update(x_t: Sequence[Tensor], pred: Sequence[Tensor], g_t: Tensor, g_s: Tensor,
                  noise: Sequence[Optional[Tensor]], signal_scales: Sequence[float], kind: str,
                  eta: Optional[float], thresh: str) -> None:
    L = len(x_t)
    if L < 1 or len(pred) != L or len(noise) != L or len(signal_scales) != L:
        raise ValueError(f"sampler_update: x_t, pred, noise and signal_scales need one entry per level; got "
                         f"{len(x_t)}, {len(pred)}, {len(noise)}, {len(signal_scales)}")
    B = x_t[0].shape[0]
    for i, (x, p, n) in enumerate(zip(x_t, pred, noise)):
        if not isinstance(x, Tensor) or x.dim() != 4 or x.dtype not in _DTYPES:
            raise ValueError(f"sampler_update: x_t[{i}] must be a floating (B, C, H, W) tensor")
        for name, t in (("pred", p), ("noise", n)):
            if (t is not None or name == "pred") and (not isinstance(t, Tensor) or t.shape != x.shape):
                raise ValueError(f"sampler_update: {name}[{i}] must be a tensor of x_t[{i}]'s shape "
                                 f"{tuple(x.shape)}")
        if x.shape[0] != B:
            raise ValueError("sampler_update: every level must have the same batch size")
    _check_gammas("sampler_update: g_t", g_t, L, B)
    _check_gammas("sampler_update: g_s", g_s, L, B)
    _check_common("sampler_update", {"g_t": g_t, "g_s": g_s, **{f"{name}[{i}]": t for name, ts in
                                     (("x_t", x_t), ("pred", pred), ("noise", noise)) for i, t in enumerate(ts)}},
                  signal_scales)
    if kind not in KINDS:
        raise ValueError(f"sampler_update: prediction kind must be one of {KINDS}, got {kind!r}")
    if thresh not in THRESHOLDS:
        raise ValueError(f"sampler_update: threshold must be one of {THRESHOLDS}, got {thresh!r}")
    if eta is not None and not 0 <= eta < math.inf:  # NaN fails both
        raise ValueError(f"sampler_update: eta must be None (DDPM posterior) or a finite number >= 0 (DDIM), "
                         f"got {eta}")


# ---- backends --------------------------------------------------------------------------------


def _ref_pyramid(images, ratios, gammas, noises, signal_scales, target):
    x0s, xts, tgts = [], [], []
    level = _acc(images)
    for i, (r, eps, s) in enumerate(zip(ratios, noises, signal_scales)):
        if i > 0:
            level = F.avg_pool2d(level, r // ratios[i - 1])  # the public pyramid: pool the previous level
        x0 = level / s
        g = _per_sample(gammas, i, level)
        e = eps.to(level.dtype)
        x0s.append(x0.to(images.dtype))
        xts.append(noisy(x0, e, g).to(images.dtype))
        if target != "eps":
            tgts.append(target_from(x0, e, g, target).to(images.dtype, copy=True))  # x0 kind: no alias
    return x0s, xts, tgts


def _ref_update(x_t, pred, g_t, g_s, noise, signal_scales, kind, eta, thresh):
    x0s, xss, epss = [], [], []
    for i, (x, p, n, s) in enumerate(zip(x_t, pred, noise, signal_scales)):
        xf = _acc(x)
        g, gs = _per_sample(g_t, i, xf), _per_sample(g_s, i, xf)
        x0 = threshold(x0_from_pred(xf, p.to(xf.dtype), g, kind), thresh, s)
        x_s, eps = step(xf, x0, g, gs, eta, n.to(xf.dtype) if n is not None else None)
        x0s.append(x0.to(x.dtype, copy=True))  # a copy: with kind x0 it could alias pred
        xss.append(x_s.to(x.dtype))
        epss.append(eps.to(x.dtype))
    return x0s, xss, epss


def _triton_pyramid(images, ratios, gammas, noises, signal_scales, target):
    from mdm_fast.kernels import diffusion_step as kern

    return kern.noisy_pyramid(images, ratios, gammas, noises, signal_scales, target)


def _triton_update(x_t, pred, g_t, g_s, noise, signal_scales, kind, eta, thresh):
    from mdm_fast.kernels import diffusion_step as kern

    return kern.sampler_update(x_t, pred, g_t, g_s, noise, signal_scales, kind, eta, thresh)


_PYRAMID = {"ref": _ref_pyramid, "triton": _triton_pyramid}
_UPDATE = {"ref": _ref_update, "triton": _triton_update}


# ---- custom ops ------------------------------------------------------------------------------


@torch.library.custom_op("mdm_fast::noisy_pyramid", mutates_args=())
def _noisy_pyramid_op(images: Tensor, ratios: List[int], gammas: Tensor, noises: List[Tensor],
                      signal_scales: List[float], target: str,
                      backend: str) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    return _PYRAMID[backend](images, ratios, gammas, noises, signal_scales, target)


@_noisy_pyramid_op.register_fake
def _(images, ratios, gammas, noises, signal_scales, target, backend):
    outs = [[images.new_empty(n.shape) for n in noises] for _ in range(3)]
    return outs[0], outs[1], outs[2] if target != "eps" else []


@torch.library.custom_op("mdm_fast::sampler_update", mutates_args=())
def _sampler_update_op(x_t: List[Tensor], pred: List[Tensor], g_t: Tensor, g_s: Tensor,
                       noise: List[Optional[Tensor]], signal_scales: List[float], kind: str,
                       eta: Optional[float], thresh: str,
                       backend: str) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    return _UPDATE[backend](x_t, pred, g_t, g_s, noise, signal_scales, kind, eta, thresh)


@_sampler_update_op.register_fake
def _(x_t, pred, g_t, g_s, noise, signal_scales, kind, eta, thresh, backend):
    outs = [[torch.empty_like(x) for x in x_t] for _ in range(3)]
    return outs[0], outs[1], outs[2]


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _pyramid_triton_reason(images, ratios, gammas, noises, signal_scales, target) -> Optional[str]:
    return dispatch.first_reason(
        dispatch.triton_reason(images, gammas, *noises),
        dispatch.dtype_reason(_TRITON_DTYPES, images, *noises),
        None if len(ratios) <= MAX_LEVELS else f"more than {MAX_LEVELS} levels",
        None if all(_pow2(r) for r in ratios) else f"ratios {list(ratios)} are not all powers of two",
        None if images.numel() else "an empty batch (nothing to launch)",
    )


def _update_triton_reason(x_t, pred, g_t, g_s, noise, signal_scales, kind, eta, thresh) -> Optional[str]:
    return dispatch.first_reason(
        dispatch.triton_reason(*x_t, *pred, g_t, g_s, *noise),
        dispatch.dtype_reason(_TRITON_DTYPES, *x_t, *pred, *noise),
        None if len(x_t) <= MAX_LEVELS else f"more than {MAX_LEVELS} levels",
        None if thresh in ("none", "clip") else f"threshold {thresh!r} needs a per-sample quantile (ref only)",
        None if len({n is None for n in noise}) == 1 else "noise given for some levels only",
        None if all(x.numel() for x in x_t) else "an empty batch (nothing to launch)",
    )


dispatch.register("noisy_pyramid", {"ref": lambda *a: None, "triton": _pyramid_triton_reason},
                  preference=["triton", "ref"])
dispatch.register("sampler_update", {"ref": lambda *a: None, "triton": _update_triton_reason},
                  preference=["triton", "ref"])


def noisy_pyramid(images: Tensor, ratios: Sequence[int], gammas: Tensor, noises: Sequence[Tensor],
                  signal_scales: Optional[Sequence[float]] = None, target: str = "eps",
                  impl: str = "auto") -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Every level's (x0, x_t, target) from the top images in one pass.

    images (B, C, H, W); ratios[i] = H / H_i, starting with 1, each a multiple of the previous;
    gammas (L, B) per level and sample; noises[i] (B, C, H_i, W_i); signal_scales[i] divides level i's
    image (default 1). Level i's x0 is the average-pooled image / signal_scales[i],
    x_t = sqrt(g) x0 + sqrt(1-g) eps and the target is :func:`target_from` of ``target`` kind.
    For ``target="eps"`` the targets are the noises themselves (returned, not copied).
    No gradient flows through this op (its inputs are data).
    """
    if any(int(r) != r for r in ratios):  # 2.7 was read as 2
        raise ValueError(f"noisy_pyramid: ratios must be integers, got {list(ratios)}")
    ratios = [int(r) for r in ratios]
    noises = list(noises)
    scales = [1.0] * len(ratios) if signal_scales is None else [float(s) for s in signal_scales]
    _check_pyramid(images, ratios, gammas, noises, scales, target)
    backend = dispatch.resolve("noisy_pyramid", impl, images, ratios, gammas, noises, scales, target)
    x0, x_t, tgt = _noisy_pyramid_op(images, ratios, gammas, noises, scales, target, backend)
    return x0, x_t, (noises if target == "eps" else tgt)


def sampler_update(x_t: Sequence[Tensor], pred: Sequence[Tensor], g_t: Tensor, g_s: Tensor,
                   noise: Optional[Sequence[Optional[Tensor]]] = None, signal_scales: Optional[Sequence[float]] = None,
                   kind: str = "eps", eta: Optional[float] = None, thresh: str = "clip",
                   impl: str = "auto") -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """One sampler step of every level: lists (x0, x_s, eps), one tensor per level.

    x_t[i], pred[i], noise[i] (B, C, H_i, W_i); g_t, g_s (L, B) gammas at steps t and s < t; ``noise``
    None (or None entries) adds no noise; ``eta`` None = DDPM posterior, else DDIM; ``thresh`` one of
    none/clip/dynamic/dynamic_if, applied to x0 * signal_scales[i]. No gradient.
    """
    x_t, pred = list(x_t), list(pred)
    noise = [None] * len(x_t) if noise is None else list(noise)
    scales = [1.0] * len(x_t) if signal_scales is None else [float(s) for s in signal_scales]
    eta = None if eta is None else float(eta)
    _check_update(x_t, pred, g_t, g_s, noise, scales, kind, eta, thresh)
    args = (x_t, pred, g_t, g_s, noise, scales, kind, eta, thresh)
    backend = dispatch.resolve("sampler_update", impl, *args)
    return _sampler_update_op(*args, backend)
