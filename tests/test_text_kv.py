"""mdm_fast.models.text_kv: every attention layer's text keys and values from one LayerNorm and one GEMM
when sampling, against the per-layer LayerNorm + Linear of the reference."""
import copy

import pytest
import torch
from torch import nn

import mdm_fast
from mdm_fast.models.fast import FastSelfAttention
from mdm_fast.models.text_kv import TextProjections, batched_text_kv, text_kv
from mdm_fast.reference import build_model as build_reference
from mdm_fast.reference.layers import SelfAttention
from test_fast_model import FP32_ATOL, randomize, tiny_inputs, tiny_nested_config


def _layers(widths=(32, 64, 32), D=24, affine=True):
    torch.manual_seed(0)
    layers = [SelfAttention(c, num_heads=4, cond_dim=D) for c in widths]
    for m in layers:
        if not affine:
            m.norm_cond = nn.LayerNorm(D, elementwise_affine=False)
        randomize(m, 0.3)
        if affine:  # a LayerNorm affine far from (1, 0): the fold must carry both
            with torch.no_grad():
                m.norm_cond.weight.uniform_(0.5, 2.0)
                m.norm_cond.bias.normal_(0, 1.0)
    return layers


@pytest.mark.parametrize("affine", [True, False])
def test_one_gemm_gives_every_layers_projection(affine):
    layers = _layers(affine=affine)
    for m in layers:
        m.norm_cond.eps = 0.1  # not LayerNorm's default: the shared normalisation must use the layers' eps
    cond = torch.randn(2, 7, 24)
    got = TextProjections(layers)(cond)
    for m, kv in zip(layers, got):
        want = m.kv_cond(m.norm_cond(cond))
        assert kv.shape == want.shape == (2, 7, 2 * m.channels)
        torch.testing.assert_close(kv, want, rtol=1e-5, atol=1e-5)


def test_layers_that_cannot_share_a_gemm_are_refused():
    layers = _layers()
    assert TextProjections.compatible(layers) and not TextProjections.compatible([])
    layers[1].norm_cond.eps = 1e-6
    assert not TextProjections.compatible(layers)
    layers = _layers()
    layers[2].kv_cond = nn.Linear(24, 64, bias=False)
    assert not TextProjections.compatible(layers)


def test_folded_weights_are_rebuilt_when_a_parameter_changes():
    layers = _layers()
    tp, cond = TextProjections(layers), torch.randn(2, 7, 24)
    w0, _ = tp.weight_bias(torch.float32)
    assert tp.weight_bias(torch.float32)[0] is not w0  # trainable: an optimiser may change them unseen
    for m in layers:
        m.requires_grad_(False)
    w0, _ = tp.weight_bias(torch.float32)
    assert tp.weight_bias(torch.float32)[0] is w0  # cached
    assert tp.weight_bias(torch.bfloat16)[0].dtype == torch.bfloat16  # another dtype: another fold
    layers[1].norm_cond.bias.add_(1.0)  # an in-place change bumps the version
    torch.testing.assert_close(tp(cond)[1], layers[1].kv_cond(layers[1].norm_cond(cond)), rtol=1e-5, atol=1e-5)
    layers[0].kv_cond.weight = nn.Parameter(torch.randn_like(layers[0].kv_cond.weight), requires_grad=False)
    torch.testing.assert_close(tp(cond)[0], layers[0].kv_cond(layers[0].norm_cond(cond)), rtol=1e-5, atol=1e-5)


class _Calls:
    """Counts the calls of every attention layer's norm_cond and of TextProjections."""

    def __init__(self, model, monkeypatch):
        self.norms = 0
        self.batched = 0
        for m in model.modules():
            if isinstance(m, FastSelfAttention) and m.has_cross:
                m.norm_cond.register_forward_hook(self._norm)
        real = TextProjections.__call__

        def counted(tp, cond):
            self.batched += 1
            return real(tp, cond)

        monkeypatch.setattr(TextProjections, "__call__", counted)

    def _norm(self, *args):
        self.norms += 1


