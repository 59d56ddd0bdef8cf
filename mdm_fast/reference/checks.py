"""Input validation for the models: a clear ValueError naming what was expected."""
from __future__ import annotations

from typing import Sequence

import torch


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_model_inputs(model, x_t, times, conditioning, cond_mask) -> torch.Tensor:
    """Check ``model(x_t, times, conditioning, cond_mask)`` arguments against the model's config; returns
    ``times`` with one time per sample: a single time (shape () or (1,)) is every sample's, as the public
    code's broadcasting makes it."""
    ratios = model.resolution_ratios()
    xs: Sequence[torch.Tensor]
    if len(ratios) == 1:
        if isinstance(x_t, (list, tuple)):
            if len(x_t) != 1:
                raise ValueError(f"x_t: a UNet takes one resolution, got a list of {len(x_t)}")
            x_t = x_t[0]
        xs = [x_t]
    else:
        if not isinstance(x_t, (list, tuple)) or len(x_t) != len(ratios):
            got = f"a list of {len(x_t)}" if isinstance(x_t, (list, tuple)) else "one tensor"
            raise ValueError(f"x_t: {model.model_type} expects a list of {len(ratios)} resolutions, highest first "
                             f"(top/level ratios {ratios}), got {got}")
        xs = x_t
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x_t[{i}]: expected a (B, C, H, W) tensor, got {_shape(x)}")
        if x.size(1) != model.input_channels:
            raise ValueError(f"x_t[{i}]: expected {model.input_channels} channels, got shape {_shape(x)}")
    top_h, top_w = xs[0].shape[-2:]
    for i, (x, r) in enumerate(zip(xs, ratios)):
        if i and (x.size(-2) * r != top_h or x.size(-1) * r != top_w):
            raise ValueError(f"x_t[{i}]: expected resolution {top_h // r}x{top_w // r} (the top resolution "
                             f"{top_h}x{top_w} divided by the nesting ratio {r}), got {_shape(x)}")
        if i and x.size(0) < xs[i - 1].size(0):
            raise ValueError(f"x_t[{i}]: a lower resolution needs at least as many samples as x_t[{i - 1}] "
                             f"(mixed batches put the extra samples at low resolution), got {_shape(x)}")
    batch = xs[-1].size(0)
    if isinstance(times, torch.Tensor) and times.shape != (batch,) and times.shape in ((), (1,)):
        times = times.reshape(1).expand(batch).contiguous()  # (batch,)
    if not isinstance(times, torch.Tensor) or times.shape != (batch,):
        raise ValueError(f"times: expected shape ({batch},) (one time per sample of the lowest resolution) or "
                         f"one time for all, got {_shape(times)}")
    _check_conditioning(model, batch, conditioning, cond_mask)
    return times


def _check_conditioning(model, batch: int, conditioning, cond_mask) -> None:
    width = model.input_conditioning_feature_dim
    if model.config.conditioning_feature_dim <= 0:
        return
    if not isinstance(conditioning, torch.Tensor) or conditioning.dim() != 3 or conditioning.size(0) != batch \
            or conditioning.size(2) != width:
        raise ValueError(f"conditioning: expected (B={batch}, T, {width}) text features "
                         f"(unet_config.conditioning_feature_dim = {width}), got {_shape(conditioning)}")
    if cond_mask is not None and (not isinstance(cond_mask, torch.Tensor)
                                  or cond_mask.shape != conditioning.shape[:2]):
        raise ValueError(f"cond_mask: expected shape ({batch}, {conditioning.size(1)}) matching conditioning, "
                         f"got {_shape(cond_mask)}")
