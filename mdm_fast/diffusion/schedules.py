"""Noise schedules as gamma tables (gamma = alpha_bar = signal variance), per-level shifting.

The tables follow the public sampler bit for bit: the base schedule is computed in float64 (numpy),
stored as float32, and every shift is applied in float32 in the public order of operations.
Index 0 is the clean image (gamma = 1); index t in 1..N is diffusion step t.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch

from mdm_fast.diffusion.config import SamplerConfig, ScheduleType


def cosine_gammas(steps: int, logsnr_min: float = -5.0, logsnr_max: float = 5.0) -> np.ndarray:
    """Cosine schedule in log-SNR form (arXiv 2202.00512), float64 (steps + 1,)."""
    t = np.linspace(0.0, 1.0, num=steps)
    b = np.arctan(np.exp(-0.5 * logsnr_max))
    a = np.arctan(np.exp(-0.5 * logsnr_min)) - b
    logsnrs = -2.0 * np.log(np.tan(a * t + b))
    return np.concatenate(([1.0], 1 / (1 + np.exp(-logsnrs))))


def _gammas_from_betas(betas: Sequence[float]) -> np.ndarray:
    return np.exp(np.cumsum(np.log(1.0 - np.asarray(betas, dtype=np.float64))))


def ddpm_gammas(steps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """DDPM linear betas (arXiv 2006.11239), float64 (steps + 1,)."""
    return _gammas_from_betas(np.concatenate(([0], np.linspace(beta_start, beta_end, num=steps))))


def deepfloyd_gammas(steps: int) -> np.ndarray:
    """diffusers' squaredcos_cap_v2 betas (DeepFloyd IF), float64 (steps + 1,)."""

    def alpha_bar(x: float) -> float:
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [0.0] + [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
    return _gammas_from_betas(betas)


def sigmoid_gammas(steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                   clip_min: float = 1e-9) -> np.ndarray:
    """Sigmoid schedule of arXiv 2301.10972 (Algorithm 1 defaults), gamma(i / steps) for i in 0..steps.

    The public ``schedule_sigmoid`` is unusable (a malformed linspace, and the public sampler raises for
    SIGMOID), so this follows the cited paper: gamma(0) = 1 exactly, gamma(1) = clip_min.
    """
    t = np.arange(steps + 1, dtype=np.float64) / steps
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    v_start, v_end = sig(start / tau), sig(end / tau)
    g = (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)
    return np.clip(g, clip_min, 1.0)


def shift_gammas(gammas: torch.Tensor, ratio: float, power: float = 1.0) -> torch.Tensor:
    """Divide the SNR g / (1 - g) by ratio**power (MDM's resolution shift); ratio <= 1 is a no-op."""
    if ratio is None or ratio <= 1:
        return gammas
    scale = ratio**power
    snr = gammas / (1 - gammas)
    return 1 / (1 + 1 / (snr / scale))


def vdm_loss_weights(gammas: torch.Tensor) -> torch.Tensor:
    """Per-step VDM weights g_{t-1} (1 - g_t) / ((1 - g_{t-1}) g_t) - 1, indexed like ``gammas``."""
    g, g_last = gammas[2:], gammas[1:-1]
    w = g_last * (1 - g) / (1 - g_last) / g - 1
    return torch.cat([w[:1], w[:1], w])


def base_gammas(config: SamplerConfig) -> np.ndarray:
    n, kind = config.num_diffusion_steps, config.schedule_type
    if kind == ScheduleType.COSINE:
        return cosine_gammas(n)
    if kind == ScheduleType.DDPM:
        return ddpm_gammas(n, config.beta_start, config.beta_end)
    if kind == ScheduleType.DEEPFLOYD:
        return deepfloyd_gammas(n)
    if kind == ScheduleType.SIGMOID:
        return sigmoid_gammas(n)
    raise ValueError(f"unknown schedule_type {kind!r}")


def gamma_table(config: SamplerConfig) -> torch.Tensor:
    """The sampler's float32 gamma table (N+1,), after ``rescale_schedule`` (SNR / r**power).

    Unlike the public Sampler (which crashes there), rescale_schedule > 1 works.
    """
    g = torch.tensor(base_gammas(config)).float()
    return shift_gammas(g, config.rescale_schedule, config.schedule_shifted_power)


class LevelSchedule:
    """Per-level gamma tables of a nested model.

    ``scales[i]`` is level i's size over the lowest level's (``model.nest_ratio + [1]``; ``[1]`` for a
    plain UNet). With ``schedule_shifted`` level i's SNR is divided by scales[i]**power; otherwise level
    i's signal is divided by scales[i] instead (the public ``get_image_rescaled``). A plain UNet (one
    level) divides by ``rescale_signal``, shifted or not.
    """

    def __init__(self, config: SamplerConfig, scales: Sequence[int]):
        if not scales or any(int(s) < 1 for s in scales):
            raise ValueError(f"scales must be positive integers, top level first, got {list(scales)}")
        self.config = config
        self.scales: List[int] = [int(s) for s in scales]
        base = gamma_table(config)
        self.vdm_weights = vdm_loss_weights(base)  # (N+1,)
        if len(self.scales) == 1:  # the public plain UNet reads neither schedule_shifted nor the scales
            tables, self.signal_scales = [base], [float(config.rescale_signal or 1.0)]
        elif config.schedule_shifted:
            tables = [shift_gammas(base, s, config.schedule_shifted_power) for s in self.scales]
            self.signal_scales = [1.0] * len(self.scales)
        else:
            tables = [base] * len(self.scales)
            self.signal_scales = [float(s) for s in self.scales]
        self.gammas = torch.stack(tables)  # (L, N+1) float32
        self._copies = {}  # (name, device) -> the table on that device

    @property
    def num_steps(self) -> int:
        return self.config.num_diffusion_steps

    def table(self, device: torch.device) -> torch.Tensor:
        """The (L, N+1) gamma table on ``device``."""
        return self._on("gammas", device)

    def vdm_weights_on(self, device: torch.device) -> torch.Tensor:
        """The (N+1,) VDM loss weights on ``device``."""
        return self._on("vdm_weights", device)

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        """A table copied once per device: a step never copies from the host (a CUDA-graph capture forbids it)."""
        key = (name, torch.device(device))
        if key not in self._copies:
            self._copies[key] = getattr(self, name).to(key[1])
        return self._copies[key]

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """Per-level gammas at steps ``t`` (B,) int64 -> (L, B) float32 on t's device."""
        return self.table(t.device)[:, t]
