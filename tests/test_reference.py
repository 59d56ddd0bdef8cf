"""The reference model against the public code's golden outputs, parameter counts and contract."""
import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mdm_fast.reference import build_model, unet_config_from_dict
from mdm_fast.reference.summary import summarize

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
GOLDEN = SHARED / "golden"
CONFIGS = SHARED / "ml-mdm-configs"
CASES = sorted(json.loads((GOLDEN / "index.json").read_text()))


def load_case(name):
    return torch.load(GOLDEN / f"{name}.pt", weights_only=True)


def model_inputs(case):
    inp = case["inputs"]
    x_t = inp["x_t"] if case["model"] != "unet" else inp["x_t"][0]
    return x_t, inp["times"], inp["conditioning"], inp["cond_mask"]


def golden_model(case):
    model = build_model(case["model"], case["unet_config"], case["input_channels"], case["output_channels"])
    model.load_state_dict(case["state_dict"], strict=True)
    return model.eval()


def as_list(out):
    return out if isinstance(out, list) else [out]


@pytest.mark.parametrize("name", CASES)
def test_golden_outputs(name):
    case = load_case(name)
    model = golden_model(case)
    with torch.no_grad():
        out = as_list(model(*model_inputs(case), {}))
    assert len(out) == len(case["outputs"])
    for got, want in zip(out, case["outputs"]):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5


def public_yaml_unet_config(stem, text_width=2048):
    y = yaml.safe_load((CONFIGS / f"cc12m_{stem}.yaml").read_text())
    cfg = dict(y["unet_config"], conditioning_feature_dim=text_width)
    return y["model"], cfg


@pytest.mark.parametrize("stem,params", [("64x64", 461_359_107), ("256x256", 476_613_958),
                                         ("1024x1024", 480_970_057)])
def test_public_yaml_parameter_counts(stem, params):
    name, cfg = public_yaml_unet_config(stem)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1024 YAML names a pretrained inner model we do not have
        model = build_model(name, cfg)
    assert sum(p.numel() for p in model.parameters()) == params


def test_summary_flops_of_256_model():
    name, cfg = public_yaml_unet_config("256x256")
    with torch.device("meta"):
        model = build_model(name, cfg)
    levels = summarize(model, 256)
    assert [lv.resolution for lv in levels] == [256, 64]
    # 610.6 GFLOP per image, as counted for the public model in shared/reference/BASELINE.md
    assert abs(sum(lv.flops for lv in levels) / 1e9 - 610.6) < 0.2
    assert sum(lv.params for lv in levels) == 476_613_958


@pytest.mark.parametrize("name", CASES)
def test_every_parameter_gets_a_gradient(name):
    case = load_case(name)
    model = golden_model(case).train()
    out = as_list(model(*model_inputs(case), {}))
    sum((o.float() ** 2).mean() for o in out).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


def test_string_and_list_forms_build_the_same_model():
    case = load_case("unet_tiny")
    cfg = copy.deepcopy(case["unet_config"])
    as_strings = dict(cfg, num_resnets_per_resolution="1,2,1", attention_levels="1,2",
                      num_attention_layers="0,1,2", resolution_channels="32,32,64")
    a, b = build_model("unet", cfg), build_model("unet", as_strings)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    single = unet_config_from_dict("unet", dict(cfg, num_attention_layers="1"))
    assert single.num_attention_layers == [1, 1, 1]


def test_two_micro_conditions():
    case = load_case("unet_tiny")
    cfg = dict(case["unet_config"], micro_conditioning="a:1,b:0")
    model = build_model("unet", cfg)
    assert sorted(model.cond_layers) == ["a", "b"]
    x, t, c, m = model_inputs(case)
    out = model(x, t, c, m, {"a": torch.tensor([0.5, 2.0])})
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_micro_condition_labels_keep_their_spaces():
    """The public code names the layers by the label as written: "scale:16, wm:0.5" gives
    cond_layers. wm.*; its checkpoints load strictly into the reference and the fast model."""
    import mdm_fast

    case = load_case("unet_tiny")
    cfg = dict(case["unet_config"], micro_conditioning="scale:16, wm:0.5")
    ref = build_model("unet", cfg)
    assert sorted(ref.cond_layers) == [" wm", "scale"] and "cond_layers. wm.0.weight" in ref.state_dict()
    mdm_fast.build_model("unet", cfg).load_state_dict(ref.state_dict(), strict=True)
    x, t, c, m = model_inputs(case)
    assert ref(x, t, c, m, {" wm": torch.tensor([0.0, 1.0])}).shape == x.shape


