"""The reference model against the public code's golden outputs, parameter counts and contract."""
import copy
import json
import warnings

import pytest
import torch
import yaml

from mdm_fast.reference import build_model, unet_config_from_dict
from mdm_fast.reference.data import reference_dir
from mdm_fast.reference.summary import summarize

SHARED = reference_dir()
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
    single = unet_config_from_dict("unet", dict(cfg, num_attention_layers="1", attention_levels="",
                                                num_resnets_per_resolution=2))  # a YAML int: one value too
    assert single.num_attention_layers == [1, 1, 1] and single.attention_levels == []  # "": no level attends
    assert single.num_resnets_per_resolution == [2, 2, 2]
    assert unet_config_from_dict("unet", dict(cfg, attention_levels=None)).attention_levels == []  # YAML null


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
    empty = unet_config_from_dict(name, dict(cfg, initialize_inner_with_pretrained=""))
    assert empty.initialize_inner_with_pretrained is None  # an empty path too


@pytest.mark.parametrize("mutate,match", [
    (lambda x, t, c, m: ([x[0]], t, c, m), "list of 2 resolutions"),
    (lambda x, t, c, m: (x[0], t, c, m), "list of 2 resolutions"),
    (lambda x, t, c, m: ([x[0], x[1][..., :4, :4]], t, c, m), "resolution 8x8"),
    (lambda x, t, c, m: ([x[0], x[1][..., :4]], t, c, m), "resolution 8x8"),  # the width alone
    (lambda x, t, c, m: ([x[0], x[1][:1]], t[:1], c[:1], m[:1]), "at least as many samples"),
    (lambda x, t, c, m: (x, t, c[:1], m), r"conditioning: expected \(B=2"),
    (lambda x, t, c, m: ([x[0][:, :2], x[1]], t, c, m), "3 channels"),
    (lambda x, t, c, m: (x, t, c[..., :20], m), "24"),
    (lambda x, t, c, m: (x, t, c, m[:, :3]), "cond_mask"),
    (lambda x, t, c, m: (x, torch.cat([t, t[:1]]), c, m), r"times: expected shape \(2,\)"),
    (lambda x, t, c, m: (x, t[:, None], c, m), "times"),
])
def test_bad_inputs_raise_value_errors(mutate, match):
    case = load_case("nested_tiny")
    model = golden_model(case)
    with pytest.raises(ValueError, match=match):
        model(*mutate(*model_inputs(case)))


def one_time_for_all_is_every_samples(model, case):
    """As the public code broadcasts it: a time of shape (1,) or () gives each sample of the batch that time."""
    x_t, t, c, m = model_inputs(case)
    assert t.shape == (2,)
    with torch.no_grad():
        want = as_list(model(x_t, t[:1].expand(2).contiguous(), c, m))
        for one in (t[:1], t[0]):
            for got, w in zip(as_list(model(x_t, one, c, m)), want):
                torch.testing.assert_close(got, w, rtol=0, atol=0)


def test_one_time_for_all_is_every_samples():
    case = load_case("nested_tiny")
    one_time_for_all_is_every_samples(golden_model(case), case)


def test_attention_is_the_softmax_of_scaled_dot_products():
    """The reference attention is softmax(q.k / sqrt(d)) v per head of width d, a masked key left out: checked
    against the formula in fp64 with logits large enough for the scale to matter (the golden cases' small
    random weights leave the softmax near uniform, blind to it)."""
    import math

    from mdm_fast.reference.layers import _attention

    g = torch.Generator().manual_seed(0)
    B, heads, d, L, S = 2, 2, 4, 5, 3
    q, k, v = (torch.randn(B, heads * d, n, generator=g, dtype=torch.float64) * 2 for n in (L, S, S))  # (B, C, n)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)  # (B, S)
    qh, kh, vh = (t.reshape(B, heads, d, -1) for t in (q, k, v))  # (B, h, d, n)
    logits = torch.einsum("bhdt,bhds->bhts", qh, kh) / math.sqrt(d)
    weights = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf")).softmax(-1)  # (B, h, L, S)
    want = torch.einsum("bhts,bhds->bhdt", weights, vh).reshape(B, heads * d, L)
    torch.testing.assert_close(_attention(q, k, v, heads, mask), want, rtol=1e-5, atol=1e-6)  # fp32 softmax


