"""Schedules and configs: golden tables from the public sampler, shifts, strict config parsing."""
import math

import numpy as np
import pytest
import torch
import yaml

from mdm_fast.diffusion import (DiffusionConfig, LevelSchedule, NestedDiffusionConfig, PredictionType, SamplerConfig,
                                ScheduleType, ThresholdType, gamma_table, inference_timesteps, shift_gammas,
                                vdm_loss_weights)
from mdm_fast.diffusion.schedules import sigmoid_gammas
from mdm_fast.reference.data import reference_dir

GOLDEN = reference_dir() / "golden"
CONFIGS = reference_dir() / "ml-mdm-configs"


@pytest.mark.parametrize("key", ["COSINE_shift1_power1", "COSINE_shift4_power1", "COSINE_shift16_power2",
                                 "DDPM_shift1_power1", "DDPM_shift4_power1", "DDPM_shift16_power2",
                                 "DEEPFLOYD_shift1_power1", "DEEPFLOYD_shift4_power1", "DEEPFLOYD_shift16_power2"])
def test_golden_tables_bit_identical(key):
    gold = torch.load(GOLDEN / "schedules.pt", weights_only=True)[key]
    kind, shift, power = key.split("_")
    cfg = SamplerConfig(num_diffusion_steps=1000, schedule_type=kind, schedule_shifted_power=float(power[5:]))
    base = gamma_table(cfg)
    assert torch.equal(shift_gammas(base, int(shift[5:]), cfg.schedule_shifted_power), gold["gammas"])
    assert torch.equal(vdm_loss_weights(base), gold["vdm_loss_weights"])
    # the same table from an independent float64 derivation of the shifted SNR
    g64 = base.double()
    snr = g64 / (1 - g64) / int(shift[5:]) ** float(power[5:])
    assert torch.allclose(gold["gammas"].double()[1:], (snr / (1 + snr))[1:], atol=2e-6, rtol=0)  # [0]: inf/inf


def test_ddpm_table_matches_betas():
    cfg = SamplerConfig(num_diffusion_steps=10, schedule_type="ddpm", beta_start=0.001, beta_end=0.2)
    g = gamma_table(cfg).double()
    betas = np.linspace(0.001, 0.2, 10)
    assert g[0] == 1 and torch.allclose(g[1:], torch.tensor(np.cumprod(1 - betas)), atol=1e-7)


