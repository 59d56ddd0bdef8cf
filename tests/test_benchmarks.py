"""The benchmark suites' arithmetic, on CPU: rates, tables, and every suite's bytes-moved and FLOP counts
against closed forms (the GPU timing is replaced by fixed milliseconds; what is checked is what a committed
table would print from them)."""
import math
import re
import sys

import pytest
import torch

import mdm_fast
from benchmarks import (attention, common, diffusion_step, group_norm, memory, models, profile_model, resample,
                        roofline)
from mdm_fast.ops.diffusion_step import noisy_pyramid, sampler_update


def _capture_tables(monkeypatch, module):
    """Make ``module.markdown_table`` also record its rows (raw numbers, before formatting)."""
    tables = []
    real = common.markdown_table
    monkeypatch.setattr(module, "markdown_table", lambda header, rows: tables.append(rows) or real(header, rows))
    return tables


def test_rates_and_markdown_table():
    """2 GB in 1 ms is 2000 GB/s; 3e12 FLOPs in 2 ms are 1500 TFLOP/s; a table has one separator cell per
    column, NaN as '-', 3 decimals under 100 and 1 from 100 on."""
    assert common.gbps(2e9, 1.0) == pytest.approx(2000.0)
    assert common.tflops(3e12, 2.0) == pytest.approx(1500.0)
    table = common.markdown_table(["a", "b", "c"], [[1, float("nan"), 3.14159], ["x", 99.5, 1234.56]])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | - | 3.142 |", "| x | 99.500 | 1234.6 |"]


def test_knob_restores_and_card_slug(monkeypatch):
    with pytest.raises(ValueError), common.knob(math, "tau", 1.0):
        assert math.tau == 1.0
        raise ValueError
    assert math.tau == 2 * math.pi
    monkeypatch.setattr(common, "card_name", lambda: "NVIDIA H200 NVL")
    assert common.card_slug() == "nvidia-h200-nvl"


def test_time_ms_is_the_median_after_warmup(monkeypatch):
    """With a fake clock each call advancing it by the next duration: warm-up calls are not timed, the
    result is the median of the timed ones (ms)."""
    durations = iter([9.0, 9.0, 0.001, 0.002, 0.009])  # seconds: 2 warm-up calls, 3 timed
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    ms = common.time_ms(lambda: clock.__setitem__(0, clock[0] + next(durations)), warmup=2, iters=3)
    assert ms == pytest.approx(2.0)  # the median: the mean would be 4, the minimum 1
    assert next(durations, None) is None  # 2 + 3 calls, no more, no fewer


def test_forward_flops_are_every_levels():
    """The models suite's FLOPs per image (its TFLOP/s and MFU) sum the summary's levels."""
    from mdm_fast.reference import build_model
    from mdm_fast.reference.summary import summarize
    from test_fast_model import tiny_nested_config

    model = build_model("nested_unet", tiny_nested_config())
    levels = summarize(model, 16)
    assert len(levels) > 1 and models.forward_flops_per_image(model, 16) == sum(level.flops for level in levels)


def test_write_report_names_the_card_and_titles_sections(tmp_path):
    path = common.write_report("suite", {"Section A": "| t |"}, tmp_path, echo=False)
    assert path == tmp_path / f"suite-{common.card_slug()}.md"
    text = path.read_text()
    assert text.startswith(f"# suite on {common.card_name()}") and "## Section A\n\n| t |\n" in text


@pytest.mark.parametrize("target", ["eps", "v"])
def test_diffusion_step_bytes_are_what_the_ops_read_and_write(target):
    """noisy_pyramid reads the image and the noises and writes x0, x_t (and a non-eps target: the eps
    target is the noise itself); sampler_update reads x_t, pred, noise and writes x0, x_s, eps per level."""
    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    args, counted = diffusion_step._pyramid_case(16, [1, 4], 2, torch.float32, target, "cpu")
    x0, x_t, tgt = noisy_pyramid(*args, impl="ref")
    written = x0 + x_t + [t for t, n in zip(tgt, args[3]) if t is not n]
    assert counted == nbytes([args[0], *args[3]]) + nbytes(written)
    args, counted = diffusion_step._update_case(16, [1, 4], 2, torch.bfloat16, "cpu")
    out = sampler_update(*args, impl="ref")
    assert counted == nbytes(args[0] + args[1] + args[4]) + nbytes(sum(out, []))


