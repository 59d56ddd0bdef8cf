"""Experiment configs: the public YAMLs load, unknown fields are named, YAML round trips."""
from pathlib import Path

import pytest
import yaml

from mdm_fast.config import ExperimentConfig, load_experiment

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ml-mdm-configs"
if not CONFIGS.is_dir():  # CI: shared/ sits beside the clone
    CONFIGS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "ml-mdm-configs"
NAMES = ["cc12m_64x64.yaml", "cc12m_256x256.yaml", "cc12m_1024x1024.yaml"]
needs_configs = pytest.mark.skipif(not CONFIGS.is_dir(), reason="shared/reference/ml-mdm-configs not found")


@needs_configs
@pytest.mark.parametrize("name", NAMES)
def test_public_yaml_loads_every_field(name):
    raw = yaml.safe_load((CONFIGS / name).read_text())
    cfg = load_experiment(CONFIGS / name)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model == raw["model"]
    assert cfg.reader_config.image_size == raw["reader_config"]["image_size"]
    for key, value in raw.items():  # every flat field kept its value
        key = key.replace("-", "_")
        if key in ("unet_config", "diffusion_config", "reader_config", "vision_model"):
            continue
        got = getattr(cfg, key)
        assert got == value or str(got) == str(value), (key, got, value)
    assert cfg.unet_config.resolution_channels == raw["unet_config"]["resolution_channels"]


@needs_configs
def test_public_yaml_quirks():
    c64 = load_experiment(CONFIGS / "cc12m_64x64.yaml")
    # duplicated diffusion_config: the last block wins (as the public YAML loader does)
    assert c64.diffusion_config.sampler_config.beta_end == 0.02
    assert c64.diffusion_config.sampler_config.loss_target_type.name == "DDPM"  # first block: HA_STYLE
    c256 = load_experiment(CONFIGS / "cc12m_256x256.yaml")
    assert c256.sample_dir == "/mnt/data/samples"  # `sample-dir` with a dash
    assert c256.unet_config.initialize_inner_with_pretrained is None  # "None" as a string
    assert c256.diffusion_config.mixed_ratio == "2:1"  # top-level field routed to the nested diffusion
    c1024 = load_experiment(CONFIGS / "cc12m_1024x1024.yaml")
    assert c1024.diffusion_config.multi_res_weights == "16:4:1"
    assert c1024.reader_config.max_caption_length == 512  # duplicated key: the last one
    assert c1024.unet_config.inner_config.inner_config.resolution_channels == [256, 512, 768]


@needs_configs
def test_text_width_fills_every_level():
    cfg = load_experiment(CONFIGS / "cc12m_1024x1024.yaml")
    d = cfg.unet_dict(text_dim=2048)
    assert d["conditioning_feature_dim"] == 2048
    assert d["inner_config"]["conditioning_feature_dim"] == 2048
    assert d["inner_config"]["inner_config"]["conditioning_feature_dim"] == 2048


@needs_configs
@pytest.mark.parametrize("name", NAMES)
def test_yaml_round_trip(name, tmp_path):
    cfg = load_experiment(CONFIGS / name)
    path = tmp_path / "again.yaml"
    cfg.to_yaml(path)
    again = load_experiment(path)
    assert again.to_dict() == cfg.to_dict()


def _minimal():
    return {"model": "unet", "unet_config": {"resolution_channels": [32, 64], "num_resnets_per_resolution": [1, 1],
                                             "attention_levels": [], "num_attention_layers": [0, 0]},
            "reader_config": {"image_size": 16}}


def test_unknown_fields_are_named():
    d = _minimal()
    d["learning_rate"] = 1.0
    with pytest.raises(ValueError, match=r"learning_rate.*known fields.*batch_size"):
        load_experiment(d)
    d = _minimal()
    d["reader_config"]["imagesize"] = 3
    with pytest.raises(ValueError, match=r"reader_config.*imagesize.*image_size"):
        load_experiment(d)
    d = _minimal()
    d["unet_config"]["channels"] = [1]
    with pytest.raises(ValueError, match="channels"):
        load_experiment(d)


def test_bad_values_and_overrides():
    with pytest.raises(ValueError, match="batch_size.*int"):
        load_experiment({**_minimal(), "batch_size": "many"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_experiment(_minimal(), ["batch_size"])
    with pytest.raises(ValueError, match="contradicts"):
        load_experiment({**_minimal(), "vision_model": "nested_unet"})
    with pytest.raises(ValueError, match="not found"):
        load_experiment("/nonexistent/x.yaml")
    cfg = load_experiment(_minimal(), ["batch_size=7", "reader_config.image_size=24", "lr=3e-4", "sample-dir=s"])
    assert (cfg.batch_size, cfg.reader_config.image_size, cfg.lr, cfg.sample_dir) == (7, 24, 3e-4, "s")
    assert cfg.replace(batch_size=3).batch_size == 3