def test_sigmoid_schedule_follows_the_paper():
    g = sigmoid_gammas(100)
    assert g[0] == 1.0 and g[-1] == pytest.approx(1e-9) and np.all(np.diff(g) <= 0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    t = 0.3
    want = (sig(3) - sig(t * 6 - 3)) / (sig(3) - sig(-3))
    assert g[30] == pytest.approx(want, rel=1e-12)
    table = gamma_table(SamplerConfig(num_diffusion_steps=100, schedule_type=ScheduleType.SIGMOID))
    assert table.dtype == torch.float32 and torch.equal(table, torch.tensor(g).float())  # the SIGMOID config's


def test_rescale_schedule_above_one_works():  # the public Sampler crashes here
    cfg = SamplerConfig(num_diffusion_steps=50, schedule_type="cosine", rescale_schedule=4.0,
                        schedule_shifted_power=2)
    base = gamma_table(SamplerConfig(num_diffusion_steps=50, schedule_type="cosine"))
    assert torch.equal(gamma_table(cfg), shift_gammas(base, 4.0, 2))
    assert (gamma_table(cfg)[1:] < base[1:]).all()


def test_level_schedule_shifted_and_signal_scales():
    cfg = SamplerConfig(num_diffusion_steps=20, schedule_type="deepfloyd", schedule_shifted=True,
                        schedule_shifted_power=2)
    ls = LevelSchedule(cfg, [16, 4, 1])
    base = gamma_table(cfg)
    assert ls.gammas.shape == (3, 21) and ls.signal_scales == [1.0, 1.0, 1.0]
    for i, s in enumerate([16, 4, 1]):
        assert torch.equal(ls.gammas[i], shift_gammas(base, s, 2))
    t = torch.tensor([3, 7])
    assert torch.equal(ls.at(t), ls.gammas[:, t])
    plain = LevelSchedule(SamplerConfig(num_diffusion_steps=20, schedule_shifted=False), [4, 1])
    assert plain.signal_scales == [4.0, 1.0] and torch.equal(plain.gammas[0], plain.gammas[1])
    for shifted in (False, True):  # the public plain UNet reads rescale_signal, not schedule_shifted
        unet = LevelSchedule(SamplerConfig(num_diffusion_steps=20, rescale_signal=2.0, schedule_shifted=shifted), [1])
        assert unet.signal_scales == [2.0] and torch.equal(unet.gammas[0], gamma_table(unet.config)), shifted
    with pytest.raises(ValueError, match="scales"):
        LevelSchedule(cfg, [])


def test_inference_timesteps_public_spacing():
    assert inference_timesteps(10, 10) == list(range(10, -1, -1))
    ts = inference_timesteps(1000, 250)
    assert len(ts) == 251 and ts[-1] == 0 and ts[0] == round(250 * 1001 / 251)
    assert all(a > b for a, b in zip(ts, ts[1:]))
    for bad in (0, 11):
        with pytest.raises(ValueError, match="num_inference_steps"):
            inference_timesteps(10, bad)


def test_enums_parse_names_in_any_case():
    assert ScheduleType.parse("deepfloyd") is ScheduleType.DEEPFLOYD
    assert PredictionType.parse("V_PREDICTION") is PredictionType.V_PREDICTION
    assert ThresholdType.parse("dynamic_if") is ThresholdType.DYNAMIC_IF
    with pytest.raises(ValueError, match="COSINE"):
        ScheduleType.parse("linear")


def test_config_from_dict_strict():
    cfg = NestedDiffusionConfig.from_dict({"sampler_config": {"prediction_type": "v_prediction",
                                                              "schedule_type": "DEEPFLOYD"},
                                           "use_double_loss": True, "multi_res_weights": "4:1"})
    assert cfg.sampler_config.loss_target_type is PredictionType.V_PREDICTION  # defaults to prediction_type
    assert cfg.multi_res_weight_list(2) == [4.0, 1.0]
    assert SamplerConfig.from_dict(cfg.sampler_config.to_dict()) == cfg.sampler_config
    with pytest.raises(ValueError, match="bogus"):
        SamplerConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="oops"):
        NestedDiffusionConfig.from_dict({"sampler_config": {"oops": 1}})
    with pytest.raises(ValueError, match="use_double_loss"):
        NestedDiffusionConfig(multi_res_weights="4:1")
    with pytest.raises(ValueError, match="no_use_residual"):
        NestedDiffusionConfig(mixed_ratio="2:1")
    with pytest.raises(ValueError, match="HA_STYLE"):
        SamplerConfig.from_dict({"loss_target_type": "HA_STYLE"})
    with pytest.raises(ValueError, match="num_diffusion_steps"):
        SamplerConfig(num_diffusion_steps=0)
    with pytest.raises(ValueError, match="mixed_ratio"):
        NestedDiffusionConfig(mixed_ratio="a:b", no_use_residual=True)
    assert NestedDiffusionConfig(mixed_ratio="2:1", no_use_residual=True).mixed_fractions(2) == [2 / 3, 1.0]
    assert DiffusionConfig.from_dict({}).sampler_config == SamplerConfig()


@pytest.mark.parametrize("name", ["cc12m_256x256.yaml", "cc12m_1024x1024.yaml"])
def test_public_yaml_diffusion_blocks_load(name):
    d = yaml.safe_load((CONFIGS / name).read_text())
    cfg = NestedDiffusionConfig.from_dict(d["diffusion_config"])
    sc = cfg.sampler_config
    assert sc.schedule_type is ScheduleType.DEEPFLOYD and sc.prediction_type is PredictionType.V_PREDICTION
    assert sc.loss_target_type is PredictionType.DDPM and sc.schedule_shifted