def test_diffusion_step_row(monkeypatch):
    """A row: ms, GB/s and fraction of copy for ref then fused, and the speed-up ref / fused."""
    times = iter([4.0, 1.0])  # ref, triton
    monkeypatch.setattr(common, "device_ms", lambda fn, warmup, iters: next(times))
    monkeypatch.setattr(diffusion_step.dispatch, "why_not", lambda *a: None)
    row = diffusion_step._row("case", sampler_update, (), 8e6, 4.0, 1)
    assert row == ["case", 4.0, 2.0, 0.5, 1.0, 8.0, 2.0, 4.0]


def test_group_norm_table_counts_read_x_write_y(monkeypatch):
    """Forward moves x once in and y once out (2x the bytes of x), backward reads x and dy and writes dx
    (3x); % copy is against the copy ceiling; the last column is ref over the fastest backend."""
    b, c, p = 2, 32, 4
    xbytes = b * c * p * p * 2  # (B, C, H, W) bf16
    ms = {"ref": (4.0, 9.0), "compile": (3.0, float("nan")), "triton": (1.0, 2.0), "cuda": (2.0, 1.5)}
    monkeypatch.setattr(group_norm, "QUICK", [(b, c, p, False)])
    monkeypatch.setattr(group_norm, "DEVICE", "cpu")
    monkeypatch.setattr(group_norm, "ceilings", lambda: common.Ceilings(1e-3, 1.0))
    monkeypatch.setattr(group_norm, "_available", lambda impl, args: None)
    monkeypatch.setattr(group_norm, "_time_pair", lambda impl, args, backward=True: ms[impl])
    monkeypatch.setattr(group_norm, "decoder", lambda suite, copy: "")
    tables = _capture_tables(monkeypatch, group_norm)
    group_norm.run("quick")
    fwd, bwd = tables[0]
    for row, d, traffic, best in ((fwd, 0, 2, 1.0), (bwd, 1, 3, 1.5)):
        assert row[3:7] == pytest.approx([ms[k][d] for k in ("ref", "compile", "triton", "cuda")], nan_ok=True)
        for col, impl in ((7, "triton"), (9, "cuda")):
            want = traffic * xbytes / (ms[impl][d] * 1e-3) / 1e9
            assert row[col] == pytest.approx(want) and row[col + 1] == pytest.approx(100 * want / 1e-3)
        assert row[11] == pytest.approx(ms["ref"][d] / best)


def test_group_norm_decoder_traffic(monkeypatch):
    """The concatenation reads x and the skip and writes both (2 x the output bytes); with the norm after
    it, the norm's read and write double that."""
    b, c1, c2, p = 2, 8, 4, 4
    monkeypatch.setattr(group_norm, "DEVICE", "cpu")
    monkeypatch.setattr(group_norm, "DECODER", [(b, c1, c2, p)])
    monkeypatch.setattr(group_norm, "device_ms", lambda fn: 0.5)
    tables = _capture_tables(monkeypatch, group_norm)
    group_norm.decoder("quick", 1e-3)
    out = b * (c1 + c2) * p * p * 2  # (B, C1 + C2, H, W) bf16
    for _, name, ms, pct in tables[0]:
        traffic = 2 * out if "alone" in name else 4 * out
        assert pct == pytest.approx(100 * traffic / (0.5e-3) / 1e9 / 1e-3), name


def test_group_norm_sweep_times_the_named_knobs(monkeypatch, tmp_path):
    """--sweep --knobs: each value of the named plan knobs (the default first, each knob back at its
    default after), channels_last-only knobs on channels_last shapes only, no other knob."""
    from mdm_fast.kernels import group_norm as kern

    monkeypatch.setattr(group_norm, "QUICK", [(2, 64, 8, False), (2, 64, 8, True)])
    monkeypatch.setattr(group_norm, "DEVICE", "cpu")
    monkeypatch.setattr(group_norm, "ceilings", lambda: common.Ceilings(1e-3, 1.0))
    monkeypatch.setattr(group_norm, "_plans", lambda k, b, c, p, cl: tuple(
        k.plan(b, c, p * p, group_norm.GROUPS, cl, 132, bwd) for bwd in (False, True)))
    timed = []
    monkeypatch.setattr(group_norm, "_time_pair", lambda impl, args: timed.append(
        (kern.PIPELINE_STAGES, kern.MAX_REGISTERS)) or (1.0, 2.0))
    tables = _capture_tables(monkeypatch, group_norm)
    group_norm.sweep(tmp_path, ["PIPELINE_STAGES", "MAX_REGISTERS"])
    labels = [(row[1], row[2]) for row in tables[-1]]
    stages = [f"pipeline stages = {v}" for v in (3, 1, 2, 4)]
    registers = [f"max registers / thread = {v}" for v in (128, None)]  # channels_last only
    assert labels == [("NCHW", k) for k in stages] + [("NHWC", k) for k in registers + stages]
    assert timed == [(3, 128), (1, 128), (2, 128), (4, 128), (3, 128), (3, None), (3, 128), (1, 128), (2, 128),
                     (4, 128)]


