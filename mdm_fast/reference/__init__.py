"""The pure-PyTorch reference NestedUNet: identical to the public MDM code (apple/ml-mdm) in
structure, parameter names and numbers. Everything fast in mdm_fast is tested against it."""
from __future__ import annotations

from typing import Any, Dict, Union

import torch.nn as nn

from mdm_fast.reference.config import (MODEL_DEPTHS, NestedUNetConfig, ResNetConfig, UNetConfig,  # noqa: F401
                                       unet_config_from_dict)
from mdm_fast.reference.unet import NestedUNet, UNet  # noqa: F401

MODEL_NAMES = tuple(MODEL_DEPTHS)


def build_model(model_name: str, unet_config: Union[Dict[str, Any], UNetConfig], input_channels: int = 3,
                output_channels: int = 3) -> nn.Module:
    """The public model ``model_name`` ("unet", "nested_unet", ... "nested4_unet") from the
    ``unet_config`` block of a public YAML (``conditioning_feature_dim`` set to the text width)."""
    config = unet_config_from_dict(model_name, unet_config)
    cls = NestedUNet if isinstance(config, NestedUNetConfig) else UNet
    return cls(input_channels, output_channels, config)
