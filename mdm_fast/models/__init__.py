"""The fast NestedUNet: same configs, same state_dict, same numbers as the reference, fused ops inside.

``build_model`` builds it from a public ``unet_config``; ``optimize`` converts an existing
reference model (in place) or a public-code (apple/ml-mdm) model (a fast copy with its weights).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Union

import torch.nn as nn

from mdm_fast import reference
from mdm_fast.models.cast_weights import CastEachCall, CastWeights  # noqa: F401
from mdm_fast.models.fast import (FastNestedUNet, FastUNet, convert, is_fast,  # noqa: F401
                                  set_activation_checkpointing, set_channels_last, set_norm_recompute)
from mdm_fast.reference.config import UNetConfig


def build_model(model_name: str, unet_config: Union[Dict[str, Any], UNetConfig], input_channels: int = 3,
                output_channels: int = 3, impl: str = "auto", channels_last: bool = True) -> nn.Module:
    """The fast model ``model_name`` (same arguments as :func:`mdm_fast.reference.build_model`);
    ``impl`` forces one backend for every op ("auto", "ref", "triton", "cuda", ...); ``channels_last``
    lays the convolution weights out NHWC (see :func:`set_channels_last`)."""
    model = reference.build_model(model_name, unet_config, input_channels, output_channels)
    return convert(model, impl, channels_last)


def forget_derived_weights() -> None:
    """Make every fast model rebuild the weights it derives and keeps for sampling (time and text
    projections, sub-pixel upsample weights) and find its blocks again. Needed only after writing a frozen
    model's weights through ``.data``, which no version counter sees (``copy_``, ``load_state_dict``,
    in-place ops under ``torch.no_grad()`` and optimizer steps are seen), or after replacing a submodule
    (``block.time_layer = nn.Linear(...)``) of a model that already ran."""
    from mdm_fast.ops.time_proj import ParamCache

    ParamCache.forget_all()


def _depth(config) -> int:
    depth = 0
    while getattr(config, "inner_config", None) is not None:
        depth, config = depth + 1, config.inner_config
    return depth


def optimize(module: nn.Module, impl: str = "auto", channels_last: bool = True) -> nn.Module:
    """The fast version of ``module``.

    An mdm_fast reference model is converted in place (same parameter objects, so optimizers and
    references to parameters stay valid) and returned. A model of the public code is rebuilt as
    a fast mdm_fast model with the same weights (a copy; the public instance is untouched).
    """
    if isinstance(getattr(module, "_orig_mod", None), nn.Module):
        raise ValueError("optimize: got a torch.compile wrapper; pass the model itself "
                         "(torch.compile(mdm_fast.optimize(model)) compiles the fast model)")
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ValueError(f"optimize: got a {type(module).__name__} wrapper; pass the model itself (its .module), "
                         "then wrap the fast model")
    if isinstance(module, reference.UNet):
        return convert(module, impl, channels_last)
    config = getattr(module, "config", None)
    if config is None or not dataclasses.is_dataclass(config) or not hasattr(module, "input_conditioning_feature_dim"):
        raise ValueError(f"optimize: expected an mdm_fast or apple/ml-mdm UNet/NestedUNet, got {type(module).__name__}")
    cfg = dataclasses.asdict(config)
    # the public constructor replaced the text width by the projection width: restore what was passed
    cfg["conditioning_feature_dim"] = module.input_conditioning_feature_dim
    depth = _depth(config)
    name = "unet" if depth == 0 else ("nested_unet" if depth == 1 else f"nested{depth}_unet")
    fast = build_model(name, cfg, module.input_channels, module.output_channels, impl, channels_last)
    first = next(module.parameters())
    fast.to(device=first.device, dtype=first.dtype)
    fast.load_state_dict(module.state_dict(), strict=True)
    mine = dict(fast.named_modules())
    for name, m in module.named_modules():  # its train/eval modes and frozen parameters too
        if name in mine:
            mine[name].training = m.training
    for name, p in module.named_parameters():
        fast.get_parameter(name).requires_grad_(p.requires_grad)
    return fast
