"""Experiment configs: a public ml-mdm experiment YAML as typed dataclasses, and back.

``load_experiment(path_or_dict)`` reads a YAML such as ``cc12m_256x256.yaml`` into an
:class:`ExperimentConfig`: the model name, the typed ``unet_config``
(:func:`mdm_fast.reference.config.unet_config_from_dict`), the diffusion config
(:mod:`mdm_fast.diffusion.config`), the reader config (:class:`mdm_fast.data.ReaderConfig`) and
the flat trainer / sampler / language-model fields of the public command lines, under their
public names. YAML quirks of the public files are accepted: dashed keys (``sample-dir``),
duplicated keys (the last one wins, as in the public loader), ``None`` written as a string.
An unknown field raises a ValueError naming it and the known ones.

As in the public ``train_parallel.py`` / ``generate_sample.py``, the model's
``conditioning_feature_dim`` is the text encoder's width; :meth:`ExperimentConfig.unet_dict`
sets it (``text_dim``) right before the model is built.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from mdm_fast.config_values import dataclass_from, field_kinds, none_string, parse_override
from mdm_fast.data.reader_config import ReaderConfig
from mdm_fast.files import write_text_atomic

_ALIASES = {"vision_model": "model"}


@dataclass
class ExperimentConfig:
    # ---- what is trained -------------------------------------------------------------------
    name: str = ""
    model: str = "unet"  # public registry name; `vision_model` is an alias
    unet_config: Any = None  # typed UNetConfig / NestedUNetConfig
    diffusion_config: Any = None  # typed DiffusionConfig / NestedDiffusionConfig
    reader_config: ReaderConfig = field(default_factory=ReaderConfig)
    # ---- conditioning (public language-model arguments) --------------------------------------
    text_model: str = "google/flan-t5-xl"
    vocab_file: str = "data/c4_wpm.vocab"
    categorical_conditioning: int = 0  # >0: class labels, one-hot of this many classes
    use_precomputed_text_embeddings: int = 0
    use_lm_mask: int = 1
    prediction_length: int = 129
    avg_lm_steps: int = 0
    text_encoder: str = "auto"  # ours: auto | class | t5 | hf | minilm | precomputed
    text_dim: int = -1  # ours: width of precomputed text embeddings
    cond_drop_prob: float = 0.0  # ours: fraction of samples trained unconditionally (for guidance)
    # ---- trainer ------------------------------------------------------------------------------
    file_list: str = ""  # training data (see mdm_fast.data.build_dataset)
    video_frames: int = 0  # ours: > 0 reads clips of this many frames (a square), tiled in the image
    output_dir: str = "runs/train"
    batch_size: int = 2
    lr: float = 0.001
    lr_scaling_factor: float = 0.8
    warmup_steps: int = 5000
    gradient_clip_norm: float = 2.0
    num_gradient_accumulations: int = 1
    loss_factor: float = 1.0
    log_freq: int = 100
    save_freq: int = 1000
    num_training_steps: int = 850000
    num_epochs: int = 20000
    fp16: int = 0  # public name: bf16 autocast on CUDA when set
    use_adamw: bool = True
    mixed_ratio: Optional[str] = None  # copied into the nested diffusion config
    multi_res_weights: Optional[str] = None  # copied into the nested diffusion config
    pretrained_vision_file: Optional[str] = None
    resume_from_ema: bool = False
    multinode: int = 1
    local_rank: int = 0
    seed: int = -1
    ema_decay: float = 0.9999
    ema_warmup_steps: int = 0
    sample_freq: int = 0  # 0: no periodic sample grids
    keep_checkpoints: int = 2  # at least 2: the previous good checkpoint stays
    distributed: str = "ddp"  # ddp | fsdp (used when WORLD_SIZE > 1)
    impl: str = "auto"  # the fast model's backends ("auto", "triton", ...), or "reference" for the oracle
    cuda_graphs: str = "auto"  # ours: auto (one CUDA process) | on | off: the step replayed from a CUDA graph
    # ---- sampler / evaluator ----------------------------------------------------------------
    model_file: str = ""
    sample_dir: str = "samples"
    sample_image_size: int = -1
    test_file_list: str = ""
    min_examples: int = 10000
    eval_freq: int = 1000
    num_eval_batches: int = 500
    port: int = 19231
    metrics: str = "fid,clip"
    # ---- bookkeeping kept for round trips -----------------------------------------------------
    dataset_config: str = ""
    reader_config_file: Optional[str] = None
    device: str = "cuda"
    loglevel: str = "INFO"

    # ---- derived ------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        if self.reader_config.image_size > 0:
            return self.reader_config.image_size
        if self.sample_image_size > 0:
            return self.sample_image_size
        raise ValueError("config: set reader_config.image_size (or sample_image_size) to the top resolution")

    def unet_dict(self, text_dim: Optional[int] = None) -> Dict[str, Any]:
        """The unet_config as the plain dict ``build_model`` takes, text width filled in at every level."""
        d = _plain(self.unet_config)
        if text_dim is not None:
            level = d
            while level is not None:
                level["conditioning_feature_dim"] = int(text_dim)
                level = level.get("inner_config")
        return d

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self, path: Optional[Union[str, Path]] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            write_text_atomic(path, text)
        return text

    def replace(self, **overrides) -> "ExperimentConfig":
        d = self.to_dict()
        for k, v in overrides.items():
            apply_override(d, k, v)
        return load_experiment(d)


def _plain(obj: Any) -> Any:
    """Dataclasses, enums and tuples to YAML-safe plain values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _undash(d: Any) -> Any:
    """``sample-dir`` -> ``sample_dir`` at every level (the public parser accepts both)."""
    if isinstance(d, dict):
        return {str(k).replace("-", "_"): _undash(v) for k, v in d.items()}
    return d


