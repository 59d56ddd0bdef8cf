"""Samplers over all resolutions jointly: ancestral DDPM and DDIM, any number of steps, CFG.

The loop is plain Python over a ``denoise(x_t_list, model_times) -> predictions`` callable (so a
CUDA-graph replay can stand in for it) and one :func:`mdm_fast.ops.diffusion_step.sampler_update`
per step for every level at once. Public semantics (``samplers.py``): model time t - 1 at schedule
step t, the public inference spacing, x0 thresholding in image units (x0 * signal scale), the final
sample clipped to [-1, 1]. A step that ends at s = 0 injects no noise (its variance is zero), but draws
it where the public sampler does (from every t but 1), so that a seeded stream of several batches stays
the public one; the model predicts in eval mode.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from mdm_fast.diffusion.config import ThresholdType
from mdm_fast.models.cast_weights import CastWeights
from mdm_fast.ops import diffusion_step as ops
from mdm_fast.ops.resample import resize
from mdm_fast.text.encoders import pad_tokens

Denoise = Callable[[List[Tensor], Tensor], List[Tensor]]


def inference_timesteps(num_diffusion_steps: int, num_inference_steps: int) -> List[int]:
    """The public ``set_timesteps``: round(k (N+1)/(n+1)) for k = n..0, e.g. N = n: N, N-1, ..., 0."""
    N, n = int(num_diffusion_steps), int(num_inference_steps)
    if not 1 <= n <= N:
        raise ValueError(f"num_inference_steps must be in [1, {N}] (num_diffusion_steps), got {num_inference_steps}")
    ratio = (N + 1) / (n + 1)
    return (np.arange(0, n + 1) * ratio).round()[::-1].astype(np.int64).tolist()


def _double_micros(micros: Optional[dict], batch: int) -> dict:
    out = {}
    for k, v in (micros or {}).items():
        out[k] = torch.cat([v, v]) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else v
    return out


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside (dropout off), as the public ``Diffusion.sample`` sets it; the mode
    it had is restored after (the trainer samples its grids between steps)."""
    training = model.training
    if training:
        model.train(False)
    try:
        yield
    finally:
        if training:
            model.train(True)


def make_denoise(diffusion, model, conditioning: Tensor, cond_mask: Optional[Tensor], guidance_scale: float = 1.0,
                 micros: Optional[dict] = None, uncond_conditioning: Optional[Tensor] = None,
                 uncond_mask: Optional[Tensor] = None, autocast: Optional[torch.dtype] = None) -> Denoise:
    """``denoise(x_t_list, model_times)`` of ``model`` under ``diffusion`` (a NestedDiffusion).

    ``autocast``: the model runs under ``torch.autocast`` to that dtype (bfloat16 on a GPU: what the
    models are benchmarked at), with its convolution and linear weights cast once, now
    (:class:`mdm_fast.models.CastWeights`, shared with the live denoisers of the same frozen weights:
    make a new denoiser after the weights change); its
    predictions come back in x_t's dtype, and guidance and the sampler update run there.

    guidance_scale != 1: classifier-free guidance as the public code does it: one model call on the
    doubled batch [uncond; cond], then uncond + scale (cond - uncond). The null rows come from
    ``uncond_conditioning``/``uncond_mask`` (B rows, or 1 row broadcast; fewer tokens than
    ``conditioning`` are padded with masked zeros, the null the trainer's conditioning dropout shows the
    model; without ``uncond_mask`` every token of the null counts), else ``conditioning`` must already
    hold 2B rows in that order (the public layout).
    ``conditioning`` and ``cond_mask`` are read at every call: a caller may copy the next batch's into them.
    """
    scale = float(guidance_scale)
    if not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
    null = null_mask = None
    if scale != 1 and uncond_conditioning is not None:
        n, T = conditioning.shape[:2]
        null = pad_tokens(uncond_conditioning, T).expand(n, T, *conditioning.shape[2:])
        if cond_mask is not None:
            m = uncond_mask if uncond_mask is not None else cond_mask.new_ones(uncond_conditioning.shape[:2])
            null_mask = pad_tokens(m.to(cond_mask.dtype), T).expand(n, T)

    def inputs():  # (B or 2B rows of conditioning, mask)
        if null is None:
            return conditioning, cond_mask
        return torch.cat([null, conditioning]), None if cond_mask is None else torch.cat([null_mask, cond_mask])

    cast_model = None if autocast is None else CastWeights.shared(model, autocast)

    def predict(x_t: List[Tensor], *args) -> List[Tensor]:
        with _eval_mode(model):
            if cast_model is None:
                return diffusion.predict(model, x_t, *args)
            with torch.autocast(x_t[0].device.type, dtype=autocast):
                preds = diffusion.predict(cast_model, x_t, *args)
        return [p.to(x.dtype) for p, x in zip(preds, x_t)]

    def denoise(x_t: List[Tensor], model_times: Tensor) -> List[Tensor]:
        B = x_t[0].shape[0]
        cond, mask = inputs()
        if scale == 1:
            return predict(x_t, model_times, cond, mask, micros)
        if cond.shape[0] != 2 * B:
            raise ValueError(f"classifier-free guidance needs 2 x {B} conditioning rows ([uncond; cond]) or "
                             f"uncond_conditioning; got {cond.shape[0]} rows")
        preds = predict([torch.cat([x, x]) for x in x_t], torch.cat([model_times, model_times]), cond, mask,
                        _double_micros(micros, B))
        out = []
        for p in preds:
            uncond, cnd = p.chunk(2)
            out.append(uncond + scale * (cnd - uncond))
        return out

    return denoise


