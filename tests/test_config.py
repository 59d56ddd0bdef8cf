"""Experiment configs: the public YAMLs load, unknown fields are named, YAML round trips."""
import re

import pytest
import yaml

from mdm_fast.config import ExperimentConfig, load_experiment
from mdm_fast.data.reader_config import ReaderConfig
from mdm_fast.diffusion.config import DiffusionConfig, NestedDiffusionConfig
from mdm_fast.reference.data import reference_dir

CONFIGS = reference_dir() / "ml-mdm-configs"
NAMES = ["cc12m_64x64.yaml", "cc12m_256x256.yaml", "cc12m_1024x1024.yaml"]


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


def test_text_width_fills_every_level():
    cfg = load_experiment(CONFIGS / "cc12m_1024x1024.yaml")
    d = cfg.unet_dict(text_dim=2048)
    assert d["conditioning_feature_dim"] == 2048
    assert d["inner_config"]["conditioning_feature_dim"] == 2048
    assert d["inner_config"]["inner_config"]["conditioning_feature_dim"] == 2048


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
    # the diffusion sections by their YAML paths (they were named by their classes)
    for section, path in (({"use_double_los": True}, r"diffusion_config: unknown field\(s\) \['use_double_los'\]"),
                          ({"sampler_config": {"num_diffusion_step": 3}},
                           r"diffusion_config.sampler_config: unknown field\(s\) \['num_diffusion_step'\]")):
        with pytest.raises(ValueError, match=path):
            load_experiment({**_minimal(), "diffusion_config": section})