# Fields the public YAMLs set at the top level that belong to the nested diffusion config: one setting
# in two places. A file that sets both differently is refused; an override of either sets both.
MIRRORED = ("mixed_ratio", "multi_res_weights")


def _diffusion_config(model: str, d: Dict[str, Any], top: Dict[str, Any]):
    from mdm_fast.diffusion import config as dconf

    d = dict(d or {})
    if model != "unet":
        for key in MIRRORED:
            section, value = none_string(d.get(key)), none_string(top.get(key))
            if value is not None and section is not None and str(section) != str(value):
                raise ValueError(f"config: {key}={value!r} contradicts diffusion_config.{key}={section!r} "
                                 "(one setting: give one of them, or the same value)")
            if value is not None:
                d[key] = value
        return dconf.NestedDiffusionConfig.from_dict(d, "diffusion_config")
    return dconf.DiffusionConfig.from_dict(d, "diffusion_config")


def _override_kind(key: str) -> Optional[type]:
    """The annotated type of the field a dotted override names (None where not a scalar field)."""
    from mdm_fast.diffusion.config import NestedDiffusionConfig, SamplerConfig
    from mdm_fast.reference.config import NestedUNetConfig, ResNetConfig

    sections = {"diffusion_config": NestedDiffusionConfig, "sampler_config": SamplerConfig,
                "reader_config": ReaderConfig, "unet_config": NestedUNetConfig, "inner_config": NestedUNetConfig,
                "resnet_config": ResNetConfig}
    *path, name = key.split(".")
    cls = ExperimentConfig
    for part in path:
        cls = sections.get(part)
        if cls is None:
            return None
    return field_kinds(cls).get(name)