def test_group_norm_full_suite_shapes_are_distinct():
    full = group_norm.shapes("full")
    assert len(set(full)) == len(full) == 2 * 2 * 5 + 2 * 2 * 3  # 5 + 3 levels, 2 batches, 2 layouts


def _public_levels(stem):
    """A public model's nestings, outermost first: (config, [(channels, side in px) of each level])."""
    _, cfg, size = models.public_config(stem)
    nestings = []
    while cfg:
        nestings.append((cfg, [(c, size >> i) for i, c in enumerate(cfg["resolution_channels"])]))
        size >>= len(cfg["resolution_channels"]) - 1
        cfg = cfg.get("inner_config")
    return nestings


def test_suites_shapes_are_the_public_models():
    """The group norm, attention, upsample and pyramid shapes are those of the public configs: levels
    (channels, px); attention at the inner model's attention levels; an upsample into each level but the
    first, with the channels of the level below it; a pyramid ratio per nesting."""
    m256, m1024 = _public_levels("256x256"), _public_levels("1024x1024")
    assert [levels for _, levels in m256] == [group_norm.M256_OUTER, group_norm.M256_INNER]
    assert [levels for _, levels in m1024] == [group_norm.M1024_OUTER] + [levels for _, levels in m256]
    assert {cfg["resnet_config"]["num_groups_norm"] for cfg, _ in m1024} == {group_norm.GROUPS}
    inner, levels = m256[1]
    assert {(L, C) for L, C, _ in attention.LEVELS.values()} == {
        (p * p, c) for i, (c, p) in enumerate(levels) if i in inner["attention_levels"]}
    assert {(C, H) for C, H, _ in resample.UPSAMPLE.values()} == {
        (c, p) for _, levels in m256 + m1024[:1] for c, p in levels[1:]}
    for stem, nestings in (("256", m256), ("1024", m1024)):
        size, ratios, _ = diffusion_step.MODELS[stem]
        assert ratios == [size // levels[0][1] for _, levels in nestings] and size == nestings[0][1][0][1]


def test_attention_flops(monkeypatch):
    """4 * B * heads * L * (L + T) * d forward, 2.5x backward, against the bf16 ceiling; the levels' head
    dims are those their names give; each row's ratio is against the SDPA pair with its kind of text mask."""
    for name, (L, C, heads) in attention.LEVELS.items():
        assert heads * int(name.split("d=")[1].rstrip(")")) == C
    monkeypatch.setattr(attention, "_inputs", lambda *a: {})
    monkeypatch.setattr(attention, "_variants", lambda x, h, s, r: {
        "SDPA pair (B,h,L,d)": 2.0, "fast": 0.5, "SDPA pair (B,h,L,d), unmasked text": 1.0,
        "fast, unmasked text": 0.5})
    monkeypatch.setattr(attention, "_leaves", lambda x, name: [])
    monkeypatch.setattr(attention, "_time_backward", lambda fn, leaves, iters: 2 * fn)
    monkeypatch.setattr(common, "device_ms", lambda fn, iters: fn)
    monkeypatch.setattr(common, "ceilings", lambda: common.Ceilings(1.0, 100.0))
    tables = _capture_tables(monkeypatch, common)
    level = "level 1 (32x32, 512 ch, d=64)"
    attention._section("t", level, 16, torch.bfloat16, True, 1, "quick", False)
    B, L, T, heads, d = 16, 1024, attention.TEXT_TOKENS, 8, 64
    flops = 4 * B * heads * L * (L + T) * d
    rows = {row[0]: row for row in tables[-1]}  # the section's whole table
    tf_f, tf_b = flops / 0.5e-3 / 1e12, 2.5 * flops / 1e-3 / 1e12  # TFLOP/s at 0.5 ms forward, 1 ms backward
    assert rows["fast"][1:] == pytest.approx([0.5, tf_f, 100 * tf_f / 100.0, 4.0, 1.0, tf_b, 100 * tf_b / 100.0, 4.0])
    # an unmasked row against the unmasked SDPA pair (it was against the masked one: 2x here, not 1x)
    assert rows["fast, unmasked text"][4] == rows["fast, unmasked text"][8] == 2.0


def test_attention_variants_run_with_their_own_leaves():
    """Every variant of the full suite runs (triton on the interpreter, tiny shapes), the unmasked ones
    without a mask, and its backward reaches the leaves _leaves gives it."""
    x = attention._inputs(1, 20, 32, 2, torch.float32, device="cpu")
    variants = attention._variants(x, 2, "full", with_ref=True)
    assert {"SDPA pair (B,h,L,d), unmasked text", "triton fused (channels_last layout), unmasked text"} <= set(variants)
    for name, fn in variants.items():
        leaves = attention._leaves(x, name)
        for t in leaves:
            t.requires_grad_(True)
        out = fn()
        assert torch.isfinite(out).all(), name
        grads = torch.autograd.grad(out.square().sum(), leaves)
        assert all(g.abs().sum() > 0 for g in grads), name
        for t in leaves:
            t.requires_grad_(False)
    masked, unmasked = (variants[f"triton fused (channels_last layout){s}"]() for s in ("", ", unmasked text"))
    assert not torch.allclose(masked, unmasked)


def test_attention_report_names_each_picked_config(monkeypatch):
    """The autotuner's choices are listed with the key's named fields (Triton's key: AUTOTUNE_KEY's values in
    order, then the dtypes)."""
    from mdm_fast.kernels import attention as kernels

    q = torch.empty(2, 8, 256, 96).transpose(2, 3).contiguous().transpose(2, 3)  # channel-major: s_qd = L
    args = dict(kernels._common(q, q, torch.empty(2, 8, 77, 96), None, None), s_qd=q.stride(3))
    key = tuple(args[n] for n in kernels.AUTOTUNE_KEY) + ("torch.bfloat16",)
    monkeypatch.setattr(kernels._bwd_dkdv_kernel, "cache", {key: "CONFIG"})
    monkeypatch.setattr(kernels._fwd_kernel, "cache", {})
    monkeypatch.setattr(kernels._bwd_dq_kernel, "cache", {})
    assert attention._picked_configs() == ("_bwd_dkdv_kernel LQ=256, d<=128, unmasked text, channel-major, "
                                           "B*H*LQ=4096: CONFIG")


@pytest.mark.parametrize("backward", [False, True])
def test_resample_rows_count_the_upsampled_conv(monkeypatch, backward):
    """FLOPs of the 3x3 conv on the upsampled image, 2 * B * C * C * 9 * (2H)^2 (3x with backward);
    bytes: x read, the (B, C, 2H, 2W) output written (twice that with backward), bf16."""
    B, C, H = 2, 4, 3
    monkeypatch.setattr(resample, "DEVICE", "cpu")
    monkeypatch.setattr(resample, "UPSAMPLE", {"s": (C, H, B)})
    monkeypatch.setattr(resample, "VARIANTS", {"ref": "ref", "fast": "triton"})
    monkeypatch.setattr(resample, "_upsample", lambda x, w, b, impl: torch.zeros(B, C, 2 * H, 2 * H))
    times = iter([2.0, 0.5])
    monkeypatch.setattr(common, "device_ms", lambda fn, warmup, iters: next(times))
    monkeypatch.setattr(common, "ceilings", lambda: common.Ceilings(1.0, 50.0))
    rows = resample._upsample_rows("s", B, torch.contiguous_format, backward, 1)
    flops = 2 * B * C * C * 9 * (2 * H) ** 2 * (3 if backward else 1)
    nbytes = 2 * (B * C * H * H + B * C * (2 * H) ** 2) * (2 if backward else 1)
    tf = flops / 0.5e-3 / 1e12
    assert rows[1] == pytest.approx(["fast", 0.5, 4.0, tf, 100 * tf / 50.0, nbytes / 0.5e-3 / 1e9])


def test_models_report_ratios_and_mfu(monkeypatch):
    """Speed-ups over the same workload's reference rows; TFLOP/s from the forward FLOPs x batch (x3 for
    a train step); MFU against the bf16 ceiling."""
    monkeypatch.setattr(models, "ceilings", lambda: common.Ceilings(1.0, 200.0))
    monkeypatch.setattr(models, "write_report", lambda *a, **k: None)
    tables = _capture_tables(monkeypatch, models)
    train, fwd = models.Workload("256x256", "train", 16), models.Workload("256x256", "forward", 2)
    results = [models.Result(fwd, "reference eager", 5.0, 1.0, 1.0),
               models.Result(train, "reference eager", 30.0, 1.0, 1.0),
               models.Result(train, "reference + torch.compile", 20.0, 1.0, 1.0),
               models.Result(train, "mdm_fast eager", 10.0, 1.0, 1.0)]
    models.report(results, {"256x256": 1e9}, "-", None)
    tf = 3 * 1e9 * 16 / 10e-3 / 1e12
    assert tables[0][-1][2:7] == [10.0, 3.0, 2.0, pytest.approx(tf), f"{100 * tf / 200.0:.0f}%"]


def _op(name, parent=None, kernels=()):
    """A profiler event of the CPU operator ``name`` called by ``parent``, launching ``kernels`` (us each)."""
    from torch.autograd.profiler_util import FunctionEvent

    e = FunctionEvent(id=0, name=name, thread=0, start_us=0, end_us=1)
    if parent is not None:
        e.set_cpu_parent(parent)
    for us in kernels:
        e.append_kernel("k", 0, us)
    return e


def test_profile_files_each_kernel_under_the_outermost_operator_with_a_kind():
    """A convolution's bias add inside it is the convolution's; a linear's GEMM a matmul; a backward's
    kernels under its aten operator; a cast's copy a cast; an operator without a kind falls to OTHER."""
    conv = _op("aten::_convolution", _op("aten::convolution", _op("aten::conv2d")))
    backward = _op("ConvolutionBackward0", _op("autograd::engine::evaluate_function: ConvolutionBackward0"))
    events = [_op("aten::cudnn_convolution", conv, (100.0, 50.0)), _op("aten::add_", conv, (30.0,)),
              _op("aten::addmm", _op("aten::linear"), (40.0,)), _op("mdm_fast::group_norm_act_fwd", None, (20.0,)),
              _op("aten::convolution_backward", backward, (70.0,)), _op("aten::add", None, (6.0,)),
              _op("aten::copy_", _op("aten::_to_copy", _op("aten::to")), (8.0,)),
              _op("aten::native_layer_norm", None, (5.0,)), _op("aten::empty")]
    assert profile_model.by_kind(events, steps=2) == {
        "convolution": (1.5, 0.09), "matmul": (0.5, 0.02), "group norm (fused)": (0.5, 0.01),
        "convolution backward": (0.5, 0.035), "residual adds and other adds": (0.5, 0.003),
        "dtype casts": (0.5, 0.004), roofline.OTHER: (0.5, 0.0025)}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.nn.functional.linear(torch.randn(4, 3), torch.randn(2, 3), torch.randn(2))
    assert profile_model.by_kind(prof.events(), steps=1) == {}  # real events: on a CPU, no kernels


def test_profile_files_triton_kernels_no_operator_holds_under_their_ops_kind():
    """Triton's launches may be linked to no operator (all of mdm_fast's were, on the H200 with torch
    2.11): the calls of an mdm_fast Triton kernel that no operator holds go to its op's kind by name, those
    an operator holds stay counted once; other unheld kernels are left to the 'not filed' row."""
    from types import SimpleNamespace

    from torch.autograd.profiler_util import FunctionEvent

    held = FunctionEvent(id=0, name="mdm_fast::group_norm_act_fwd", thread=0, start_us=0, end_us=1)
    held.append_kernel("_fwd_partial", 0, 20.0)
    entries = [SimpleNamespace(key=k, count=n, self_device_time_total=us) for k, n, us in
               [("_fwd_partial", 3, 80.0), ("_bwd_dq_kernel", 2, 50.0), ("_concat_kernel", 1, 10.0),
                ("sm90_gemm", 4, 40.0), ("_update_kernel", 1, 5.0)]]
    got = profile_model.by_kind([held], steps=1, kernels=entries)
    assert got == {"group norm (fused)": (3, pytest.approx(0.08)), "attention backward": (2, pytest.approx(0.05)),
                   "concatenation (skips)": (1, pytest.approx(0.01))}
    kinds = roofline.triton_kernel_kinds()
    assert {k: kinds[k] for k in ("_fwd_split_apply", "_bwd_fused", "_fwd_kernel", "_bwd_dkdv_kernel",
                                  "_bias_add_kernel", "_upsample_conv3x3_fwd")} == {
        "_fwd_split_apply": "group norm (fused)", "_bwd_fused": "group norm backward",
        "_fwd_kernel": "attention (fused)", "_bwd_dkdv_kernel": "attention backward",
        "_bias_add_kernel": "conv bias (+ ResNet skip) adds", "_upsample_conv3x3_fwd": "upsample-conv (sub-pixel)"}
    assert set(kinds.values()) <= {kind for _, kind in roofline._KINDS}  # each has a floor row to stand beside


def test_profile_sets_each_kind_against_its_floor():
    """The kinds with the most ms over their floors first; a floor the step did not run ('-') last and
    left out of the total."""
    measured = {"convolution": (2.0, 3.0), "matmul": (1.0, 1.0), roofline.OTHER: (1.0, 0.5)}
    rows = profile_model.against_floor(measured, {"convolution": 1.5, "matmul": 0.9, "EMA update": 1.0})
    assert [r[0] for r in rows] == ["convolution", roofline.OTHER, "matmul", "EMA update", "total (the kinds run)"]
    assert rows[0] == ["convolution", 2, 3.0, 1.5, "50%", 1.5]
    assert rows[3][2:5] == [pytest.approx(math.nan, nan_ok=True), 1.0, "-"]
    assert rows[-1] == ["total (the kinds run)", 4, 4.5, pytest.approx(2.4), "53%", pytest.approx(2.1)]
    # kernel time no operator holds (a graph replay's, say) is a row of its own, in the total
    rows = profile_model.against_floor(measured, {"convolution": 1.5}, kernel_ms=5.0)
    assert rows[2][:4] == [profile_model.UNFILED, 0, pytest.approx(0.5), 0.0]
    assert rows[-1][2] == pytest.approx(5.0)
    assert profile_model.UNFILED not in [r[0] for r in profile_model.against_floor(measured, {}, kernel_ms=4.5)]


def test_profile_kernel_entries_leave_out_annotation_spans():
    """A record_function range (every optimiser step is one) has a GPU span over its kernels: not a kernel."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def entry(key, device, annotation=False):
        return SimpleNamespace(key=key, device_type=device, is_user_annotation=annotation)

    averages = [entry("aten::mm", DeviceType.CPU), entry("sm90_gemm", DeviceType.CUDA),
                entry("Optimizer.step#AdamW.step", DeviceType.CUDA, True), entry("Memcpy DtoD", DeviceType.CUDA)]
    assert [e.key for e in profile_model.kernel_entries(averages)] == ["sm90_gemm", "Memcpy DtoD"]


@pytest.mark.parametrize("kind", ["forward", "train"])
def test_profile_model_main_writes_its_tables(monkeypatch, tmp_path, kind):
    """benchmarks.profile_model's main on the CPU, the tiny model standing in for the public one and the
    CPU for the GPU (its clock, ceilings, profiler, name): its calls into benchmarks.models and the roofline
    still fit (a GPU lease would find out otherwise), and it writes its three tables, every kind of the
    step's floor among the rows (no kernels on a CPU: their ms are '-')."""
    from test_fast_model import tiny_inputs, tiny_nested_config

    from mdm_fast.reference import build_model as build_reference

    for name, value in [("is_available", lambda: True), ("synchronize", lambda *a: None),
                        ("is_bf16_supported", lambda *a, **k: True), ("get_device_name", lambda *a: "CPU"),
                        ("is_current_stream_capturing", lambda: False)]:  # (a CUDA build of torch asks the driver)
        monkeypatch.setattr(torch.cuda, name, value)
    cpu = torch.profiler.ProfilerActivity.CPU
    monkeypatch.setattr(profile_model, "profile", lambda activities: torch.profiler.profile(activities=[cpu]))
    for module in (profile_model, common):
        monkeypatch.setattr(module, "ceilings", lambda: common.Ceilings(4190.0, 787.0))
    monkeypatch.setattr(profile_model, "time_ms", lambda *a, **k: 1.0)
    monkeypatch.setattr(models, "public_config", lambda stem: ("nested_unet", tiny_nested_config(), 16))
    monkeypatch.setattr(models, "build", lambda stem, fast: build_reference("nested_unet", tiny_nested_config()))
    monkeypatch.setattr(models, "inputs", lambda model, size, batch: tiny_inputs(batch))
    monkeypatch.setattr(models, "cast_once", lambda model: model)  # (autocast("cuda") casts nothing here)
    profile_model.main(["--kind", kind, "--batch", "2", "--steps", "1", "--out", str(tmp_path)])
    text = (tmp_path / f"profile-256-{kind}-b2-cpu.md").read_text()
    kinds = roofline.count("nested_unet", tiny_nested_config(), 16, kind, 2).floor_ms
    table = text.split("## GPU time by operator kind against its floor")[1].split("##")[0]
    assert {line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ")} == {
        "operator kind", *kinds, "total (the kinds run)"}
    assert "## Top kernels" in text and "## Top operators by host time" in text and "of kernel time per step" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_profile_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        profile_model.main(["--kind", "train"])


def test_memory_counts_kept_activations_not_parameters():
    """A linear layer keeps its input (and its weight, a parameter: not counted) for backward."""
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)  # (B, C_in)
    assert memory.kept_by_op(layer, (x,)) == {"input": x.numel() * x.element_size()}