def test_bad_values_and_overrides(tmp_path):
    with pytest.raises(ValueError, match="batch_size.*int"):
        load_experiment({**_minimal(), "batch_size": "many"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_experiment(_minimal(), ["batch_size"])
    with pytest.raises(ValueError, match="contradicts"):
        load_experiment({**_minimal(), "vision_model": "nested_unet"})
    with pytest.raises(ValueError, match="not found"):
        load_experiment("/nonexistent/x.yaml")
    (tmp_path / "list.yaml").write_text("- model: unet\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        load_experiment(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="'image_size' is not a config section"):
        load_experiment(_minimal(), ["reader_config.image_size.x=1"])
    cfg = load_experiment(_minimal(), ["batch_size=7", "reader_config.image_size=24", "lr=3e-4", "sample-dir=s",
                                       "file_list=a=b.tsv"])  # the first `=` splits
    assert (cfg.batch_size, cfg.reader_config.image_size, cfg.lr, cfg.sample_dir) == (7, 24, 3e-4, "s")
    assert cfg.file_list == "a=b.tsv"
    assert cfg.replace(batch_size=3).batch_size == 3
    d = _minimal()
    d["reader_config"] = {"image-size": 24}  # dashes are read as underscores in sections too
    assert load_experiment(d).reader_config.image_size == 24
    d["reader_config"] = ReaderConfig(image_size=24)  # a typed section is taken as its fields
    assert load_experiment(d).reader_config.image_size == 24
    del d["model"]  # no model named: the public default, a plain UNet
    cfg = load_experiment(d)
    assert cfg.model == "unet" and type(cfg.unet_config).__name__ == "UNetConfig"


def test_top_resolution_is_the_readers_else_the_samplers():
    """image_size: reader_config.image_size where set, else sample_image_size, else a ValueError."""
    assert load_experiment(_minimal(), ["sample_image_size=32"]).image_size == 16
    assert load_experiment(_minimal(), ["reader_config.image_size=-1", "sample_image_size=32"]).image_size == 32
    with pytest.raises(ValueError, match="reader_config.image_size"):
        load_experiment(_minimal(), ["reader_config.image_size=-1"]).image_size


def test_range_checks_accept_closed_bounds_and_refuse_the_rest():
    """A closed bound (>= 0, <= 1) accepts the bound itself; an open one (> 0) and the far side refuse it."""
    for field, value in (("cond_drop_prob", 1.0), ("ema_decay", 1.0), ("warmup_steps", 0), ("sample_freq", 0)):
        assert getattr(load_experiment({**_minimal(), field: value}), field) == value
    for field, value, bound in (("ema_decay", 1.5, ">= 0 and <= 1"), ("loss_factor", 0.0, "> 0"),
                                ("warmup_steps", -1, ">= 0"), ("ema_warmup_steps", -1, ">= 0")):
        with pytest.raises(ValueError, match=f"{field}: expected {bound}, got"):
            load_experiment({**_minimal(), field: value})


def _nested(**top):
    return {"model": "nested_unet", "unet_config": {"inner_config": {}},
            "diffusion_config": {"no_use_residual": True, "use_double_loss": True}, **top}


def test_values_take_their_fields_types():
    sampler = "diffusion_config.sampler_config"
    cfg = load_experiment(_minimal(), [f"{sampler}.beta_start=1e-4", f"{sampler}.schedule_shifted='false'",
                                       f"{sampler}.rescale_signal=None", "diffusion_config.model_output_scale=1e0",
                                       "output_dir=0123", "seed=1e3", f"{sampler}.threshold_function=NONE",
                                       "unet_config.micro_conditioning=None", "reader_config.bucket=0123",
                                       "pretrained_vision_file=null", "mixed_ratio=NULL"])
    sc = cfg.diffusion_config.sampler_config
    assert (sc.beta_start, sc.schedule_shifted, sc.rescale_signal) == (1e-4, False, None)
    assert cfg.reader_config.bucket == "0123"  # a section's str field too (YAML would read 83)
    assert cfg.pretrained_vision_file is None and cfg.mixed_ratio is None  # null, any case: None
    assert (cfg.diffusion_config.model_output_scale, cfg.output_dir, cfg.seed) == (1.0, "0123", 1000)
    assert sc.threshold_function.name == "NONE" and cfg.unet_config.micro_conditioning is None
    # in a YAML file: 1e-4 is read as a string, a quoted 'false' too; a number in a str field is its text
    d = {**_minimal(), "name": 123}
    d["diffusion_config"] = {"sampler_config": {"beta_start": "1e-4", "schedule_shifted": "false"}}
    cfg = load_experiment(d)
    sc = cfg.diffusion_config.sampler_config
    assert (sc.beta_start, sc.schedule_shifted, cfg.name) == (1e-4, False, "123")
    for text in ("true", "Yes", "on", "1", "false", "no", "OFF", "0"):  # quoted YAML booleans
        d["diffusion_config"]["sampler_config"]["schedule_shifted"] = text
        want = text.lower() in ("true", "yes", "on", "1")
        assert load_experiment(d).diffusion_config.sampler_config.schedule_shifted is want, text
    for bad, field in ((f"{sampler}.schedule_shifted=maybe", "schedule_shifted"), ("seed=1.5", "seed"),
                       (f"{sampler}.beta_end=much", "beta_end"), (f"{sampler}.schedule_shifted=2", "schedule_shifted"),
                       (f"{sampler}.beta_end=true", "beta_end")):
        with pytest.raises(ValueError, match=f"{field}.*expected"):
            load_experiment(_minimal(), [bad])


def _public(stem):
    return yaml.safe_load((CONFIGS / f"{stem}.yaml").read_text())


def test_unet_config_values_take_their_fields_types():
    """The model's blocks too (unet_config, its inner_config and resnet_config, from a file or an override):
    a quoted 'false' is False, not a true string; a value of the wrong type is refused by its field's name."""
    d = _public("cc12m_256x256")
    d["unet_config"]["freeze_inner_unet"] = "false"
    d["unet_config"]["inner_config"]["resnet_config"]["dropout"] = "1e-1"
    cfg = load_experiment(d, ["unet_config.skip_mid_blocks='no'", "unet_config.inner_config.temporal_dim='1024'"])
    assert cfg.unet_config.freeze_inner_unet is False and cfg.unet_config.skip_mid_blocks is False
    assert cfg.unet_config.inner_config.resnet_config.dropout == 0.1
    assert cfg.unet_config.inner_config.temporal_dim == 1024
    for bad, field in (("unet_config.temporal_dim=abc", "unet_config.temporal_dim"),
                       ("unet_config.resnet_config.dropout=abc", "unet_config.resnet_config.dropout"),
                       ("unet_config.inner_config.resnet_config.use_attention_ffn=maybe",
                        "unet_config.inner_config.resnet_config.use_attention_ffn"),
                       ("unet_config.inner_config.nesting=2", "unet_config.inner_config.nesting")):
        with pytest.raises(ValueError, match=f"'{field}': expected"):
            load_experiment(_public("cc12m_256x256"), [bad])
    with pytest.raises(ValueError, match="inner_config.nesting: an inner UNet must have nesting: true"):
        load_experiment(_public("cc12m_256x256"), ["unet_config.inner_config.nesting='false'"])


@pytest.mark.parametrize("override, message", [
    ("unet_config.resolution_channels=abc", "unet_config.resolution_channels: expected a list of ints"),
    ("unet_config.resolution_channels=[32,0]", "resolution_channels: expected one or more channel counts >= 1"),
    ("unet_config.num_resnets_per_resolution=[1,-1]", "num_resnets_per_resolution: expected values >= 1"),
    ("unet_config.num_resnets_per_resolution=[1,0]", "num_resnets_per_resolution: expected values >= 1"),
    ("unet_config.num_attention_layers=[0,-1]", "num_attention_layers: expected values >= 0"),
    ("unet_config.resnet_config.num_groups_norm=0", "resnet_config.num_groups_norm: expected >= 1"),
    ("unet_config.resnet_config=4", "unet_config.resnet_config: expected a mapping of fields, got 4"),
    ("reader_config=16", "reader_config: expected a mapping of fields, got 16"),
])
def test_malformed_model_fields_are_named(override, message):
    """Each was a traceback (ValueError of int(), IndexError, ZeroDivisionError, AttributeError, TypeError)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_experiment(_minimal(), [override])


def test_a_yaml_syntax_error_names_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: unet\nunet_config: {resolution_channels: [32, 64\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML \(while parsing"):
        load_experiment(tmp_path / "bad.yaml")


def test_top_level_mixed_ratio_and_weights_are_one_setting_with_the_diffusion_configs():
    cfg = load_experiment(_nested(mixed_ratio="2:1"))
    assert cfg.diffusion_config.mixed_ratio == "2:1"
    for key in ("mixed_ratio", "diffusion_config.mixed_ratio"):  # an override of either sets both
        cfg = load_experiment(_nested(mixed_ratio="2:1"), [f"{key}=3:1"])  # (YAML would read 3:1 as 181)
        assert (cfg.mixed_ratio, cfg.diffusion_config.mixed_ratio) == ("3:1", "3:1"), key
        cfg = cfg.replace(**{key: "1:1"})
        assert (cfg.mixed_ratio, cfg.diffusion_config.mixed_ratio) == ("1:1", "1:1"), key
    cfg = load_experiment(_nested(multi_res_weights="16:4"), ["diffusion_config.multi_res_weights=1:1"])
    assert (cfg.multi_res_weights, cfg.diffusion_config.multi_res_weights) == ("1:1", "1:1")
    d = _nested(mixed_ratio="2:1")
    d["diffusion_config"]["mixed_ratio"] = "3:1"
    with pytest.raises(ValueError, match=r"mixed_ratio='2:1' contradicts diffusion_config.mixed_ratio='3:1'"):
        load_experiment(d)
    d["diffusion_config"]["mixed_ratio"] = 2  # YAML `2` and '2': the same setting
    d["mixed_ratio"] = "2"
    assert load_experiment(d).diffusion_config.mixed_ratio == "2"
    assert load_experiment(_nested(mixed_ratio="")).diffusion_config.mixed_fractions(2) is None  # empty: unset


def test_experiment_defaults_are_the_public_ones():
    """The defaults of the public command lines' arguments (ml_mdm/config.py: common, trainer, sampler and
    evaluator parsers; models/model_ema.py's ModelEma for the EMA), which configs that omit a field rely on.
    Not compared: output_dir, file_list (the public ones are placeholders) and use_adamw (a public
    store_true flag that every public YAML sets)."""
    public = {
        "loglevel": "INFO", "device": "cuda", "fp16": 0, "seed": -1, "vocab_file": "data/c4_wpm.vocab",
        "pretrained_vision_file": None, "categorical_conditioning": 0, "text_model": "google/flan-t5-xl",
        "model": "unet", "use_precomputed_text_embeddings": 0, "batch_size": 2, "num_training_steps": 850000,
        "num_epochs": 20000, "multinode": 1, "local_rank": 0, "log_freq": 100, "save_freq": 1000, "lr": 0.001,
        "lr_scaling_factor": 0.8, "gradient_clip_norm": 2.0, "warmup_steps": 5000, "num_gradient_accumulations": 1,
        "loss_factor": 1.0, "resume_from_ema": False, "model_file": "", "test_file_list": "", "sample_dir": "samples",
        "eval_freq": 1000, "sample_image_size": -1, "port": 19231, "min_examples": 10000, "num_eval_batches": 500,
        "reader_config_file": None, "ema_decay": 0.9999, "ema_warmup_steps": 0}
    ours = ExperimentConfig().to_dict()
    assert {k: ours[k] for k in public} == public


def test_diffusion_defaults_are_the_public_ones():
    """The defaults of the public DiffusionConfig / SamplerConfig (ml_mdm/diffusion.py, samplers.py), enums
    written by name as in the public YAMLs."""
    assert DiffusionConfig().to_dict() == {
        "sampler_config": {"num_diffusion_steps": 32, "reproject_signal": False, "schedule_type": "DDPM",
                           "prediction_type": "DDPM", "loss_target_type": "DDPM", "beta_start": 0.0001,
                           "beta_end": 0.02, "threshold_function": "CLIP", "rescale_schedule": 1.0,
                           "rescale_signal": None, "schedule_shifted": False, "schedule_shifted_power": 1.0},
        "model_output_scale": 0.0, "use_vdm_loss_weights": True}


@pytest.mark.parametrize("sampler, match", [
    ({"beta_start": 0.0}, "beta_start and beta_end"), ({"beta_end": 1.0}, "beta_start and beta_end"),
    ({"rescale_schedule": 0.0}, "rescale_schedule"), ({"rescale_signal": 0.0}, "rescale_signal"),
    ({"predict_variances": True}, "predict_variances"),
])
def test_bad_sampler_values_are_named(sampler, match):
    """Out-of-range sampler settings (open bounds: the bound itself too) raise a ValueError naming them."""
    with pytest.raises(ValueError, match=match):
        load_experiment({**_minimal(), "diffusion_config": {"sampler_config": sampler}})


def test_level_ratios():
    """multi_res_weights: extra entries past the model's levels are dropped (the top levels come first);
    mixed_ratio: one entry per level; both refuse negative entries or a sum of zero."""
    cfg = NestedDiffusionConfig(use_double_loss=True, multi_res_weights="16:4:1")
    assert cfg.multi_res_weight_list(2) == [16.0, 4.0]
    with pytest.raises(ValueError, match="3 entries, the model has 2"):
        NestedDiffusionConfig(no_use_residual=True, mixed_ratio="2:1:1").mixed_fractions(2)
    for bad in ("2:-1", "0:0"):
        with pytest.raises(ValueError, match="non-negative numbers with a positive sum"):
            NestedDiffusionConfig(no_use_residual=True, mixed_ratio=bad)
