"""Resampling ops vs their reference formulations: sub-pixel upsample-conv, nesting adapters, time
projections, resize. CPU runs Triton under the interpreter on tiny shapes (fp16/fp32 dots only);
GPU tests bound the error by a multiple of PyTorch's own bf16/fp16 error vs an fp64 reference."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdm_fast.ops import BackendUnavailable, nested_inner_input, nested_outer_merge, resize, upsample_conv3x3
from mdm_fast.ops import resample
from mdm_fast.ops.resample import _nested_inner_input, _nested_outer_merge, _upsample_conv3x3
from mdm_fast.ops.time_proj import ParamCache, TimeProjections, expand_batch

CL = torch.channels_last


def _public_upsample_conv(x, w, b):
    """The public up block: nearest 2x in float32 (exact; fp64 stays fp64), back to the dtype, 3x3 conv."""
    up = F.interpolate(x if x.dtype == torch.float64 else x.float(), scale_factor=2).to(x.dtype)
    return F.conv2d(up, w, b, padding=1)


def _rand(*shape, dtype=torch.float32, fmt=torch.contiguous_format, grad=False, device="cpu"):
    t = torch.randn(*shape, device=device).to(dtype)
    if t.dim() == 4:
        t = t.contiguous(memory_format=fmt)
    return t.requires_grad_(grad)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _tol(dtype, scale):
    # fp32: accumulation order; fp16: output rounding plus the rounding of the summed phase weights
    return {torch.float32: 3e-6, torch.float16: 1.5e-3, torch.float64: 1e-12}[dtype] * max(scale, 1.0)


def _backend(monkeypatch, impl):
    """``torch-phases``: the torch backend with its one-forward-conv formulation (``TORCH_FORM``)."""
    if impl == "torch-phases":
        monkeypatch.setattr(resample, "TORCH_FORM", "phases")
        return "torch"
    return impl


# (B, Cin, H, W, Cout): odd H/W, 1x1 input, channels not multiples of 16, Cin > BLOCK_K, Cout > BLOCK_N
SHAPES = [(2, 5, 3, 5, 7), (1, 3, 1, 1, 4), (3, 20, 4, 2, 33)]


@pytest.mark.parametrize("impl", ["ref", "torch", "torch-phases", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("shape", SHAPES)
def test_upsample_conv3x3_forward(monkeypatch, impl, dtype, fmt, shape):
    impl = _backend(monkeypatch, impl)
    B, cin, H, W, cout = shape
    x, w, b = _rand(B, cin, H, W, dtype=dtype, fmt=fmt), _rand(cout, cin, 3, 3, dtype=dtype), _rand(cout, dtype=dtype)
    y = upsample_conv3x3(x, w, b, impl=impl)
    ref = _public_upsample_conv(x.double(), w.double(), b.double())  # same rounded inputs, exact math
    assert y.shape == (B, cout, 2 * H, 2 * W) and y.dtype == dtype
    ambiguous = x.is_contiguous()  # e.g. a 1x1 input is both NCHW and channels_last: output NCHW
    assert y.is_contiguous(memory_format=torch.contiguous_format if ambiguous else fmt)
    assert _max_err(y, ref) <= _tol(dtype, ref.abs().max().item())


@pytest.mark.parametrize("impl", ["torch", "torch-phases", "triton"])
def test_derived_weights_are_kept_until_the_weight_changes(monkeypatch, impl):
    """The sub-pixel weights of a weight that needs no gradient (a sampler's copies) are derived once per
    weight tensor and again after it changes in place; a trained weight's at every call (a fused
    optimiser step leaves its version counter as it was)."""
    impl = _backend(monkeypatch, impl)
    derive = resample.transposed_weight if impl == "torch" and resample.TORCH_FORM != "phases" \
        else resample.phase_weights
    calls = []
    monkeypatch.setattr(resample, derive.__name__, lambda w: calls.append(1) or derive(w))
    x, w, b = _rand(2, 5, 3, 5), _rand(7, 5, 3, 3), _rand(7)
    with torch.no_grad():
        first = upsample_conv3x3(x, w, b, impl=impl)
        assert torch.equal(upsample_conv3x3(x, w, b, impl=impl), first) and len(calls) == 1
        w.mul_(-1.0)  # an in-place change (load_state_dict, an optimiser step)
        assert torch.allclose(upsample_conv3x3(x, w, b, impl=impl), 2 * upsample_conv3x3(x, 0 * w, b, impl=impl)
                              - first, atol=1e-5)
    assert len(calls) == 3  # after the change, and for the new tensor 0 * w
    w = torch.nn.Parameter(w)
    optimizer = torch.optim.AdamW([w], lr=0.1, fused=True)
    outs = []
    for step in range(2):  # forward and backward (the op's own formula), then an update
        outs.append(upsample_conv3x3(x, w, b, impl=impl))
        outs[-1].sum().backward()
        optimizer.step()
    per_step = 2 if derive.__name__ == "transposed_weight" else 1  # the backward derives that one too
    assert len(calls) == 3 + 2 * per_step and not torch.equal(outs[0], outs[1])
    with torch.inference_mode():  # an inference tensor has no version counter: derived at every call
        wi = w.detach().clone()
        for n in (1, 2):
            y = upsample_conv3x3(x, wi, b, impl=impl)
            assert len(calls) == 3 + 2 * per_step + n
    ref = _public_upsample_conv(x.double(), wi.double(), b.double())
    assert _max_err(y, ref) <= _tol(torch.float32, ref.abs().max().item())


def test_the_two_torch_forms_keep_their_own_derived_weights(monkeypatch):
    """One weight, the torch backend's two formulations taking turns: each reads its own derived weight
    (the transposed one, the four phases), not the other's from a shared cache."""
    x, w = _rand(1, 4, 3, 3), _rand(5, 4, 3, 3)
    want = _public_upsample_conv(x, w, None)
    with torch.no_grad():
        for form in ("transposed", "phases", "transposed"):
            monkeypatch.setattr(resample, "TORCH_FORM", form)
            assert _max_err(upsample_conv3x3(x, w, impl="torch"), want) <= _tol(torch.float32, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_derived_weights_sum_the_taps_in_fp32_and_round_once(dtype):
    """The sub-pixel weights of an fp16/bf16 weight are its tap sums rounded once to its dtype (fp32 sums of
    a few fp16/bf16 taps are exact): the fp64 derivation rounded, bit for bit, not sums rounded per axis."""
    w = _rand(16, 16, 3, 3, dtype=dtype)  # (Cout, Cin, 3, 3)
    for derive in (resample.phase_weights, resample.transposed_weight):
        assert torch.equal(derive(w), derive(w.double()).to(dtype))


@pytest.mark.parametrize("impl", ["torch", "torch-phases", "triton"])
def test_upsample_conv3x3_borders_exact_in_fp64_math(monkeypatch, impl):
    """Every border pixel, including corners, equals the upsampled conv (big random weights, no bias)."""
    impl = _backend(monkeypatch, impl)
    x, w = _rand(1, 4, 3, 4), 10 * _rand(6, 4, 3, 3)
    y = upsample_conv3x3(x, w, None, impl=impl)
    ref = _public_upsample_conv(x.double(), w.double(), None)
    for sl in [(..., 0, slice(None)), (..., -1, slice(None)), (..., slice(None), 0), (..., slice(None), -1)]:
        assert _max_err(y[sl], ref[sl]) <= 2e-5 * ref.abs().max().item()


def test_upsample_conv3x3_ref_is_public_code():
    h = torch.float16
    x, w, b = _rand(2, 3, 5, 3, dtype=h), _rand(4, 3, 3, 3, dtype=h), _rand(4, dtype=h)
    assert torch.equal(upsample_conv3x3(x, w, b, impl="ref"), _public_upsample_conv(x, w, b))


@pytest.mark.parametrize("impl", ["ref", "torch", "torch-phases", "triton"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv3x3_backward(monkeypatch, impl, fmt, bias):
    impl = _backend(monkeypatch, impl)
    dtype = torch.float64 if impl != "triton" else torch.float32  # triton: fp16/fp32 dots only
    x = _rand(2, 5, 3, 4, dtype=dtype, fmt=fmt, grad=True)
    w = _rand(6, 5, 3, 3, dtype=dtype, grad=True)
    b = _rand(6, dtype=dtype, grad=True) if bias else None
    params = [p for p in (x, w, b) if p is not None]
    y = upsample_conv3x3(x, w, b, impl=impl)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(_public_upsample_conv(x, w, b), params, g)
    for a, e in zip(got, want):
        assert _max_err(a, e) <= _tol(dtype, e.abs().max().item())


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_upsample_conv3x3_strided_bias(monkeypatch, impl):
    x, w = _rand(1, 4, 3, 5), _rand(6, 4, 3, 3)
    for b in (_rand(12)[::2], torch.tensor([0.5]).expand(6)):  # a strided and an expanded bias
        ref = _public_upsample_conv(x.double(), w.double(), b.double())
        assert _max_err(upsample_conv3x3(x, w, b, impl=impl), ref) <= _tol(torch.float32, ref.abs().max().item())


def test_upsample_conv3x3_weight_grad_only():
    x, w = _rand(1, 3, 2, 3), _rand(4, 3, 3, 3, grad=True)
    (gw,) = torch.autograd.grad(upsample_conv3x3(x, w, None, impl="torch").sum(), [w])
    (ew,) = torch.autograd.grad(_public_upsample_conv(x, w, None).sum(), [w])
    assert _max_err(gw, ew) <= 1e-4


@pytest.mark.parametrize("impl", ["ref", "torch", "torch-phases"])
def test_upsample_conv3x3_opcheck(monkeypatch, impl):
    """Schema, fake tensor (shape and strides vs the real output), autograd registration, AOT."""
    impl = _backend(monkeypatch, impl)
    x, w, b = _rand(2, 5, 3, 4, fmt=CL, grad=True), _rand(6, 5, 3, 3, grad=True), _rand(6, grad=True)
    torch.library.opcheck(_upsample_conv3x3, (x, w, b, impl))


def test_upsample_conv3x3_opcheck_triton_fake():
    x, w = _rand(1, 3, 2, 3, fmt=CL), _rand(4, 3, 3, 3)
    torch.library.opcheck(_upsample_conv3x3, (x, w, None, "triton"), test_utils=("test_schema", "test_faketensor"))


def test_upsample_conv3x3_traces_fullgraph():
    """Dispatch resolves during tracing: one graph, forward and backward through the custom op."""
    x, w, b = _rand(2, 4, 3, 5, fmt=CL, grad=True), _rand(6, 4, 3, 3, grad=True), _rand(6, grad=True)
    fn = torch.compile(lambda x, w, b: upsample_conv3x3(x, w, b, impl="torch"), backend="aot_eager", fullgraph=True)
    y = fn(x, w, b)
    got = torch.autograd.grad(y.square().sum(), (x, w, b))
    want = torch.autograd.grad(_public_upsample_conv(x, w, b).square().sum(), (x, w, b))
    for a, e in zip(got, want):
        assert _max_err(a, e) <= 1e-4 * e.abs().max().item()


def test_upsample_conv3x3_errors():
    x = _rand(1, 3, 4, 4)
    for bad in (_rand(4, 3, 5, 5), _rand(4, 3, 5, 3)):  # not 3x3; not square
        with pytest.raises(ValueError, match=r"\(Cout, Cin, 3, 3\)"):
            upsample_conv3x3(x, bad, None)
    with pytest.raises(ValueError, match="Cin = 3"):
        upsample_conv3x3(x, _rand(4, 2, 3, 3), None)
    with pytest.raises(ValueError, match="dtype"):
        upsample_conv3x3(x, _rand(4, 3, 3, 3, dtype=torch.float16), None)
    with pytest.raises(ValueError, match="bias"):
        upsample_conv3x3(x, _rand(4, 3, 3, 3), _rand(5))
    with pytest.raises(ValueError, match=r"\(B, Cin, H, W\)"):
        upsample_conv3x3(_rand(3, 4, 4), _rand(4, 3, 3, 3), None)
    for empty in (_rand(2, 3, 0, 5), _rand(2, 3, 4, 0)):  # the backends disagreed: an empty result or errors
        with pytest.raises(ValueError, match=r"x must have H, W >= 1"):
            upsample_conv3x3(empty, _rand(4, 3, 3, 3), None, impl="triton")
    with pytest.raises(BackendUnavailable, match="float64"):
        upsample_conv3x3(x.double(), _rand(4, 3, 3, 3, dtype=torch.float64), None, impl="triton")


# ---- nesting adapters ------------------------------------------------------------------------


def _public_inner_input(x_low, wi, bi, feat, wa, ba):
    x = F.conv2d(x_low, wi, bi, padding=wi.shape[-1] // 2)
    if feat is None:
        return x
    a = F.conv2d(feat, wa, ba, padding=wa.shape[-1] // 2)
    bl, bh = x_low.shape[0], feat.shape[0]
    if bh < bl:
        a = torch.cat([a, a.new_zeros(bl - bh, *a.shape[1:])], 0)
    return x + a


def _public_outer_merge(x, inner, wa, ba):
    a = F.conv2d(inner, wa, ba, padding=wa.shape[-1] // 2)
    return x + a[: x.shape[0]] if x.shape[0] < inner.shape[0] else x + a


# (bh, bl): mixed batch (bh < bl), plain (bh == bl)
BATCHES = [(2, 5), (3, 3)]


@pytest.mark.parametrize("impl", ["ref", "torch"])
@pytest.mark.parametrize("batches", BATCHES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("with_feat", [True, False])
@pytest.mark.parametrize("conv_in_bias", [True, False])
def test_nested_inner_input(impl, batches, fmt, with_feat, conv_in_bias):
    """Forward and every gradient vs the public code; conv_in 5x5 (odd kernels besides the public 3x3 get
    'same' padding) with or without its bias, the adapter's bias either way."""
    bh, bl = batches
    d = torch.float64
    x_low = _rand(bl, 3, 5, 3, dtype=d, grad=True)
    wi = _rand(7, 3, 5, 5, dtype=d, grad=True)  # (C, Cx, 5, 5)
    bi = _rand(7, dtype=d, grad=True) if conv_in_bias else None
    feat = _rand(bh, 6, 5, 3, dtype=d, fmt=fmt, grad=True) if with_feat else None
    wa = _rand(7, 6, 3, 3, dtype=d, grad=True) if with_feat else None
    ba = _rand(7, dtype=d, grad=True) if with_feat else None
    y = nested_inner_input(x_low, wi, bi, feat, wa, ba, impl=impl)
    ref = _public_inner_input(x_low, wi, bi, feat, wa, ba)
    assert y.shape == ref.shape and _max_err(y, ref) <= 1e-12 * ref.abs().max().item()
    assert y.is_contiguous(memory_format=fmt if with_feat else torch.contiguous_format)
    params = [p for p in (x_low, wi, bi, feat, wa, ba) if p is not None]
    g = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        assert _max_err(a, e) <= 1e-12 * max(e.abs().max().item(), 1.0)


@pytest.mark.parametrize("impl", ["ref", "torch"])
@pytest.mark.parametrize("batches", BATCHES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("k", [3, 1])  # the public 3x3 adapter; another odd kernel ('same' padding k // 2)
def test_nested_outer_merge(impl, batches, fmt, k):
    bh, bl = batches
    d = torch.float64
    x = _rand(bh, 6, 4, 3, dtype=d, fmt=fmt, grad=True)
    inner = _rand(bl, 5, 4, 3, dtype=d, fmt=fmt, grad=True)
    wa, ba = _rand(6, 5, k, k, dtype=d, grad=True), _rand(6, dtype=d, grad=True)
    y = nested_outer_merge(x, inner, wa, ba, impl=impl)
    ref = _public_outer_merge(x, inner, wa, ba)
    assert y.shape == ref.shape and _max_err(y, ref) <= 1e-12 * ref.abs().max().item()
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(y, (x, inner, wa, ba), g), torch.autograd.grad(ref, (x, inner, wa, ba), g)):
        assert _max_err(a, e) <= 1e-12 * max(e.abs().max().item(), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adapters_low_precision(dtype):
    x_low, wi, bi = _rand(4, 3, 4, 4, dtype=dtype), _rand(8, 3, 3, 3, dtype=dtype), _rand(8, dtype=dtype)
    feat, wa, ba = _rand(2, 8, 4, 4, dtype=dtype, fmt=CL), _rand(8, 8, 3, 3, dtype=dtype), _rand(8, dtype=dtype)
    want = _public_inner_input(x_low, wi, bi, feat, wa, ba)
    got = nested_inner_input(x_low, wi, bi, feat, wa, ba, impl="torch")
    assert _max_err(got, want) <= 2 * _tol(dtype, want.abs().max().item())
    want = _public_outer_merge(feat, x_low, wi, bi)  # x (2, 8), inner_out (4, 3), adapter 3 -> 8
    got = nested_outer_merge(feat, x_low, wi, bi, impl="torch")
    assert _max_err(got, want) <= 2 * _tol(dtype, want.abs().max().item())


def test_adapters_opcheck():
    xl, wi, bi = _rand(3, 3, 4, 5, grad=True), _rand(6, 3, 3, 3, grad=True), _rand(6, grad=True)
    f, wa, ba = _rand(2, 4, 4, 5, fmt=CL, grad=True), _rand(6, 4, 3, 3, grad=True), _rand(6, grad=True)
    torch.library.opcheck(_nested_inner_input, (xl, wi, bi, f, wa, ba, "torch"))
    x, inner = _rand(2, 6, 4, 5, grad=True), _rand(3, 4, 4, 5, grad=True)
    torch.library.opcheck(_nested_outer_merge, (x, inner, wa, ba, "torch"))


def test_adapters_errors():
    xl, wi = _rand(2, 3, 4, 4), _rand(6, 3, 3, 3)
    with pytest.raises(ValueError, match="bh <= 2"):
        nested_inner_input(xl, wi, None, _rand(3, 4, 4, 4), _rand(6, 4, 3, 3), None)
    with pytest.raises(ValueError, match="adapter_w"):
        nested_inner_input(xl, wi, None, None, _rand(6, 4, 3, 3), None)
    with pytest.raises(ValueError, match="output channels"):
        nested_inner_input(xl, wi, None, _rand(2, 4, 4, 4), _rand(5, 4, 3, 3), None)
    with pytest.raises(ValueError, match="bl >= 2"):
        nested_outer_merge(_rand(2, 6, 4, 4), _rand(1, 4, 4, 4), _rand(6, 4, 3, 3), None)
    with pytest.raises(ValueError, match="odd k"):
        nested_outer_merge(_rand(2, 6, 4, 4), _rand(2, 4, 4, 4), _rand(6, 4, 2, 2), None)
    with pytest.raises(ValueError, match="6 output channels like x"):
        nested_outer_merge(_rand(2, 6, 4, 4), _rand(2, 4, 4, 4), _rand(5, 4, 3, 3), None)


# ---- time projections ------------------------------------------------------------------------


def _layers(dim=16, channels=(3, 5, 8), dtype=torch.float32):
    return [nn.Linear(dim, 2 * c).to(dtype) for c in channels]


def _public_proj(layer, temb, batch):
    ta, tb = layer(F.silu(temb)).chunk(2, dim=1)
    n = batch // temb.shape[0]  # einops.repeat(t, "b c -> (b n) c", n=n)
    return [t.unsqueeze(1).expand(-1, n, -1).reshape(-1, t.shape[1]) for t in (ta, tb)]


@pytest.mark.parametrize("batch", [4, 12])
def test_time_projections_forward_and_grads(batch):
    layers = _layers()
    temb = torch.randn(4, 16, requires_grad=True)
    proj = TimeProjections(layers)
    got = proj(temb, batch=batch)
    want = [_public_proj(layer, temb, batch) for layer in layers]
    params = [temb] + [p for layer in layers for p in layer.parameters()]
    gs = [torch.randn_like(t) for pair in want for t in pair]
    flat_got = [t for pair in got for t in pair]
    flat_want = [t for pair in want for t in pair]
    for a, e in zip(flat_got, flat_want):
        assert a.shape == e.shape and _max_err(a, e) <= 1e-5
    ga = torch.autograd.grad(flat_got, params, gs)
    ge = torch.autograd.grad(flat_want, params, gs)
    for a, e in zip(ga, ge):
        assert _max_err(a, e) <= 1e-5


def test_time_projections_cache_follows_parameters():
    layers = _layers()
    proj = TimeProjections(layers)
    temb = torch.randn(2, 16)
    with torch.no_grad():
        w_first, _ = proj.weight_bias()
        assert proj.weight_bias()[0] is not w_first  # trainable: an optimiser may change them unseen
        for layer in layers:
            layer.requires_grad_(False)
        layers[0].weight.requires_grad_(True)
        assert proj.weight_bias()[0] is not proj.weight_bias()[0]  # one trainable parameter is enough
        layers[0].weight.requires_grad_(False)
        proj(temb)
        w_first, _ = proj.weight_bias()
        assert proj.weight_bias()[0] is w_first  # cached while nothing changes
        layers[1].weight.add_(1.0)  # in place (load_state_dict)
        assert _max_err(proj(temb)[1][0], _public_proj(layers[1], temb, 2)[0]) <= 1e-5
        layers[0].weight.data = torch.randn_like(layers[0].weight)  # new storage, the version counter as it was
        assert _max_err(proj(temb)[0][0], _public_proj(layers[0], temb, 2)[0]) <= 1e-5
        layers[2].bias = nn.Parameter(torch.randn(16), requires_grad=False)  # a new Parameter object
        assert _max_err(proj(temb)[2][1], _public_proj(layers[2], temb, 2)[1]) <= 1e-5


def test_param_cache_keeps_a_value_per_parameter_set_while_it_lives():
    """Two sets of frozen parameters (two samplers' cast copies of one model) take turns: each keeps its own
    value (a CUDA graph captured with one finds it alive after the other ran); a change of one set
    rebuilds its value only; the value of a set that died is dropped; a slot without a parameter is one."""
    import gc
    import weakref

    cache, builds = ParamCache(), []

    def build(params):
        return lambda: builds.append(1) or torch.cat([p for p in params if p is not None])

    a, b = [torch.randn(3), None], [torch.randn(3), None]
    va, vb = cache.get(a, build(a)), cache.get(b, build(b))
    assert cache.get(a, build(a)) is va and cache.get(b, build(b)) is vb and len(builds) == 2
    b[0].add_(1.0)  # in place: b's value is rebuilt, a's kept
    vb = cache.get(b, build(b))
    assert torch.equal(vb, b[0]) and cache.get(a, build(a)) is va and len(builds) == 3
    other = cache.get(a, build(a), extra="other")  # another extra key: another value, both kept
    assert other is not va and cache.get(a, build(a)) is va and cache.get(a, build(a), extra="other") is other
    gone = weakref.ref(vb)
    del b, vb
    gc.collect()
    cache.get(a, build(a))  # b's parameters died: its value goes
    assert gone() is None


def test_time_projections_state_dict_unchanged():
    model = nn.ModuleList(_layers())
    keys = list(model.state_dict())
    model.proj = TimeProjections(list(model))  # a plain attribute, not a submodule
    assert list(model.state_dict()) == keys


def test_time_projections_errors():
    with pytest.raises(ValueError, match="in_features"):
        TimeProjections([nn.Linear(16, 4), nn.Linear(8, 4)])
    for layer in (nn.Linear(16, 4, bias=False), nn.Linear(16, 5)):  # no bias; no (scale, shift) halves
        with pytest.raises(ValueError, match=r"nn.Linear\(temb_dim, 2 \* C\) with bias"):
            TimeProjections([layer])
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        TimeProjections(_layers())(torch.randn(2, 8))
    with pytest.raises(ValueError, match="multiple"):
        expand_batch(torch.randn(2, 3), 5)


# ---- resize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("ratio", [2, 4, 16])
def test_resize_keeps_dtype(mode, ratio):
    x = _rand(2, 3, 3, 5).clamp(-1, 1)
    align = {} if mode == "nearest" else {"align_corners": False}
    want = F.interpolate(x.double(), scale_factor=ratio, mode=mode, **align)
    got = resize(x.bfloat16(), scale_factor=ratio, mode=mode)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert _max_err(got, want) <= 2e-2  # bf16 input and output rounding of values in [-1.5, 1.5]
    assert _max_err(resize(x, scale_factor=ratio, mode=mode), want) <= 1e-5


def test_resize_antialias_and_errors():
    x = _rand(1, 2, 16, 16)
    want = F.interpolate(x, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    got = resize(x.half(), size=(4, 4), mode="bicubic", antialias=True)
    assert got.dtype == torch.float16 and _max_err(got, want) <= 1e-2
    assert _max_err(resize(x, size=(4, 4), mode="bicubic", antialias=True), want) <= 1e-6  # fp32: no round trip
    with pytest.raises(ValueError, match="exactly one"):
        resize(x)
    with pytest.raises(ValueError, match="antialias"):
        resize(x, scale_factor=2, mode="nearest", antialias=True)
    with pytest.raises(ValueError, match="mode"):
        resize(x, scale_factor=2, mode="lanczos")


# ---- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "torch-phases", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("shape", [(4, 64, 16, 16, 64), (2, 96, 9, 7, 80), (2, 32, 33, 31, 32)])
def test_upsample_conv3x3_gpu(monkeypatch, impl, dtype, fmt, shape):
    impl = _backend(monkeypatch, impl)
    B, cin, H, W, cout = shape
    x = _rand(B, cin, H, W, dtype=dtype, fmt=fmt, grad=True, device="cuda")
    w = (_rand(cout, cin, 3, 3, device="cuda") / (3 * cin**0.5)).to(dtype).requires_grad_()
    b = _rand(cout, dtype=dtype, grad=True, device="cuda")
    y = upsample_conv3x3(x, w, b, impl=impl)
    y_lp = _public_upsample_conv(x, w, b)  # PyTorch's own low-precision result
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = _public_upsample_conv(x64, w64, b64)
    assert y.is_contiguous(memory_format=fmt)
    assert _max_err(y, y64) <= 3 * _max_err(y_lp, y64) + 1e-3
    g = torch.randn_like(y)
    got, lp = torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_lp, (x, w, b), g)
    exact = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    for a, l, e in zip(got, lp, exact):
        assert _max_err(a, e) <= 3 * _max_err(l, e) + 1e-3 * e.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_upsample_conv3x3_fp32_gpu(fmt):
    """fp32 on a GPU: the triton kernel's dots are ieee (tf32 would be ~1e-4 of the output off) and its
    forward is as close to fp64 as the CPU tests ask. (Its backward is cuDNN's, tf32 by PyTorch's default.)"""
    B, cin, H, W, cout = 2, 96, 9, 7, 80
    x = _rand(B, cin, H, W, fmt=fmt, device="cuda")
    w = _rand(cout, cin, 3, 3, device="cuda") / (3 * cin**0.5)
    b = _rand(cout, device="cuda")
    y64 = _public_upsample_conv(x.double(), w.double(), b.double())
    assert _max_err(upsample_conv3x3(x, w, b, impl="triton"), y64) <= _tol(torch.float32, y64.abs().max().item())


def test_upsample_conv3x3_autotunes_fp32_on_its_own_tile():
    """The GPU's autotune space (the interpreter has one tile of its own): fp32 inputs get the fp32 tile
    alone (exact dots: a correctness path, one compile), 16-bit ones never get it, and their tiles much
    wider than the layer are dropped."""
    from mdm_fast.kernels import upsample_conv as kern

    configs = [kern._config(s) for s in (*kern._HOPPER, kern._FP32)]

    def tiles(dtype, cout):
        kept = kern._prune(configs, {"X": torch.empty(0, dtype=dtype), "COUT": cout})
        return [(*(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), c.num_warps, c.num_stages) for c in kept]

    assert tiles(torch.float32, 80) == tiles(torch.float32, 768) == [kern._FP32]
    assert tiles(torch.bfloat16, 768) == tiles(torch.float16, 80) == kern._HOPPER
    assert tiles(torch.bfloat16, 32) == [(128, 32, 32, 4, 4)]


@pytest.mark.gpu
def test_upsample_conv3x3_compiles_gpu():
    x = _rand(2, 32, 8, 8, dtype=torch.bfloat16, fmt=CL, device="cuda")
    w, b = _rand(32, 32, 3, 3, dtype=torch.bfloat16, device="cuda"), _rand(32, dtype=torch.bfloat16, device="cuda")
    for impl in ["torch", "triton"]:  # the custom op itself: fake tensor strides must match the real ones
        fn = torch.compile(lambda x, w, b: torch.ops.mdm_fast.upsample_conv3x3(x, w, b, impl), fullgraph=True)
        assert torch.equal(fn(x, w, b), upsample_conv3x3(x, w, b, impl=impl))


@pytest.mark.gpu
def test_resize_bf16_gpu_no_upcast():
    x = _rand(4, 3, 64, 64, dtype=torch.bfloat16, device="cuda")
    y = resize(x, scale_factor=4, mode="bicubic")
    assert y.dtype == torch.bfloat16
    want = F.interpolate(x.float(), scale_factor=4, mode="bicubic", align_corners=False)
    assert _max_err(y, want) <= 2 ** -7 * want.abs().max().item() + 1e-3