@dataclass
class SamplerStep:
    """One step t -> s; x0 and x_s in level units, one tensor per level (top first)."""

    t: int
    s: int
    x0: List[Tensor]
    x_s: List[Tensor]


class Sampler:
    """Ancestral DDPM (``ddim_eta=None``) or DDIM (eta >= 0) over every level of ``diffusion``."""

    def __init__(self, diffusion, num_inference_steps: Optional[int] = None, ddim_eta: Optional[float] = None,
                 threshold: Union[None, str, ThresholdType] = None, impl: str = "auto"):
        self.diffusion = diffusion
        N = diffusion.schedule.num_steps
        self.timesteps = inference_timesteps(N, N if num_inference_steps is None else num_inference_steps)
        if ddim_eta is not None and not 0 <= ddim_eta < math.inf:  # NaN fails both
            raise ValueError(f"ddim_eta must be None (ancestral DDPM) or a finite number >= 0, got {ddim_eta}")
        self.ddim_eta = ddim_eta
        kind = ThresholdType.parse(threshold if threshold is not None
                                   else diffusion.config.sampler_config.threshold_function)
        self.threshold = kind.name.lower()
        self.impl = impl

    def initial_noise(self, batch: int, channels: int, image_size, generator: Optional[torch.Generator] = None,
                      device=None, dtype: torch.dtype = torch.float32) -> List[Tensor]:
        """Pure noise for every level (top first), drawn in level order as the public sampler does.
        Without a ``generator`` the draws are the public ones after the same ``torch.manual_seed``: the
        top level from the CPU's generator (moved to ``device``), the others on ``device``."""
        sizes = self.diffusion.level_sizes(image_size)
        if generator is not None:
            return [torch.randn(batch, channels, h, w, generator=generator, device=device, dtype=dtype)
                    for h, w in sizes]
        top = torch.randn(batch, channels, *sizes[0]).to(device=device, dtype=dtype)
        return [top] + [torch.randn(batch, channels, h, w, device=device, dtype=dtype) for h, w in sizes[1:]]

    def noised_start(self, images: Tensor, t: int, generator: Optional[torch.Generator] = None) -> List[Tensor]:
        """The pyramid of ``images`` ((B, C, H, W) in [-1, 1]) noised to schedule step t (partial diffusion)."""
        self._check_start("start step", t)
        times = torch.full((images.shape[0],), t - 1, dtype=torch.long, device=images.device)
        return self.diffusion.pyramid(images, times, generator)[1]

    def _check_start(self, name: str, t: int) -> None:
        if not 1 <= t <= self.diffusion.schedule.num_steps:
            raise ValueError(f"{name} must be in [1, {self.diffusion.schedule.num_steps}], got {t}")

    def _gammas(self, step: int, batch: int, device) -> Tensor:
        return self.diffusion.schedule.table(device)[:, step, None].expand(-1, batch)  # (L, B)

    def step(self, denoise: Denoise, x_t: List[Tensor], times: Tensor, g_t: Tensor, g_s: Tensor,
             noise: Optional[List[Tensor]]) -> Tuple[List[Tensor], List[Tensor]]:
        """One step of every level: (x0, x_s). Tensors only, no host sync: a CUDA graph can capture it
        (noise at the last step, where the posterior std is 0, may be given as zeros)."""
        preds = denoise(x_t, times)
        x0, x_s, _ = ops.sampler_update(x_t, preds, g_t, g_s, noise, self.diffusion.signal_scales,
                                        self.diffusion.kind, self.ddim_eta, self.threshold, impl=self.impl)
        return x0, x_s

    def precompile(self, denoise: Denoise, x_t: Sequence[Tensor]):
        """Compile the Triton kernels of the first and the last step (their shapes; the last one adds no
        noise) in parallel before sampling starts: :func:`mdm_fast.engine.precompile`. Changes no
        value and draws no random numbers; returns its stats (None when there is nothing to do)."""
        from mdm_fast.engine.precompile import precompile

        x_t, ts = list(x_t), self.timesteps
        if len(ts) < 2:
            return None
        B, device = x_t[0].shape[0], x_t[0].device
        noisy = self.ddim_eta is None or self.ddim_eta > 0

        def first_and_last():
            for t, s in dict.fromkeys([(ts[0], ts[1]), (ts[-2], ts[-1])]):
                times = torch.full((B,), t - 1, dtype=torch.long, device=device)
                noise = [torch.zeros_like(x) for x in x_t] if noisy and s > 0 else None
                self.step(denoise, x_t, times, self._gammas(t, B, device), self._gammas(s, B, device), noise)

        with torch.no_grad():
            return precompile(first_and_last)

    def steps(self, denoise: Denoise, x_t: Sequence[Tensor], start_t: Optional[int] = None,
              generator: Optional[torch.Generator] = None, step_fn: Optional[Callable] = None
              ) -> Iterator[SamplerStep]:
        """Run the loop from x_t (at the first timestep, or at ``start_t``), yielding every step.

        With ``start_t`` the loop takes the steps at or below it, as the public sampler does: x_t is
        denoised from the largest inference step <= start_t (start_t itself where it is one of them).

        ``step_fn(x_t, times, g_t, g_s, noise) -> (x0, x_s)`` replaces :meth:`step` (with ``denoise``
        bound), e.g. by its CUDA-graph replay (:class:`mdm_fast.engine.GraphedCallable`); it then
        always gets a noise tensor, zeros where none is injected.
        """
        if start_t is not None:
            self._check_start("start_t", start_t)
        ts = [t for t in self.timesteps if start_t is None or t <= start_t]
        x_t = list(x_t)
        B, device = x_t[0].shape[0], x_t[0].device
        noisy = self.ddim_eta is None or self.ddim_eta > 0
        nested = self.diffusion.nested
        for t, s in zip(ts[:-1], ts[1:]):
            with torch.no_grad():
                times = torch.full((B,), t - 1, dtype=torch.long, device=device)
                noise = None
                # drawn as the public samplers draw: NestedSampler at every step but from t = 1, Sampler at
                # every step but to s = 0 (so the next batch's draws stay the public ones too)
                if noisy and (t != 1 if nested else s != 0):
                    noise = [torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype) for x in x_t]
                if s == 0:  # but none added where the posterior's variance is 0
                    noise = None
                g_t, g_s = self._gammas(t, B, device), self._gammas(s, B, device)
                if step_fn is None:
                    x0, x_t = self.step(denoise, x_t, times, g_t, g_s, noise)
                else:
                    x0, x_t = step_fn(x_t, times, g_t, g_s, noise or [torch.zeros_like(x) for x in x_t])
            yield SamplerStep(t, s, x0, x_t)

    def to_images(self, levels: Sequence[Tensor], clip: bool = True) -> List[Tensor]:
        """Level units -> image units (x * signal scale), clipped to [-1, 1]."""
        out = [x * s for x, s in zip(levels, self.diffusion.signal_scales)]
        return [x.clamp(-1, 1) for x in out] if clip else out

    def sample(self, denoise: Denoise, x_t: Sequence[Tensor], start_t: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> List[Tensor]:
        """The final images of every level, in [-1, 1] (top first)."""
        last = list(x_t)
        for st in self.steps(denoise, x_t, start_t, generator):
            last = st.x_s
        return self.to_images(last)


def tile_levels(levels: Sequence[Tensor], mode: str = "bilinear") -> Tensor:
    """Every level upsampled to the top size, side by side (lowest first, as the public output_inner):
    (B, C, H, L * W)."""
    H, W = levels[0].shape[-2:]
    return torch.cat([x if x.shape[-2:] == (H, W) else resize(x, size=(H, W), mode=mode)
                      for x in reversed(list(levels))], dim=-1)