def nested_case_with(**overrides):
    case = load_case("nested_variants_mixed_batch")
    cfg = dict(copy.deepcopy(case["unet_config"]), **overrides)
    return case, cfg


@pytest.mark.parametrize("mixed", [False, True])
def test_skip_inner_unet_input_works(mixed):
    case, cfg = nested_case_with(skip_inner_unet_input=True)
    model = build_model("nested_unet", cfg)
    assert model.in_adapter is None
    state = {k: v for k, v in case["state_dict"].items() if not k.startswith("in_adapter.")}
    model.load_state_dict(state, strict=True)
    x_t, t, c, m = model_inputs(case)
    if not mixed:
        x_t = [x_t[0].expand(3, -1, -1, -1), x_t[1]]
    out = model(x_t, t, c, m)
    assert [o.shape for o in out] == [x.shape for x in x_t]
    # no features go in: the inner output depends on the low-resolution image alone
    out2 = model([x_t[0] + 1.0, x_t[1]], t, c, m)
    assert torch.equal(out[1], out2[1])


def test_freeze_inner_unet():
    _, cfg = nested_case_with(freeze_inner_unet=True)
    model = build_model("nested_unet", cfg)
    assert not any(p.requires_grad for p in model.inner_unet.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("inner_unet."))


def test_initialize_inner_from_lower_resolution_checkpoint(tmp_path):
    case, cfg = nested_case_with()
    inner = build_model("unet", dict(cfg["inner_config"], conditioning_feature_dim=24, nesting=True))
    path = tmp_path / "low_res.pt"
    torch.save({"state_dict": inner.state_dict()}, path)
    model = build_model("nested_unet", dict(cfg, initialize_inner_with_pretrained=str(path)))
    for k, v in inner.state_dict().items():
        assert torch.equal(model.inner_unet.state_dict()[k], v)


def test_missing_pretrained_inner_warns():
    _, cfg = nested_case_with(initialize_inner_with_pretrained="/nonexistent/ckpt.pt")
    with pytest.warns(UserWarning, match="initialize_inner_with_pretrained"):
        build_model("nested_unet", cfg)


def test_public_yaml_none_string_is_none():
    name, cfg = public_yaml_unet_config("256x256")
    assert unet_config_from_dict(name, cfg).initialize_inner_with_pretrained is None


@pytest.mark.parametrize("mutate,match", [
    (lambda x, t, c, m: ([x[0]], t, c, m), "list of 2 resolutions"),
    (lambda x, t, c, m: (x[0], t, c, m), "list of 2 resolutions"),
    (lambda x, t, c, m: ([x[0], x[1][..., :4, :4]], t, c, m), "resolution 8x8"),
    (lambda x, t, c, m: ([x[0][:, :2], x[1]], t, c, m), "3 channels"),
    (lambda x, t, c, m: (x, t, c[..., :20], m), "24"),
    (lambda x, t, c, m: (x, t, c, m[:, :3]), "cond_mask"),
    (lambda x, t, c, m: (x, t[:1], c, m), "times"),
])
def test_bad_inputs_raise_value_errors(mutate, match):
    case = load_case("nested_tiny")
    model = golden_model(case)
    with pytest.raises(ValueError, match=match):
        model(*mutate(*model_inputs(case)))


@pytest.mark.parametrize("cfg_patch,match", [
    ({"no_such_field": 1}, "no_such_field"),
    ({"inner_config": {"bogus": 2}}, "inner_config"),
    ({"num_attention_layers": [0, 0]}, "num_attention_layers"),
    ({"micro_conditioning": "scale"}, "micro_conditioning"),
    ({"resnet_config": {"num_groups": 32}}, "resnet_config"),
    ({"temporal_spatial_ds": True, "num_temporal_attention_layers": [0, 1, 0]}, "temporal_spatial_ds"),
])
def test_bad_configs_raise_value_errors(cfg_patch, match):
    case = load_case("nested_tiny")
    cfg = dict(copy.deepcopy(case["unet_config"]), **cfg_patch)
    with pytest.raises(ValueError, match=match):
        build_model("nested_unet", cfg)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="nested_unet"):
        build_model("nested9_unet", {})