def test_rotary_positions_turn_each_pair_by_position_times_frequency():
    """RotaryEmbedding (temporal_positional_encoding, which no golden case has): token p's pair of features
    (2i, 2i+1) turns by the angle p * 10000**(-2i/d), as rotary_embedding_torch does (interleaved pairs)."""
    from mdm_fast.reference.layers import RotaryEmbedding

    d, L = 8, 5
    t = torch.randn(2, L, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # (B, L, d)
    i = torch.arange(d // 2, dtype=torch.float64)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * 10000.0 ** (-2 * i / d)  # (L, d/2)
    x0, x1 = t[..., 0::2], t[..., 1::2]
    want = torch.stack((x0 * angle.cos() - x1 * angle.sin(), x1 * angle.cos() + x0 * angle.sin()), -1)
    got = RotaryEmbedding(d).double().rotate_queries_or_keys(t)
    torch.testing.assert_close(got, want.reshape(t.shape), rtol=1e-5, atol=1e-6)  # its frequencies are fp32


def test_a_model_without_text_takes_no_conditioning():
    """conditioning_feature_dim <= 0: no text, so no conditioning or mask is asked for."""
    case = load_case("unet_tiny")
    model = build_model("unet", dict(case["unet_config"], conditioning_feature_dim=-1)).eval()
    x, t, _, _ = model_inputs(case)  # x: (B, C, H, W)
    with torch.no_grad():
        assert model(x, t, None, None).shape == x.shape


def test_summary_counts_attention_only_at_attention_levels():
    """A level outside attention_levels has no attention layers, whatever num_attention_layers says there."""
    case = load_case("unet_tiny")
    with torch.device("meta"):
        model = build_model("unet", dict(case["unet_config"], attention_levels=[1], num_attention_layers="2"))
    attends = {n.split(".")[1] for n, _ in model.named_modules() if n.startswith("down_blocks.") and n.endswith("attn")}
    assert attends == {"1"} and summarize(model, 16)[0].attention == [0, 2, 0]


def test_a_unet_takes_one_resolution():
    """A plain UNet takes a tensor or a list of one; a longer list is refused."""
    case = load_case("unet_tiny")
    model = golden_model(case)
    x, t, c, m = model_inputs(case)  # x: (B, C, H, W)
    with torch.no_grad():
        assert (model([x], t, c, m, {}) - case["outputs"][0]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="a UNet takes one resolution, got a list of 2"):
        model([x, x], t, c, m)


@pytest.mark.parametrize("cfg_patch,match", [
    ({"no_such_field": 1}, "no_such_field"),
    ({"inner_config": {"bogus": 2}}, "inner_config"),
    ({"num_attention_layers": [0, 0]}, "num_attention_layers"),
    ({"num_resnets_per_resolution": [1, 1, 1, 1]}, "expected 1 or 3 values"),  # one too many
    ({"micro_conditioning": "scale"}, "micro_conditioning"),
    ({"resnet_config": {"num_groups": 32}}, "resnet_config"),
    ({"temporal_spatial_ds": True, "num_temporal_attention_layers": [0, 1, 0]}, "temporal_spatial_ds"),
    ({"temporal_dim": 100}, "unet_config.temporal_dim: expected a multiple of 8, got 100"),  # from the config
    ({"micro_conditioning": ":64"}, "micro_conditioning"),  # no label
    ({"inner_config": {"nesting": False}}, "inner UNet must have nesting: true"),
])
def test_bad_configs_raise_value_errors(cfg_patch, match):
    case = load_case("nested_tiny")
    cfg = dict(copy.deepcopy(case["unet_config"]), **cfg_patch)
    with pytest.raises(ValueError, match=match):
        build_model("nested_unet", cfg)


def test_config_defaults_are_the_public_ones():
    """UNetConfig / ResNetConfig / NestedUNetConfig defaults of the public unet.py and nested_unet.py (string
    forms expanded per level); a nested level skips its mid blocks and conditioning embedding, its inner nests."""
    from mdm_fast.reference.config import NestedUNetConfig, ResNetConfig, UNetConfig

    u = UNetConfig()
    assert (u.resolution_channels, u.attention_levels, u.num_attention_layers, u.num_resnets_per_resolution) == (
        [128, 256, 256, 512, 1024], [2, 3], [1] * 5, [2] * 5)
    assert (u.temporal_dim, u.num_temporal_attention_layers, u.conditioning_feature_dim,
            u.conditioning_feature_proj_dim, u.num_lm_head_layers, u.masked_cross_attention,
            u.micro_conditioning) == (None, None, -1, -1, 0, 1, None)
    assert not any((u.skip_mid_blocks, u.skip_cond_emb, u.nesting, u.temporal_mode, u.temporal_spatial_ds,
                    u.temporal_positional_encoding))
    assert u.resnet_config == ResNetConfig(num_channels=-1, output_channels=-1, num_groups_norm=32, dropout=0.0,
                                           use_attention_ffn=False)
    c = NestedUNetConfig()
    assert (c.skip_mid_blocks, c.skip_cond_emb, c.skip_inner_unet_input, c.skip_normalization, c.freeze_inner_unet,
            c.interp_conditioning, c.initialize_inner_with_pretrained) == (True, True, False, False, False, False, None)
    assert c.inner_config.nesting and not c.inner_config.skip_mid_blocks


def test_unknown_model_name():
    with pytest.raises(ValueError, match="nested_unet"):
        build_model("nested9_unet", {})


def test_a_temporal_models_image_sizes_are_checked_by_name():
    """A temporal model takes the sizes its frame grid and stride-2 levels divide evenly: 30 and 34 crashed
    inside the model (a 17 or 15 px frame halves unevenly), 32 and 36 run."""
    case = load_case("nested_temporal_tiny")
    model = build_model(case["model"], case["unet_config"], case["input_channels"], case["output_channels"])
    for size in (32, 36):
        model.check_image_size(size)
    for size in (30, 33, 34):  # an odd size too: the sizes offered are the grid's multiples
        with pytest.raises(ValueError, match=f"image size {size}: this temporal model's 2x2 frame grid and levels "
                                             r"do not divide it evenly; sizes near it that they do: \[.*32"):
            model.check_image_size(size)


def test_the_reference_cases_are_found_inside_the_checkout_first(tmp_path, monkeypatch):
    """MDM_FAST_REFERENCE where set, else <checkout>/shared/reference (the device tool carries a shared/
    folder of the checkout), then <checkout>/../shared/reference (a developer's and CI's layout)."""
    import mdm_fast.reference.data as data

    checkout = tmp_path / "repo"
    monkeypatch.setattr(data, "__file__", str(checkout / "mdm_fast" / "reference" / "data.py"))
    monkeypatch.delenv("MDM_FAST_REFERENCE", raising=False)
    beside, inside, named = (tmp_path / "shared" / "reference", checkout / "shared" / "reference",
                             tmp_path / "not-made")
    assert data.reference_dir() == beside  # none there: the last, for the error to name
    for folder in (beside, inside):
        folder.mkdir(parents=True)
        assert data.reference_dir() == folder
    monkeypatch.setenv("MDM_FAST_REFERENCE", str(named))  # named: that one, there or not (the error names it)
    assert data.reference_dir() == named
