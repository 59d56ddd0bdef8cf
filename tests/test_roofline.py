"""benchmarks.roofline: its FLOP counts agree with PyTorch's own counter, its byte counts with the shapes."""
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
    assert tally.bytes["optimizer (fused AdamW)"] > 0 and tally.bytes["EMA update"] > 0
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