def test_memory_counts_what_the_gpu_custom_ops_keep():
    """Inside gpu_custom_ops the norms and attention keep what their custom ops keep on a GPU (x and the
    statistics; q, k, v, the output and the log-sum-exp), not PyTorch's CPU intermediates, even under
    TRITON_INTERPRET (set by conftest)."""
    from test_fast_model import tiny_inputs, tiny_nested_config

    model, args = mdm_fast.build_model("nested_unet", tiny_nested_config()), tiny_inputs(2)
    cpu_ops = {"NativeGroupNormBackward0", "ScaledDotProductFlashAttentionForCpuBackward0"}
    assert cpu_ops <= set(memory.kept_by_op(model, args))
    with memory.gpu_custom_ops():
        gpu = memory.kept_by_op(model, args)
    assert not cpu_ops & set(gpu)
    assert cpu_ops <= set(memory.kept_by_op(model, args))  # restored after the block


def test_memory_estimate_halves_fp32_activations_and_scales_the_batch(monkeypatch):
    """The bf16 train-step estimate: the fp32 kept bytes at batch 1, x the large batch, / 2 (bf16), plus
    16 bytes of weights, gradients and AdamW moments per parameter."""
    import mdm_fast.ops.attention  # noqa: F401  (the modules, not the functions of the same names)
    import mdm_fast.ops.group_norm_act  # noqa: F401
    from mdm_fast.ops import dispatch
    from test_fast_model import tiny_nested_config

    gna, att = sys.modules["mdm_fast.ops.group_norm_act"], sys.modules["mdm_fast.ops.attention"]
    reasons = dispatch.registered_ops()["attention"].reasons
    patched = (gna._plain_reference, att._kernels, reasons["triton"])  # memory.run patches them while it counts
    monkeypatch.setattr(memory, "public_config", lambda stem: ("nested_unet", tiny_nested_config(), 16))
    monkeypatch.setattr(memory, "TEXT_WIDTH", 24)
    monkeypatch.setattr(memory, "TEXT_TOKENS", 5)
    monkeypatch.setattr(memory, "GPU_BATCH", {"tiny": 100_000})
    monkeypatch.setattr(memory, "peak_activation_bytes", lambda *a, **k: 0)
    build = mdm_fast.build_model

    def with_ballast(*a, **k):  # 25 M parameters (never touched), so that the 16 bytes of each show
        model = build(*a, **k)
        model.register_parameter("ballast", torch.nn.Parameter(torch.empty(25_000_000)))
        return model

    monkeypatch.setattr(mdm_fast, "build_model", with_ballast)
    text = memory.run("tiny", 1)
    assert (gna._plain_reference, att._kernels, reasons["triton"]) == patched  # and restored after
    total = next(line for line in text.splitlines() if line.startswith("| total |"))
    kept_mb, default_mb = (float(v) for v in total.strip("| ").split(" | ")[1:])  # fp32, batch 1
    n = sum(p.numel() for p in build("nested_unet", tiny_nested_config()).parameters()) + 25_000_000
    assert float(re.search(r"\(([\d.]+) GB of it weights", text)[1]) == pytest.approx(16 * n / 1e9, abs=0.05)
    est = re.search(r"peak at batch 100000: ([\d.]+) GB with the default \(.*?\), ([\d.]+) GB keeping them", text)
    default_gb, kept_gb = float(est[1]), float(est[2])
    assert default_gb == pytest.approx(default_mb * 1e6 * 100_000 / 2 / 1e9 + 16 * n / 1e9, rel=2e-3)
    assert kept_gb == pytest.approx(kept_mb * 1e6 * 100_000 / 2 / 1e9 + 16 * n / 1e9, rel=2e-3)


