"""Model config dataclasses with the public field names and semantics (apple/ml-mdm).

``unet_config_from_dict(model_name, d)`` turns the ``unet_config`` block of a public YAML (a plain
dict, nested dicts for ``inner_config`` and ``resnet_config``) into typed configs. String forms
(``"2,3"``) and lists are both accepted; an unknown field raises a ValueError naming it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from mdm_fast.config_values import coerce, dataclass_from, none_string

IntList = Union[str, List[int], None]

# Public registry names -> nesting depth (number of NestedUNet levels around the innermost UNet).
MODEL_DEPTHS = {"unet": 0, "nested_unet": 1, "nested2_unet": 2, "nested3_unet": 3, "nested4_unet": 4}


@dataclass
class ResNetConfig:
    num_channels: int = -1
    output_channels: int = -1
    num_groups_norm: int = 32
    dropout: float = 0.0
    use_attention_ffn: bool = False


def _int_list(value: IntList, name: str) -> Optional[List[int]]:
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    try:
        if isinstance(value, str):
            value = value.strip()
            return [int(v) for v in value.split(",")] if value else []
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"unet_config.{name}: expected a list of ints or a string like '2,3', got {value!r}"
                         ) from None


def _per_level(value: IntList, name: str, levels: int, least: int = 0) -> List[int]:
    """A per-resolution list; one value is repeated for every level (as the public string form)."""
    out = _int_list(value, name)
    if out is None:
        raise ValueError(f"unet_config.{name}: expected a value per resolution, got None")
    if len(out) == 1:
        out = out * levels
    if len(out) != levels:
        raise ValueError(f"unet_config.{name}: expected 1 or {levels} values (one per entry of "
                         f"resolution_channels), got {len(out)}: {out}")
    if min(out) < least:
        raise ValueError(f"unet_config.{name}: expected values >= {least}, got {out}")
    return out


@dataclass
class UNetConfig:
    num_resnets_per_resolution: IntList = "2"
    temporal_dim: Optional[int] = None  # default 4 x resolution_channels[0]
    attention_levels: IntList = "2,3"
    num_attention_layers: IntList = "1"
    num_temporal_attention_layers: IntList = None  # only used in the temporal mode
    conditioning_feature_dim: int = -1
    conditioning_feature_proj_dim: int = -1
    num_lm_head_layers: int = 0
    masked_cross_attention: int = 1
    resolution_channels: IntList = "128,256,256,512,1024"
    skip_mid_blocks: bool = False
    skip_cond_emb: bool = False
    nesting: bool = False
    micro_conditioning: Optional[str] = None  # "LABEL:DEFAULT,..." e.g. "scale:64"
    temporal_mode: bool = False
    temporal_spatial_ds: bool = False
    temporal_positional_encoding: bool = False
    resnet_config: ResNetConfig = field(default_factory=ResNetConfig)

    def __post_init__(self):
        self.resolution_channels = _int_list(self.resolution_channels, "resolution_channels")
        if not self.resolution_channels or min(self.resolution_channels) < 1:
            raise ValueError(f"unet_config.resolution_channels: expected one or more channel counts >= 1, got "
                             f"{self.resolution_channels}")
        levels = len(self.resolution_channels)
        self.attention_levels = _int_list(self.attention_levels, "attention_levels") or []
        self.num_attention_layers = _per_level(self.num_attention_layers, "num_attention_layers", levels)
        self.num_resnets_per_resolution = _per_level(
            self.num_resnets_per_resolution, "num_resnets_per_resolution", levels, least=1)
        if self.num_temporal_attention_layers is not None:
            self.num_temporal_attention_layers = _per_level(
                self.num_temporal_attention_layers, "num_temporal_attention_layers", levels)
        if self.temporal_spatial_ds and any(self.num_temporal_attention_layers or []):
            raise ValueError("unet_config.num_temporal_attention_layers: temporal attention is not built with "
                             "temporal_spatial_ds: true (the public code builds none, then fails calling it); "
                             "set the layers to 0 or temporal_spatial_ds: false")
        if not isinstance(self.resnet_config, ResNetConfig):
            self.resnet_config = dataclass_from(ResNetConfig, self.resnet_config, "unet_config.resnet_config")
        if self.resnet_config.num_groups_norm < 1:
            raise ValueError(f"unet_config.resnet_config.num_groups_norm: expected >= 1, got "
                             f"{self.resnet_config.num_groups_norm}")
        if self.temporal_dim is not None and self.temporal_dim % 8:
            raise ValueError(f"unet_config.temporal_dim: expected a multiple of 8, got {self.temporal_dim}")
        if self.micro_conditioning is not None:
            parse_micro_conditioning(self.micro_conditioning)


@dataclass
class NestedUNetConfig(UNetConfig):
    inner_config: UNetConfig = field(default_factory=lambda: UNetConfig(nesting=True))
    skip_mid_blocks: bool = True
    skip_cond_emb: bool = True
    skip_inner_unet_input: bool = False  # the inner UNet gets only the low-resolution image
    skip_normalization: bool = False
    initialize_inner_with_pretrained: Optional[str] = None  # path of a lower-resolution checkpoint
    freeze_inner_unet: bool = False
    interp_conditioning: bool = False


def parse_micro_conditioning(spec: str) -> Dict[str, float]:
    """``"scale:64,watermark:0"`` -> ``{"scale": 64.0, "watermark": 0.0}``. Labels are kept as written,
    spaces included, as the public code keeps them: ``"scale:16, wm:0"`` names the layers of `` wm``
    (``cond_layers. wm.0.weight`` in its checkpoints)."""
    out = {}
    for item in spec.split(","):
        name, sep, default = item.partition(":")
        try:
            out[name] = float(default)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"unet_config.micro_conditioning: expected 'LABEL:DEFAULT[,LABEL:DEFAULT]', got {spec!r}")
    return out


def unet_config_from_dict(model_name: str, d: Union[Dict[str, Any], UNetConfig], *, _where: str = "unet_config",
                          _inner: bool = False) -> UNetConfig:
    """The typed config of public model ``model_name`` from a YAML ``unet_config`` block, or from a config
    object: ours or the public code's (``args.unet_config``, dataclasses of the same fields). The public
    UNet's constructor overwrites its config's ``conditioning_feature_dim`` with the projection width: a
    config object a public model was built from needs the text width set back, as the public
    ``generate_sample.py`` does."""
    if model_name not in MODEL_DEPTHS:
        raise ValueError(f"unknown model name {model_name!r}; expected one of {list(MODEL_DEPTHS)}")
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        d = dataclasses.asdict(d)
    d = dict(d)
    depth = MODEL_DEPTHS[model_name]
    overrides: Dict[str, Any] = {}
    if isinstance(d.get("resnet_config"), dict):  # here, where the error can name the block's place
        d["resnet_config"] = dataclass_from(ResNetConfig, d["resnet_config"], f"{_where}.resnet_config")
    if _inner:
        if coerce(f"{_where}.nesting", d.get("nesting", True), bool) is False:
            raise ValueError(f"{_where}.nesting: an inner UNet must have nesting: true")
        overrides["nesting"] = True
    if depth == 0:
        return dataclass_from(UNetConfig, d, _where, **overrides)
    inner_name = "unet" if depth == 1 else f"nested{depth - 1}_unet".replace("nested1_", "nested_")
    inner = d.pop("inner_config", {}) or {}
    overrides["inner_config"] = unet_config_from_dict(inner_name, inner, _where=f"{_where}.inner_config",
                                                      _inner=True)
    if "initialize_inner_with_pretrained" in d:
        d["initialize_inner_with_pretrained"] = none_string(d["initialize_inner_with_pretrained"], empty=True)
    return dataclass_from(NestedUNetConfig, d, _where, **overrides)


def model_name_of(config: UNetConfig) -> str:
    depth = 0
    while isinstance(config, NestedUNetConfig):
        depth += 1
        config = config.inner_config
    return {v: k for k, v in MODEL_DEPTHS.items()}[depth]
