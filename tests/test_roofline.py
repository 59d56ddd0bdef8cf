"""benchmarks.roofline: its FLOP counts agree with PyTorch's own counter, its byte counts with the shapes."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mdm_fast
from benchmarks import roofline
from mdm_fast.models.cast_weights import cast_targets
from test_fast_model import tiny_nested_config


def test_flops_match_torch_flop_counter_and_bytes_the_shapes(monkeypatch):
    """On the tiny nested model (every fused op, cross-attention, both levels): convolutions and matmuls
    as torch.utils.flop_counter counts them in the same forward; group norms move their input and output."""
    cfg = tiny_nested_config()
    tally = roofline.count("nested_unet", cfg, 16, "forward", 2, text_tokens=5)

    seen = {}
    real = roofline._Counter.__torch_dispatch__

    def record(self, func, types, args=(), kwargs=None):
        out = real(self, func, types, args, kwargs)
        if str(func) == "mdm_fast.group_norm_act_fwd.default":
            seen.setdefault("norm_bytes", 0)
            seen["norm_bytes"] += 2 * args[0].numel() * args[0].element_size()
        return out

    monkeypatch.setattr(roofline._Counter, "__torch_dispatch__", record)
    flops = FlopCounterMode(display=False)
    with flops:  # one forward only (the cached projections' first build has no convolution or matmul)
        roofline.count("nested_unet", cfg, 16, "forward", 2, text_tokens=5, as_sampler=False)
    by_op = {str(k): v for k, v in flops.get_flop_counts()["Global"].items()}
    assert tally.flops["convolution"] == by_op["aten.convolution"] > 0
    assert tally.flops["matmul"] == sum(v for k, v in by_op.items() if k in ("aten.mm", "aten.addmm", "aten.bmm"))
    # every operator whose FLOPs are counted as a matmul is filed as one (baddbmm was filed as "other")
    assert {roofline._kind(f"aten.{n}.default") for n in ("mm", "addmm", "bmm", "baddbmm")} == {"matmul"}
    # the fused ops' own formulas
    assert tally.flops["attention (fused)"] > 0 and tally.flops["upsample-conv (sub-pixel)"] > 0
    norm = tally.bytes["group norm (fused)"]
    assert seen["norm_bytes"] <= norm <= seen["norm_bytes"] * 1.1  # plus weights, scales and statistics
    assert sum(tally.floor_ms.values()) > 0


def test_a_train_step_counts_backward_and_the_optimizer():
    tally = roofline.count("nested_unet", tiny_nested_config(), 16, "train", 2, text_tokens=5)
    assert tally.calls["convolution backward"] > 0 and tally.calls["group norm backward"] > 0
    assert tally.calls["attention backward"] > 0
    # the norm outputs are recomputed in backward: twice the forward's norms
    assert tally.calls["group norm (fused)"] == 2 * tally.calls["group norm backward"]
    # fused AdamW reads param, grad and 2 moments and writes 3 (fp32); the EMA reads 2 and writes 1
    n = sum(p.numel() for p in mdm_fast.build_model("nested_unet", tiny_nested_config()).parameters())
    assert (tally.bytes["optimizer (fused AdamW)"], tally.bytes["EMA update"]) == (7 * 4 * n, 3 * 4 * n)
    assert tally.floor_ms["EMA update"] == pytest.approx(12 * n / (roofline.H200_GBPS * 1e6))
    # as the trainer runs it (CastEachCall): the weights cast in one pass each way, not each one per layer
    # and its gradient back (the casts left are of activations, and inside the upsample-conv)
    assert roofline._kind("aten._foreach_copy_.default") == "dtype casts"
    weights = len(cast_targets(mdm_fast.build_model("nested_unet", tiny_nested_config()), torch.bfloat16))
    assert tally.calls["dtype casts"] < weights, (tally.calls["dtype casts"], weights)


def test_a_sampler_forward_casts_no_weights():
    """Counted as the sampler runs it (weights cast once), a forward casts only its inputs, not the
    conv and linear weights that autocast casts at every call of the plain model."""
    cfg = tiny_nested_config()
    plain = roofline.count("nested_unet", cfg, 16, "forward", 2, text_tokens=5, as_sampler=False)
    sampler = roofline.count("nested_unet", cfg, 16, "forward", 2, text_tokens=5)
    assert sampler.calls["dtype casts"] <= 8 < plain.calls["dtype casts"], (sampler.calls, plain.calls)


def test_a_broadcast_view_is_counted_once():
    """_footprint: a stride-0 (broadcast) view costs its storage once; a dense tensor its numel."""
    assert roofline._footprint(torch.zeros(4, 1).expand(4, 1000)) == 4 * 4  # (4, 1000), strides (1, 0)
    assert roofline._footprint(torch.zeros(2, 3, dtype=torch.bfloat16)) == 6 * 2
    assert roofline._footprint(torch.zeros(0, 3)) == 0


def test_convolution_flops_forward_transposed_and_backward():
    """Closed forms: a conv does 2 * out * (Cin / groups) * taps, a transposed conv 2 * in * (Cout / groups)
    * taps; its backward one conv's worth per gradient asked for (input, weight)."""
    x = torch.randn(2, 4, 5, 5)  # (B, Cin, H, W)
    w = torch.randn(6, 2, 3, 3)  # (Cout, Cin / groups, kh, kw), groups 2
    wt = torch.randn(4, 3, 2, 2)  # (Cin, Cout / groups, kh, kw) of a transposed conv, groups 2
    fwd = 2.0 * (2 * 6 * 3 * 3) * 2 * 9  # out (2, 6, 3, 3), 2 input channels per group, 9 taps
    transposed = 2.0 * x.numel() * 3 * 4  # each input element meets 3 outputs x 4 taps
    with roofline._Counter(1.0, 1.0) as c:
        torch.nn.functional.conv2d(x, w, groups=2)
        torch.nn.functional.conv_transpose2d(x, wt, stride=2, groups=2)
    assert c.tally.flops["convolution"] == fwd + transposed
    for leaves, grads in (((x, w, wt), 2), ((w, wt), 1)):  # input and weight gradients, then weights only
        for t in leaves:
            t.requires_grad_()
        y = torch.nn.functional.conv2d(x, w, groups=2)
        yt = torch.nn.functional.conv_transpose2d(x, wt, stride=2, groups=2)
        with roofline._Counter(1.0, 1.0) as c:
            torch.autograd.grad((y.sum(), yt.sum()), leaves)
        assert c.tally.flops["convolution backward"] == grads * (fwd + transposed), len(leaves)
        x.requires_grad_(False)