STUB_PYTHON = """#!/usr/bin/env bash
# stands in for python: a benchmark module writes one table into its --out folder; anything else passes
out=""; mod=""
while (($#)); do case $1 in -m) mod=$2; shift;; --out) out=$2; shift;; esac; shift; done
name=${mod#benchmarks.}
if [[ -n $out && $mod == benchmarks.* ]]; then echo "| $name |" >"$out/$name-$(date +%s%N).md"; fi
"""


@pytest.mark.parametrize("stages,tables,out", [("models ops", 3, "out"), ("more", 7, "out"),
                                               ("more", 7, "repo/benchmarks/results/")])
def test_device_check_runs_every_stage_and_brings_back_at_most_8_files(tmp_path, stages, tables, out):
    """benchmarks/device_check.sh (a copy, with a stand-in python): every stage runs and is summarised; a
    call that writes more tables than the device tool brings back (8 files, the summary and log among them)
    packs them into one archive, but never in the committed results folder (however it is spelled)."""
    import shutil
    import subprocess
    import tarfile
    from pathlib import Path

    repo, stub, out = tmp_path / "repo", tmp_path / "python", tmp_path / out
    (repo / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh", repo / "benchmarks")
    committed = repo / "benchmarks" / "results" / "models-nvidia-h200.md"
    committed.write_text("| a committed table |")
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    out.mkdir(exist_ok=True)
    subprocess.run(["bash", "benchmarks/device_check.sh", *stages.split()], cwd=repo, check=True, timeout=60,
                   capture_output=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(stub), "OUT": str(out)})
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("card: ") and summary[2].startswith("mdm_fast at "), summary  # what and where
    stages = [line for line in summary if " rc=" in line]
    assert stages[0].startswith("install: rc=0") and all(" rc=0" in line for line in stages), summary
    files = sorted(p.name for p in out.iterdir())
    if out.samefile(repo / "benchmarks" / "results"):
        assert committed.read_text() == "| a committed table |" and "tables.tar" not in files
        assert len([f for f in files if f.endswith(".md")]) == tables + 1
        return
    assert len(files) <= 8, files
    if tables + 2 > 8:
        assert files == ["log.txt", "summary.txt", "tables.tar"]
        names = tarfile.open(out / "tables.tar").getnames()
    else:
        names = [f for f in files if f.endswith(".md")]
    assert len(names) == tables and all(n.endswith(".md") for n in names)


