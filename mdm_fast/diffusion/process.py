"""The nested (multi-resolution) diffusion process: the training loss and the model-prediction wrapper.

Semantics of the public ``NestedDiffusion.get_loss`` / ``NestedModel.forward`` (``Diffusion`` for a plain
UNet, which is the one-level case here), with these documented differences where the public code is
broken or silently inconsistent:

- residual-from-low-resolution (``no_use_residual: false``): the public code crashes (an undefined
  ``ratio``) and reads gammas from the time indices. Here level i's prediction gets
  ``pred_from_x0(x_t_i, up(clip(x0_{i+1} * s_{i+1}, -1, 1)) / s_i)`` where x0_{i+1} is the next lower
  level's (already corrected) x0 at its own gammas, ``up`` bicubic by the level ratio, s the signal
  scales. Not with mixed batches or temporal levels (ValueError), as in the public code.
- ``model_output_scale`` (tanh squashing) applies to every level; the public nested model skipped it.
- a plain UNet with ``rescale_signal``: the target uses the same rescaled image as x_t (the public
  code mixed rescaled and raw images in the v target).
- temporal levels take every (r*r)-th frame with r the ratio to the previous level (the public code
  used the ratio to the top, which breaks for two temporal levels); ``frames_per_side`` (public: 4) is a
  constructor argument.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mdm_fast.diffusion.config import DiffusionConfig, NestedDiffusionConfig, PredictionType
from mdm_fast.diffusion.schedules import LevelSchedule
from mdm_fast.ops import diffusion_step as ops
from mdm_fast.ops.resample import resize

_KIND = {PredictionType.DDPM: "eps", PredictionType.DDIM: "eps", PredictionType.V_PREDICTION: "v",
         PredictionType.X0: "x0"}


def prediction_kind(p: PredictionType) -> str:
    """The formula family of a PredictionType: "eps", "v" or "x0"."""
    return _KIND[PredictionType.parse(p)]


def _per_sample(g: Tensor) -> Tensor:
    return g.reshape(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1)


def _randn(shape, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


class NestedDiffusion:
    """Schedules, pyramid, loss and prediction wrapper of a (nested) MDM model.

    ``nest_ratio``: the model's ``nest_ratio`` (each level's size over the lowest's, top first; empty
    for a plain UNet); ``is_temporal``: the model's ``is_temporal`` (one flag per lower level).
    """

    def __init__(self, config: Union[DiffusionConfig, NestedDiffusionConfig], nest_ratio: Sequence[int] = (),
                 is_temporal: Sequence[bool] = (), frames_per_side: int = 4, impl: str = "auto"):
        if not isinstance(config, DiffusionConfig):
            raise ValueError(f"config must be a DiffusionConfig or NestedDiffusionConfig, got {type(config).__name__}")
        self.nest_ratio = [int(r) for r in nest_ratio]
        self.scales = self.nest_ratio + [1]
        if any(a <= b or a % b for a, b in zip(self.scales, self.scales[1:])):
            raise ValueError(f"nest_ratio must decrease, each a multiple of the next, got {self.nest_ratio}")
        self.ratios = [self.scales[0] // s for s in self.scales]  # top size / level size
        self.is_temporal = [bool(t) for t in is_temporal] or [False] * len(self.nest_ratio)
        if len(self.is_temporal) != len(self.nest_ratio):
            raise ValueError(f"is_temporal needs one flag per lower level ({len(self.nest_ratio)}), got "
                             f"{list(is_temporal)}")
        self.nested = bool(self.nest_ratio)
        if self.nested and not isinstance(config, NestedDiffusionConfig):
            raise ValueError("a nested model needs a NestedDiffusionConfig (the public 'nested_unet' pipeline)")
        self.config = config
        self.residual = self.nested and not config.no_use_residual
        if self.residual and any(self.is_temporal):
            raise ValueError("the residual-from-low-resolution option does not support temporal levels; "
                             "set no_use_residual: true")
        self.frames_per_side = int(frames_per_side)
        self.impl = impl
        sc = config.sampler_config
        self.schedule = LevelSchedule(sc, self.scales)
        self.kind = prediction_kind(sc.prediction_type)
        self.target_kind = prediction_kind(sc.loss_target_type)
        self.level_weights = config.multi_res_weight_list(self.num_levels) if self.nested else [1.0]
        self.mixed = config.mixed_fractions(self.num_levels) if self.nested else None

    @classmethod
    def for_model(cls, config, model, **kwargs) -> "NestedDiffusion":
        """Read ``nest_ratio`` / ``is_temporal`` (absent: a plain UNet) and a temporal model's frame grid
        (``frames_per_side()``) from the model."""
        if any(getattr(model, "is_temporal", ())) and hasattr(model, "frames_per_side"):
            kwargs.setdefault("frames_per_side", model.frames_per_side())
        return cls(config, getattr(model, "nest_ratio", ()), getattr(model, "is_temporal", ()), **kwargs)

    @property
    def num_levels(self) -> int:
        return len(self.scales)

    @property
    def signal_scales(self) -> List[float]:
        return self.schedule.signal_scales

    def level_sizes(self, size: Union[int, Tuple[int, int]]) -> List[Tuple[int, int]]:
        h, w = (size, size) if isinstance(size, int) else size
        if h % self.ratios[-1] or w % self.ratios[-1]:
            raise ValueError(f"image size {h}x{w} is not divisible by the nesting ratio {self.ratios[-1]}")
        return [(h // r, w // r) for r in self.ratios]

    # ---- training --------------------------------------------------------------------------

    def _temporal_levels(self, images: Tensor) -> List[Tensor]:
        """The public temporal pyramid: a temporal level keeps every (r*r)-th frame of the grid, r the ratio to
        the level above. (The public code strides by the square of the ratio to the top level: the same
        frames wherever it runs, it fails on the grids where the two differ.)"""
        levels, T = [images], self.frames_per_side
        for i in range(1, self.num_levels):
            rr, x = self.ratios[i] // self.ratios[i - 1], levels[-1]
            if self.is_temporal[i - 1]:
                if T % rr or x.shape[-1] % T or x.shape[-2] % T:
                    raise ValueError(f"temporal level {i}: a {T}x{T} frame grid of a {tuple(x.shape[-2:])} "
                                     f"image cannot drop to a {T // rr}x{T // rr} grid")
                n = T // rr
                frames = x.unflatten(2, (T, -1)).unflatten(4, (T, -1))  # (B, C, T, h, T, w)
                frames = frames.permute(0, 2, 4, 1, 3, 5).flatten(1, 2)[:, :: rr * rr]  # (B, n*n, C, h, w)
                x = frames.unflatten(1, (n, n)).permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)
                T = n
            else:
                x = F.avg_pool2d(x, rr)
            levels.append(x)
        return levels

    def pyramid(self, images: Tensor, times: Tensor, generator: Optional[torch.Generator] = None
                ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        """(x0, x_t, target, noise) per level for schedule steps ``times + 1`` (times: model times, (B,))."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        B, C = images.shape[:2]
        g = self.schedule.at(times + 1)  # (L, B)
        sizes = self.level_sizes(tuple(images.shape[-2:]))
        noises = [_randn((B, C, h, w), images, generator) for h, w in sizes]
        if not any(self.is_temporal):
            x0, x_t, tgt = ops.noisy_pyramid(images, self.ratios, g, noises, self.signal_scales,
                                             self.target_kind, impl=self.impl)
            return x0, x_t, tgt, noises
        outs = [ops.noisy_pyramid(lv, [1], g[i:i + 1], [noises[i]], [self.signal_scales[i]], self.target_kind,
                                  impl=self.impl) for i, lv in enumerate(self._temporal_levels(images))]
        x0, x_t, tgt = ([o[k][0] for o in outs] for k in range(3))
        return list(x0), list(x_t), list(tgt), noises

    def loss(self, model, images: Tensor, conditioning: Tensor, cond_mask: Optional[Tensor],
             micros: Optional[dict] = None, times: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The public training loss, reduced as the public trainer does (VDM-weighted mean or mean).

        images (B, C, H, W) in [-1, 1] at the top resolution; times (B,) int64 in [0, N) (drawn if None).
        Returns (scalar loss, stats): stats["loss_level{i}"] the detached mean MSE of level i (before
        multi_res_weights), stats["times"] the times used.
        """
        B, N = images.shape[0], self.schedule.num_steps
        if times is None:
            times = torch.randint(0, N, (B,), generator=generator, device=images.device)
        _, x_t, tgt, _ = self.pyramid(images, times, generator)
        g = self.schedule.at(times + 1)  # (L, B)
        keep = [B] * self.num_levels if self.mixed is None else [int(m * B) for m in self.mixed]
        preds = self.predict(model, [x[:k] for x, k in zip(x_t, keep)], times, conditioning, cond_mask, micros)
        total, stats = 0.0, {"times": times}
        for i, (x, p, t, k) in enumerate(zip(x_t, preds, tgt, keep)):
            if k < B:  # mixed batch: the top levels saw the first k samples only
                p = torch.cat([p, p.new_zeros(B - k, *p.shape[1:])])
            gi = _per_sample(g[i])
            if self.target_kind != self.kind:
                p = ops.pred_from_x0(x, ops.x0_from_pred(x, p, gi, self.kind), gi, self.target_kind)
            if i == 0 or getattr(self.config, "use_double_loss", False):
                per = (p.float() - t.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
                if self.mixed is not None:
                    per = per / self.mixed[i] * (torch.arange(B, device=per.device) < k)
                stats[f"loss_level{i}"] = per.detach().mean()
            else:
                per = p.mean() * 0.0  # keeps the level in the graph (DDP), as the public code does
            total = total + per * self.level_weights[i]
        if self.config.use_vdm_loss_weights:
            w = self.schedule.vdm_weights_on(images.device)[times + 1]
            return (total * w).sum() / w.sum(), stats
        return total.mean(), stats

    # ---- model predictions -----------------------------------------------------------------

    def predict(self, model, x_t: Sequence[Tensor], model_times: Tensor, conditioning: Tensor,
                cond_mask: Optional[Tensor], micros: Optional[dict] = None) -> List[Tensor]:
        """The model's predictions per level, with the output scale and the low-resolution residual."""
        x_t = list(x_t)
        if len(x_t) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels of x_t, got {len(x_t)}")
        if self.nested:
            out = list(model(x_t, model_times, conditioning, cond_mask, micros or {}))
        else:
            out = [model(x_t[0], model_times, conditioning, cond_mask, micros or {})]
        if len(out) != self.num_levels:
            raise ValueError(f"the model returned {len(out)} levels, expected {self.num_levels}")
        s = self.config.model_output_scale
        if s:
            out = [torch.tanh(p / s) * s for p in out]
        if self.residual:
            out = self._add_residual(x_t, out, model_times)
        return out

    def _add_residual(self, x_t: List[Tensor], out: List[Tensor], model_times: Tensor) -> List[Tensor]:
        g = self.schedule.at(model_times + 1)  # (L, B)
        scales = self.signal_scales
        for i in range(self.num_levels - 2, -1, -1):
            g_lo, g_hi = _per_sample(g[i + 1]), _per_sample(g[i])
            x0_lo = (ops.x0_from_pred(x_t[i + 1], out[i + 1], g_lo, self.kind) * scales[i + 1]).clamp(-1, 1)
            up = resize(x0_lo, scale_factor=self.ratios[i + 1] // self.ratios[i], mode="bicubic") / scales[i]
            out[i] = out[i] + ops.pred_from_x0(x_t[i], up, g_hi, self.kind)
        return out

    # ---- sampling (see mdm_fast.diffusion.sampler) -----------------------------------------

    def make_denoise(self, model, conditioning, cond_mask, guidance_scale: float = 1.0, micros=None,
                     uncond_conditioning=None, uncond_mask=None, autocast: Optional[torch.dtype] = None):
        from mdm_fast.diffusion.sampler import make_denoise

        return make_denoise(self, model, conditioning, cond_mask, guidance_scale, micros,
                            uncond_conditioning, uncond_mask, autocast)

    def sampler(self, num_inference_steps: Optional[int] = None, ddim_eta: Optional[float] = None,
                threshold=None):
        from mdm_fast.diffusion.sampler import Sampler

        return Sampler(self, num_inference_steps, ddim_eta, threshold, impl=self.impl)

    def sample(self, model, conditioning: Tensor, cond_mask: Optional[Tensor], image_size, *,
               channels: int = 3, num_inference_steps: Optional[int] = None, ddim_eta: Optional[float] = None,
               threshold=None, guidance_scale: float = 1.0, micros: Optional[dict] = None,
               uncond_conditioning: Optional[Tensor] = None, uncond_mask: Optional[Tensor] = None,
               init_images: Optional[Tensor] = None, start_t: Optional[int] = None,
               generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None) -> List[Tensor]:
        """Images in [-1, 1], one tensor per level (top first): from noise, or from ``init_images``
        noised to step ``start_t`` (partial diffusion)."""
        sampler = self.sampler(num_inference_steps, ddim_eta, threshold)
        denoise = self.make_denoise(model, conditioning, cond_mask, guidance_scale, micros,
                                    uncond_conditioning, uncond_mask)
        device = conditioning.device
        if init_images is not None:
            if start_t is None:
                raise ValueError("init_images needs start_t (the step to noise them to)")
            x_t = sampler.noised_start(init_images, start_t, generator)
        else:
            B = batch_size or (conditioning.shape[0] if uncond_conditioning is not None or guidance_scale == 1
                               else conditioning.shape[0] // 2)
            x_t = sampler.initial_noise(B, channels, image_size, generator=generator, device=device)
        return sampler.sample(denoise, x_t, start_t=start_t, generator=generator)