def test_fused_op_flop_formulas():
    """The fused attention: 4 * B * L * (L + T) * C forward (self + cross over all T text tokens), 2.5x
    backward; the sub-pixel upsample-conv: 2 * out * Cin * 4 (2x2 taps per output pixel)."""
    B, C, L, T = 2, 8, 6, 5
    qkv, kv = torch.empty(B, 3 * C, L, device="meta"), torch.empty(B, T, 2 * C, device="meta")  # (B, 3C, L), (B, T, 2C)
    fwd = 4.0 * B * L * (L + T) * C
    assert roofline._flops("mdm_fast.attention_qkv_fwd.default", (qkv, kv), None) == fwd
    assert roofline._flops("mdm_fast.attention_qkv_fwd.default", (qkv, None), None) == 4.0 * B * L * L * C
    assert roofline._flops("mdm_fast.attention_qkv_bwd.default", (qkv, qkv, kv), None) == 2.5 * fwd
    x = torch.empty(B, 3, 4, 4, device="meta")  # (B, Cin, H, W)
    w = torch.empty(7, 3, 3, 3, device="meta")  # (Cout, Cin, 3, 3)
    out = torch.empty(B, 7, 8, 8, device="meta")
    assert roofline._flops("mdm_fast.upsample_conv3x3.default", (x, w), out) == 2.0 * out.numel() * 3 * 4


def test_an_operators_floor_is_the_longer_of_flops_and_bytes_and_views_are_free():
    """mm (4, 8) @ (8, 16): 1024 FLOPs, (32 + 128 + 64) * 4 = 896 bytes; the floor is whichever takes
    longer at the given rates; a view launches no kernel and moves nothing."""
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    for tflops, gbps, floor in ((1e-9, 1e-6, 1024.0), (1e-8, 1e-7, 8960.0)):  # ms: flop-bound, byte-bound
        with roofline._Counter(tflops, gbps) as c:
            a @ b
            a.t()
        assert (c.tally.flops["matmul"], c.tally.bytes["matmul"]) == (1024, 896)
        assert c.tally.floor_ms["matmul"] == pytest.approx(floor) and sum(c.tally.calls.values()) == 1


def test_report_shares_sum_the_floors():
    """Each kind's share is its floor over the summed floors; the total row sums every column."""
    tally = roofline.Tally()
    for kind, ms in (("matmul", 3.0), ("dtype casts", 1.0)):
        tally.calls[kind], tally.flops[kind], tally.bytes[kind], tally.floor_ms[kind] = 1, 0.0, 0.0, ms
    text = roofline.report("m", "forward", 1, tally, 1.0, 1.0)
    lines = text.splitlines()
    assert "| matmul | 1 | 0.000 | 0.000 | 3.000 | 75% |" in lines
    assert "| dtype casts | 1 | 0.000 | 0.000 | 1.000 | 25% |" in lines
    assert "| total | 2 | 0.000 | 0.000 | 4.000 | 100% |" in lines