COLLECT = """
import json, sys
import pytest

class Ids:
    def pytest_collection_finish(self, session):  # after -m and -k deselected
        self.ids = [item.nodeid for item in session.items]

groups = json.loads(sys.argv[1])
found = []
for args in [["-m", "gpu", "tests"]] + groups:  # everything marked gpu, then each group as the script runs it
    ids = Ids()
    pytest.main([*args, "--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[ids])
    found.append(ids.ids)
print("IDS" + json.dumps(found))
"""


def test_device_check_runs_every_gpu_test_once(tmp_path):
    """The GPU tests that benchmarks/device_check.sh runs (its pytest groups, as it passes them) are every
    test marked gpu, each in one group (a test missing there would never run on a lent GPU)."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stub, log = tmp_path / "python", tmp_path / "calls"
    # one append per call (the groups run side by side: two writes per call could interleave)
    stub.write_text(f"#!/usr/bin/env bash\nline=$(printf '%s\\x1f' \"$@\")\nprintf '%s\\n' \"$line\" >>{log}\n")
    stub.chmod(0o755)
    subprocess.run(["bash", str(root / "benchmarks" / "device_check.sh"), "models"], cwd=root, check=True,
                   timeout=60, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "PYTHON": str(stub), "OUT": str(tmp_path / "out")})
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]
    groups = [args[2:] for args in calls if args[:2] == ["-m", "pytest"]]
    assert len(groups) >= 5, calls
    out = subprocess.run([sys.executable, "-c", COLLECT, json.dumps(groups)], cwd=root, check=True, timeout=300,
                         capture_output=True, text=True).stdout
    every, *picked = json.loads(out.split("IDS", 1)[1])
    assert len(every) > 100
    ran = [i for ids in picked for i in ids]
    assert sorted(ran) == sorted(every), (set(every) - set(ran), [i for i in set(ran) if ran.count(i) > 1])
