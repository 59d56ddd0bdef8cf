"""Diffusion configs with the public ml-mdm field names and defaults, plus strict ``from_dict``."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type, TypeVar

from mdm_fast.config_values import dataclass_from


class _NamedEnum(enum.Enum):
    """An enum parsed from its name in any case (``"deepfloyd"``, ``"V_PREDICTION"``)."""

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: Any):
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.strip().upper() in cls.__members__:
            return cls[value.strip().upper()]
        names = ", ".join(cls.__members__)
        raise ValueError(f"{cls.__name__}: unknown value {value!r}; expected one of {names}")


class ScheduleType(_NamedEnum):
    COSINE = 0
    DDPM = 2
    DEEPFLOYD = 3
    SIGMOID = 4


class PredictionType(_NamedEnum):
    DDPM = 3  # epsilon
    DDIM = 4  # epsilon
    V_PREDICTION = 5
    X0 = 6  # not in the public code: the model predicts the clean image


class ThresholdType(_NamedEnum):
    NONE = 0
    CLIP = 1
    DYNAMIC = 2  # Imagen: 99.5th percentile, at most 100
    DYNAMIC_IF = 3  # DeepFloyd: 95th percentile, at most 1.5


T = TypeVar("T")


def _from_dict(cls: Type[T], d: Dict[str, Any], where: Optional[str] = None) -> T:
    """``cls`` from ``d``; errors named ``where`` (the YAML path: diffusion_config.sampler_config), else by
    the class."""
    return d if isinstance(d, cls) else dataclass_from(cls, d, where or cls.__name__)


def _to_dict(obj) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = _to_dict(v)
        elif isinstance(v, enum.Enum):
            v = v.name
        out[f.name] = v
    return out


def _ratio_list(text: Optional[str], name: str) -> Optional[List[float]]:
    """``"16:4:1"`` -> [16.0, 4.0, 1.0]; None stays None."""
    if text is None or text == "":
        return None
    try:
        vals = [float(x) for x in str(text).split(":")]
    except ValueError:
        raise ValueError(f"{name} must look like '4:1' (colon-separated numbers), got {text!r}") from None
    if any(v < 0 for v in vals) or sum(vals) <= 0:
        raise ValueError(f"{name} must hold non-negative numbers with a positive sum, got {text!r}")
    return vals


@dataclass
class SamplerConfig:
    num_diffusion_steps: int = 32
    reproject_signal: bool = False  # accepted for compatibility; unused by the public sampler too
    schedule_type: ScheduleType = ScheduleType.DDPM
    prediction_type: PredictionType = PredictionType.DDPM
    loss_target_type: Optional[PredictionType] = None  # None: same as prediction_type
    beta_start: float = 0.0001
    beta_end: float = 0.02
    threshold_function: ThresholdType = ThresholdType.CLIP
    rescale_schedule: float = 1.0
    rescale_signal: Optional[float] = None
    schedule_shifted: bool = False
    schedule_shifted_power: float = 1.0

    def __post_init__(self):
        self.schedule_type = ScheduleType.parse(self.schedule_type)
        self.prediction_type = PredictionType.parse(self.prediction_type)
        if self.loss_target_type is None:
            self.loss_target_type = self.prediction_type
        self.loss_target_type = PredictionType.parse(self.loss_target_type)
        self.threshold_function = ThresholdType.parse(self.threshold_function)
        if int(self.num_diffusion_steps) != self.num_diffusion_steps or self.num_diffusion_steps < 1:
            raise ValueError(f"num_diffusion_steps must be a positive integer, got {self.num_diffusion_steps!r}")
        self.num_diffusion_steps = int(self.num_diffusion_steps)
        if not 0 < self.beta_start < 1 or not 0 < self.beta_end < 1:
            raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {self.beta_start}, {self.beta_end}")
        if self.rescale_schedule is None or self.rescale_schedule <= 0:
            raise ValueError(f"rescale_schedule must be > 0, got {self.rescale_schedule!r}")
        if self.rescale_signal is not None and self.rescale_signal <= 0:
            raise ValueError(f"rescale_signal must be > 0 or None, got {self.rescale_signal!r}")

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: Optional[str] = None) -> "SamplerConfig":
        d = dict(d)
        # The public cc12m_64x64.yaml carries a field the public dataclass no longer has.
        if d.pop("predict_variances", False):
            raise ValueError("SamplerConfig: predict_variances=True is not supported (the public code dropped it)")
        if str(d.get("loss_target_type", "")).upper() == "HA_STYLE":
            raise ValueError(
                "SamplerConfig: loss_target_type HA_STYLE (public cc12m_64x64.yaml) does not exist in the "
                "public sampler either; set loss_target_type to DDPM or V_PREDICTION (or leave it out)"
            )
        return _from_dict(cls, d, where)

    def to_dict(self) -> Dict[str, Any]:
        return _to_dict(self)


@dataclass
class DiffusionConfig:
    sampler_config: SamplerConfig = field(default_factory=SamplerConfig)
    model_output_scale: float = 0.0  # non-zero: predictions become tanh(p / s) * s
    use_vdm_loss_weights: bool = True

    def __post_init__(self):
        if isinstance(self.sampler_config, dict):
            self.sampler_config = SamplerConfig.from_dict(self.sampler_config)
        if not isinstance(self.sampler_config, SamplerConfig):
            raise ValueError(f"sampler_config must be a SamplerConfig or a dict, got {type(self.sampler_config).__name__}")
        if self.model_output_scale is None or self.model_output_scale < 0:
            raise ValueError(f"model_output_scale must be >= 0, got {self.model_output_scale!r}")

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: Optional[str] = None):
        where = where or cls.__name__
        if isinstance(d, dict) and isinstance(d.get("sampler_config"), dict):
            d = {**d, "sampler_config": SamplerConfig.from_dict(d["sampler_config"], f"{where}.sampler_config")}
        return _from_dict(cls, d, where)

    def to_dict(self) -> Dict[str, Any]:
        return _to_dict(self)


@dataclass
class NestedDiffusionConfig(DiffusionConfig):
    use_double_loss: bool = False
    multi_res_weights: Optional[str] = None  # "16:4:1", needs use_double_loss
    no_use_residual: bool = False
    use_random_interp: bool = False  # public field, unused by the public loss too
    mixed_ratio: Optional[str] = None  # "2:1": the top level trains on 2/3 of the batch
    random_downsample: bool = False  # public field, unused by the public loss too
    average_downsample: bool = False  # public field, unused by the public loss too
    mid_downsample: bool = False  # public field, unused by the public loss too

    def __post_init__(self):
        super().__post_init__()
        weights = _ratio_list(self.multi_res_weights, "multi_res_weights")
        if weights is not None and not self.use_double_loss:
            raise ValueError("multi_res_weights only makes sense with use_double_loss: true (as in the public code)")
        _ratio_list(self.mixed_ratio, "mixed_ratio")
        if self.mixed_ratio and not self.no_use_residual:
            raise ValueError("mixed_ratio needs no_use_residual: true (the residual option does not support "
                             "mixed batches, as in the public code)")

    def multi_res_weight_list(self, num_levels: int) -> List[float]:
        w = _ratio_list(self.multi_res_weights, "multi_res_weights") or [1.0] * num_levels
        if len(w) < num_levels:
            raise ValueError(f"multi_res_weights {self.multi_res_weights!r} has {len(w)} entries, "
                             f"the model has {num_levels} resolutions")
        return w[:num_levels]

    def mixed_fractions(self, num_levels: int) -> Optional[List[float]]:
        """Cumulative batch fraction per level (top first), e.g. '2:1' -> [2/3, 1]; None if unset."""
        r = _ratio_list(self.mixed_ratio, "mixed_ratio")
        if r is None:
            return None
        if len(r) != num_levels:
            raise ValueError(f"mixed_ratio {self.mixed_ratio!r} has {len(r)} entries, the model has "
                             f"{num_levels} resolutions")
        total, out, acc = sum(r), [], 0.0
        for v in r:
            acc += v
            out.append(acc / total)
        return out