def _pair():
    ref = randomize(build_reference("nested_unet", tiny_nested_config())).eval()
    return ref, mdm_fast.optimize(copy.deepcopy(ref))


def test_sampling_projects_the_text_once(monkeypatch):
    ref, fast = _pair()
    calls = _Calls(fast, monkeypatch)
    args = tiny_inputs(2)
    with torch.no_grad():
        want, got = ref(*args), fast(*args)
    assert calls.batched == 1 and calls.norms == 0
    for a, b in zip(want, got):
        assert (a - b).abs().max().item() <= FP32_ATOL["ref"]
    layers = [m for m in fast.modules() if isinstance(m, FastSelfAttention) and m.has_cross]
    assert layers and all("_text_kv" not in m.__dict__ for m in layers)  # nothing left behind


def test_training_projects_per_layer_with_the_same_gradients(monkeypatch):
    ref, fast = _pair()
    calls = _Calls(fast, monkeypatch)
    args = tiny_inputs(2)
    for model in (ref, fast):
        sum(o.square().mean() for o in model(*args)).backward()
    assert calls.batched == 0 and calls.norms > 0
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), n


def test_another_text_inside_the_context_projects_per_layer():
    layers = [FastSelfAttention(c, num_heads=4, cond_dim=24) for c in (32, 32)]
    model = nn.ModuleList(layers)
    cond, other = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    with torch.no_grad(), batched_text_kv(model, FastSelfAttention, cond):
        kv = layers[0].__dict__["_text_kv"][1]
        with batched_text_kv(model, FastSelfAttention, cond):  # a nested use (an inner level) changes nothing
            assert layers[0].__dict__["_text_kv"][1] is kv
        assert text_kv(layers[0], cond) is kv  # still the outer projection after the inner one ends
        torch.testing.assert_close(text_kv(layers[1], other), layers[1].kv_cond(layers[1].norm_cond(other)))
    assert "_text_kv" not in layers[0].__dict__


def test_autocast_error_bounded_by_the_references_own():
    """bf16 autocast on CPU: the folded projection is as close to fp64 as the per-layer one."""
    ref, fast = _pair()
    args = tiny_inputs(2)
    with torch.no_grad():
        exact = [o.double() for o in copy.deepcopy(ref).double()(
            [x.double() for x in args[0]], args[1], args[2].double(), args[3].double())]
        with torch.autocast("cpu", torch.bfloat16):
            ref_bf16, fast_bf16 = ref(*args), fast(*args)
    for e, r, f in zip(exact, ref_bf16, fast_bf16):
        ref_err = (r.double() - e).abs().max().item()
        assert (f.double() - e).abs().max().item() <= 2 * ref_err + 1e-3


def test_same_view_is_the_same_elements():
    """Same base, offset, shape and strides: each alone differing (the others equal) is not the same view."""
    from mdm_fast.models.tensors import same_view

    t = torch.randn(3, 4, 5)
    v = t.view(3, 20).view(3, 4, 5)
    assert same_view(t, t) and same_view(t, t[:3]) and same_view(t[:3], t) and same_view(v, t[:])
    assert not same_view(t, t[:2]) and not same_view(t, t.clone()) and not same_view(t, t[:, :, :4])
    assert not same_view(t, t.transpose(0, 1)) and not same_view(t, t[1:])
    assert not same_view(t[:2], t[1:])  # the offset
    assert not same_view(t[:, :4, :4], t[:, :4, :4].transpose(1, 2))  # the strides
    assert not same_view(t[:, :2], t[:2, :3])  # the shape (same strides, offset and number of elements)


def test_is_sharded_is_a_dtensor(tmp_path):
    """is_sharded: an FSDP2 parameter (a DTensor, on a one-rank gloo mesh here) is, a plain one is not."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from mdm_fast.models.tensors import is_sharded

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        sharded = distribute_tensor(torch.randn(4, 3), init_device_mesh("cpu", (1,)), [Shard(0)])
        assert is_sharded(torch.nn.Parameter(sharded)) and not is_sharded(torch.nn.Parameter(torch.randn(4, 3)))
    finally:
        torch.distributed.destroy_process_group()