def apply_override(raw: Dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` of the config dict ``raw``; a mirrored field is set in both of its places."""
    set_dotted(raw, key, value)
    name = key.rpartition(".")[2]
    if name in MIRRORED and key in (name, f"diffusion_config.{name}"):
        raw[name] = value
        section = raw.get("diffusion_config")
        if isinstance(section, dict) and name in section:
            section[name] = value


def load_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a YAML file the way the public loader does (duplicated keys: the last one wins)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a YAML mapping of config fields at the top level")
    return d


def load_experiment(source: Union[str, Path, Dict[str, Any]], overrides: Optional[List[str]] = None
                    ) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a YAML path or a dict, then ``key=value`` overrides."""
    from mdm_fast.reference.config import unet_config_from_dict

    raw = load_yaml(source) if isinstance(source, (str, Path)) else copy.deepcopy(source)
    raw = _undash(raw)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected KEY=VALUE (dotted keys reach nested configs)")
        key = key.replace("-", "_")
        apply_override(raw, key, parse_override(value, _override_kind(key)))
    for alias, target in _ALIASES.items():
        if alias in raw:
            value = raw.pop(alias)
            if target in raw and raw[target] != value:
                raise ValueError(f"config: {alias}={value!r} contradicts {target}={raw[target]!r}")
            raw[target] = value
    model = raw.get("model", "unet")
    sections = {
        "unet_config": lambda v: unet_config_from_dict(model, v or {}),
        "diffusion_config": lambda v: _diffusion_config(model, v, raw),
        "reader_config": lambda v: dataclass_from(ReaderConfig, v or {}, "reader_config"),
    }
    if isinstance(raw.get("cuda_graphs"), bool):  # YAML 1.1 reads on/off as booleans
        raw["cuda_graphs"] = "on" if raw["cuda_graphs"] else "off"
    flat = {k: v for k, v in raw.items() if k not in sections}
    cfg = dataclass_from(ExperimentConfig, flat, "experiment config")
    for key, build in sections.items():
        setattr(cfg, key, build(_plain(raw.get(key))))
    _check_ranges(cfg)
    if cfg.distributed not in ("ddp", "fsdp"):
        raise ValueError(f"distributed: expected 'ddp' or 'fsdp', got {cfg.distributed!r}")
    if cfg.cuda_graphs not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs: expected 'auto', 'on' or 'off', got {cfg.cuda_graphs!r}")
    return cfg


# (field, lowest allowed value, highest, whether the lowest is allowed)
_RANGES = (("num_training_steps", 1, None, True), ("num_gradient_accumulations", 1, None, True),
           ("batch_size", 1, None, True), ("lr", 0, None, False),
           ("gradient_clip_norm", 0, None, False), ("warmup_steps", 0, None, True), ("log_freq", 1, None, True),
           ("save_freq", 1, None, True), ("sample_freq", 0, None, True), ("keep_checkpoints", 2, None, True),
           ("cond_drop_prob", 0, 1, True), ("ema_decay", 0, 1, True), ("ema_warmup_steps", 0, None, True),
           ("loss_factor", 0, None, False))


def _check_ranges(cfg: ExperimentConfig) -> None:
    for name, low, high, closed in _RANGES:
        value = getattr(cfg, name)
        if value is None or value < low or (value == low and not closed) or (high is not None and value > high):
            bound = f"{'>=' if closed else '>'} {low}" + ("" if high is None else f" and <= {high}")
            raise ValueError(f"{name}: expected {bound}, got {value!r}")


def set_dotted(d: Dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "reader_config.image_size", 32)``."""
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.get(p)
        if nxt is None:
            nxt = d[p] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a config section")
        d = nxt
    d[parts[-1]] = value


# Widths of the text encoders the public configs name (a model's shapes without loading the encoder).
KNOWN_TEXT_WIDTHS = {"google/flan-t5-xl": 2048, "google/t5-v1_1-xl": 2048, "google/flan-t5-xxl": 4096,
                     "google/flan-t5-large": 1024, "google/flan-t5-base": 768, "google/flan-t5-small": 512,
                     "minilm": 384}


def text_width(cfg: ExperimentConfig, given: Optional[int]) -> int:
    """The model's text width: ``given`` (--text-dim) if > 0, else the class count, text_dim, or the
    width of the named text model."""
    if given is not None and given < 0:
        raise ValueError(f"--text-dim: expected >= 1 (0: from the config), got {given}")
    if given:
        return given
    if cfg.categorical_conditioning > 0:
        return cfg.categorical_conditioning
    if cfg.text_dim > 0:
        return cfg.text_dim
    width = KNOWN_TEXT_WIDTHS.get(cfg.text_model.lower() if cfg.text_model.lower() == "minilm" else cfg.text_model)
    if width is None:
        raise ValueError(f"the text width of {cfg.text_model!r} is unknown; pass --text-dim")
    return width
