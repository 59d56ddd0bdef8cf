"""group_norm_act: the Triton kernels (interpreted on CPU) and the CUDA kernels (GPU) against the public formulation.

CPU tests compare the triton backend with an fp64 evaluation of the reference on the same inputs, forward and
every gradient. GPU tests bound each backend's error by twice PyTorch's own error in the input precision
(the reference run in that precision vs fp64), plus a small atol, as flash-attention's tests do.
"""
import concurrent.futures
import dataclasses
import functools
import math
from typing import List

import pytest
import torch
import triton

from mdm_fast.kernels import group_norm as kern
from mdm_fast import _ext
from mdm_fast.ops import BackendUnavailable, dispatch, group_norm_act, use_impl
from mdm_fast.ops.group_norm_act import _backward_impl, reference
from norm_paths import force_whole_rows, small_tiles
from test_fast_model import OpCounts

OP = "group_norm_act"
# Per dtype: (forward, backward) tolerance, relative to max(1, max |reference|).
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}


def _inputs(shape, G, dtype, channels_last=False, scale_shift=True, affine=True, device="cpu"):
    B, C = shape[:2]
    x = torch.randn(shape, device=device) * 1.5 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    w = torch.randn(C, device=device) if affine else None
    b = torch.randn(C, device=device) if affine else None
    sc = 0.5 * torch.randn(B, C, device=device) if scale_shift else None
    sh = torch.randn(B, C, device=device) if scale_shift else None
    return [None if t is None else t.to(dtype) for t in (x, w, b, sc, sh)]  # all in the input precision


def _with_input_bias(inputs):
    """The inputs and a (C,) input bias (the bias of the convolution that wrote x), as fp32 as the model's."""
    x = inputs[0]
    return [*inputs, 2.0 * torch.randn(x.shape[1], device=x.device)]


def _run(inputs, G, act, impl, dy, dtype=None, eps=1e-5) -> List[torch.Tensor]:
    """Output and the gradients of (x, weight, bias, scale, shift[, input_bias]) that exist; dtype casts
    everything first."""
    leaves = [None if t is None else (t.detach().to(dtype) if dtype else t.detach()).requires_grad_()
              for t in inputs]
    x, w, b, sc, sh, xb = (leaves + [None])[:6]
    if impl == "public":
        if xb is not None:  # the public code: the convolution's output with its bias, in x's precision
            x = x + xb.to(x.dtype).reshape(-1, *[1] * (x.dim() - 2))
        y = reference(x, G, w, b, eps, sc, sh, act)
    else:
        y = group_norm_act(x, G, w, b, eps, sc, sh, act=act, impl=impl, input_bias=xb)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype))
    return [y.detach(), *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ref_custom_op_autograd_matches_the_public_formula(dtype):
    """group_norm_act(impl="ref") runs PyTorch's own autograd outside torch.compile; this covers the
    custom op's registered backward formula, which torch.compile runs."""
    inputs = _inputs((2, 12, 5, 7), 4, dtype)
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = torch.ops.mdm_fast.group_norm_act_fwd(*leaves, 4, 1e-5, "silu", "ref")[0]
    dy = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, leaves, dy)]
    want = _run(inputs, 4, "silu", "public", dy, dtype=torch.float64)
    tol_f, tol_b = TOL[dtype]
    for i, (g, r) in enumerate(zip(got, want)):
        assert _max_err(g, r) <= (tol_f if i == 0 else tol_b) * max(1.0, r.abs().max().item()), i


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


def _check_against_fp64(inputs, G, act, impl, eps=1e-5):
    x = inputs[0]
    dy = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    got = _run(inputs, G, act, impl, dy, eps=eps)
    want = _run(inputs, G, act, "public", dy, dtype=torch.float64, eps=eps)
    tol_f, tol_b = TOL[x.dtype]
    names = ["y", "dx"] + [n for n, t in zip(["dweight", "dbias", "dscale", "dshift", "dinput_bias"], inputs[1:])
                           if t is not None]
    for name, g, r in zip(names, got, want):
        tol = tol_f if name == "y" else tol_b
        scale = max(1.0, r.abs().max().item())
        assert g.shape == r.shape, name
        assert _max_err(g, r) <= tol * scale, f"{name}: err {_max_err(g, r):.3g} > {tol * scale:.3g}"
    assert got[0].stride() == x.stride() and got[1].stride() == x.stride(), "output must keep x's memory format"


def _plan(shape, G, channels_last, **kw):
    """The kernels' plan for an input of this shape (5-D video: its frames in the batch)."""
    B, C, *space = shape
    frames = space[0] if len(space) == 3 else 1
    return kern.plan(B * frames, C, math.prod(space[-2:]), G, channels_last, **kw)


# shape, groups, dtype, channels_last, scale_shift, affine, act
CASES = [
    ((2, 8, 5, 7), 4, torch.float32, False, True, True, "silu"),
    ((2, 8, 5, 7), 4, torch.float32, True, True, True, "silu"),
    ((1, 6, 9, 11), 3, torch.float32, False, False, True, None),  # batch 1, odd H and W
    ((2, 48, 3, 5), 16, torch.float32, True, True, True, "silu"),  # C not a multiple of 32
    ((2, 6, 4, 3), 6, torch.float32, False, True, False, "silu"),  # one channel per group, affine off
    ((2, 12, 5, 3), 1, torch.float32, True, False, True, "silu"),  # one group
    ((2, 8, 6, 6), 4, torch.float16, False, True, True, "silu"),
    ((2, 8, 6, 6), 4, torch.float16, True, True, True, None),
    ((2, 8, 6, 6), 2, torch.bfloat16, False, True, True, "silu"),
    ((2, 8, 6, 6), 2, torch.bfloat16, True, False, True, "silu"),
    ((2, 8, 3, 4, 5), 4, torch.float32, False, True, True, "silu"),  # 5-D (B, C, T, H, W)
    ((2, 8, 3, 4, 5), 2, torch.float32, True, True, True, "silu"),  # channels_last_3d
]


@pytest.mark.parametrize("shape,G,dtype,cl,ss,affine,act", CASES)
def test_triton_fused_matches_reference(shape, G, dtype, cl, ss, affine, act):
    assert _plan(shape, G, cl).single
    _check_against_fp64(_inputs(shape, G, dtype, cl, ss, affine), G, act, "triton")


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("cl", [False, True])
def test_video_input_is_normalised_per_frame(impl, cl):
    """5-D input as the public model runs video: each frame normalised on its own (not over T, H and W
    together, as F.group_norm would), with its sample's scale and shift; gradients and layout alike."""
    x, w, b, sc, sh = [t.double().requires_grad_() for t in _inputs((2, 8, 3, 5, 4), 4, torch.float32, cl)]
    per_frame = torch.stack([torch.nn.functional.silu(torch.nn.functional.group_norm(x[:, :, t], 4, w, b)
                                                      * (1 + sc[:, :, None, None]) + sh[:, :, None, None])
                             for t in range(3)], dim=2)  # (B, C, T, H, W)
    got = group_norm_act(x.float(), 4, w.float(), b.float(), scale=sc.float(), shift=sh.float(), impl=impl)
    assert got.stride() == x.stride(), "output must keep x's memory format"
    torch.testing.assert_close(got.double(), per_frame, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(per_frame)
    for g, r in zip(torch.autograd.grad(got, (x, w, b, sc, sh), dy.float()),
                    torch.autograd.grad(per_frame, (x, w, b, sc, sh), dy)):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 8, 3, 5), (2, 8, 2, 3, 5)])
def test_ref_channels_last_input_without_gradient(shape):
    """A frozen producer before a trained norm, channels_last, on the CPU: PyTorch's own group-norm
    backward crashes the process there (SIGSEGV); the ref backend must give the weights' gradients."""
    x, w, b, _, _ = _inputs(shape, 4, torch.float32, channels_last=True, scale_shift=False)
    w, b = w.requires_grad_(), b.requires_grad_()
    want = torch.autograd.grad(reference(x.contiguous(), 4, w, b).sum(), (w, b))
    for x_grad in (False, True):  # x frozen, or x's gradient not asked for
        got = torch.autograd.grad(group_norm_act(x.requires_grad_(x_grad), 4, w, b, impl="ref").sum(), (w, b))
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r)


def _force_split(monkeypatch) -> None:
    """The split reduction on small tensors: several parts per group, several tiles per part."""
    small_tiles(monkeypatch, 32)
    monkeypatch.setattr(kern, "FUSED_MIN_PROGRAMS_PER_SM", 10**6)
    monkeypatch.setattr(kern, "SPLIT_MIN_ELEMENTS", 0)
    monkeypatch.setattr(kern, "MAX_SPLIT", 4)


@pytest.fixture
def split_path(monkeypatch):
    _force_split(monkeypatch)


SPLIT_CASES = [
    ((2, 8, 9, 13), 4, torch.float32, False, True, True, "silu"),
    ((2, 8, 9, 13), 4, torch.float32, True, True, True, "silu"),
    ((1, 6, 7, 5), 6, torch.float32, False, False, False, None),
    ((2, 48, 3, 5), 16, torch.float32, True, True, True, "silu"),
    ((2, 4, 8, 8), 2, torch.float16, True, True, True, "silu"),
    ((1, 40, 5, 7), 2, torch.float32, True, True, True, "silu"),  # 20 channels per group: over 16 finalize lanes
]


@pytest.mark.parametrize("shape,G,dtype,cl,ss,affine,act", SPLIT_CASES)
def test_triton_split_matches_reference(split_path, shape, G, dtype, cl, ss, affine, act):
    p = _plan(shape, G, cl)
    assert not p.fused and p.nsplit > 1
    _check_against_fp64(_inputs(shape, G, dtype, cl, ss, affine), G, act, "triton")


def test_split_plan_loops_over_tiles(split_path):
    p = kern.plan(2, 8, 9 * 13, 4, False)
    assert p.nsplit == 4 and p.rows == 2 * p.block_s and p.nsplit == -(-117 // p.rows)


@pytest.fixture
def whole_rows(monkeypatch):
    force_whole_rows(monkeypatch, 64, 5)  # several tiles per part


WHOLE_ROWS_CASES = [
    ((2, 8, 9, 13), 4, torch.float32, True, True, True, "silu"),
    ((2, 48, 3, 5), 16, torch.float32, True, True, True, "silu"),  # 3 channels per group, C not a power of 2
    ((1, 24, 7, 5), 4, torch.float32, True, False, False, None),  # 6 channels per group (the model's 192 / 32)
    ((2, 6, 7, 5), 6, torch.float32, True, True, False, "silu"),  # one channel per group
    ((2, 12, 5, 7), 1, torch.float32, True, True, True, "silu"),  # one group
    ((2, 4, 8, 8), 2, torch.float16, True, True, True, "silu"),
    ((2, 8, 6, 6), 2, torch.bfloat16, True, True, True, "silu"),
    ((2, 8, 3, 4, 5), 2, torch.float32, True, True, True, "silu"),  # channels_last_3d
]


@pytest.mark.parametrize("shape,G,dtype,cl,ss,affine,act", WHOLE_ROWS_CASES)
def test_triton_whole_rows_split_matches_reference(whole_rows, shape, G, dtype, cl, ss, affine, act):
    for backward in (False, True):
        p = _plan(shape, G, cl, backward=backward)
        assert p.gpb == G and p.block_c == triton.next_power_of_2(shape[1]) and p.nsplit > 1
    _check_against_fp64(_inputs(shape, G, dtype, cl, ss, affine), G, act, "triton")


def test_finalize_loops_over_the_parts(whole_rows, monkeypatch):
    """A finalize program merging its parts a few at a time (the mean first, then M2 around it)."""
    monkeypatch.setattr(kern, "FINALIZE_TILE", 2)  # fewer than a finalize program's lanes: one part per step
    inputs = _inputs((2, 8, 9, 13), 4, torch.float32)
    inputs[0] = (inputs[0] + 300.0).to(memory_format=torch.channels_last)  # offset data: M2 needs Chan's merge
    assert kern.plan(2, 8, 117, 4, True).nsplit == 5
    _check_against_fp64(inputs, 4, "silu", "triton")


INPUT_BIAS_CASES = [
    ((2, 8, 5, 7), 4, torch.float32, False, True, True, "silu"),
    ((2, 48, 3, 5), 16, torch.float32, True, True, True, "silu"),  # C not a multiple of 32
    ((2, 6, 9, 7), 6, torch.float32, True, False, False, None),  # one channel per group, nothing else
    ((2, 8, 6, 6), 2, torch.float16, True, True, True, "silu"),
    ((2, 8, 3, 4, 5), 4, torch.float32, False, True, True, "silu"),  # 5-D
]


def _path(name, monkeypatch):
    """Force one of the triton paths on small tensors: "single" (the default here), "looping" (the fused
    path over several tiles), "split" or "whole_rows"."""
    if name == "looping":
        small_tiles(monkeypatch, 32)
    elif name == "split":
        _force_split(monkeypatch)
    elif name == "whole_rows":
        force_whole_rows(monkeypatch, 64, 5)  # several tiles per part


@pytest.mark.parametrize("path", ["single", "looping", "split", "whole_rows"])
@pytest.mark.parametrize("shape,G,dtype,cl,ss,affine,act", INPUT_BIAS_CASES)
def test_triton_input_bias_matches_reference(monkeypatch, path, shape, G, dtype, cl, ss, affine, act):
    """group_norm(x + input_bias[c]) on every path, forward and every gradient (dinput_bias: dx summed)."""
    if path == "whole_rows" and not cl:
        pytest.skip("whole rows are a channels_last path")
    _path(path, monkeypatch)
    p = _plan(shape, G, cl)
    assert {"single": p.single, "looping": p.fused and not p.single, "split": p.nsplit > 1,
            "whole_rows": p.nsplit > 1 and p.block_c == triton.next_power_of_2(shape[1])}[path], p
    _check_against_fp64(_with_input_bias(_inputs(shape, G, dtype, cl, ss, affine)), G, act, "triton")


@pytest.mark.parametrize("path,cl", [("looping", True), ("looping", False), ("split", True), ("split", False),
                                     ("whole_rows", True)])
@pytest.mark.parametrize("lanes", [(1, 1), (2, 1), (2, 2), None])  # None: the tile layout's (row_lanes)
def test_triton_lane_accumulators(monkeypatch, path, cl, lanes):
    """The reductions over rows in lanes (LANE_ACCUMULATORS): one lane (the per-tile sum), two lanes of
    several rows per tile each, two lanes of two consecutive rows (NCHW's vectors) and the layout's own,
    on every looping path and layout, forward and every gradient (with an input bias: every sum of the
    backward); offset data checks each lane's shift and their merge."""
    _path(path, monkeypatch)
    if lanes is not None:
        monkeypatch.setattr(kern, "row_lanes", lambda block_s, *a: (min(block_s, lanes[0]), lanes[1]))
    shape, G = (2, 8, 9, 15), 4  # 135 rows: last parts whose last lanes hold fewer rows
    p = _plan(shape, G, cl)
    assert p.rows > p.block_s and (lanes is None or (p.acc_rows, p.vec_rows) == lanes), p
    inputs = _inputs(shape, G, torch.float32, channels_last=cl)
    inputs[0] = inputs[0] + 300.0
    _check_against_fp64(_with_input_bias(inputs), G, "silu", "triton")


@pytest.mark.parametrize("path", ["single", "looping", "split", "whole_rows"])
def test_triton_scale_shift_as_column_slices(monkeypatch, path):
    """scale and shift as the fast ResNet passes them: column slices of the batched time projection
    (B, 3C), rows 3C apart; forward and every gradient (dscale, dshift in the slices' shape)."""
    _path(path, monkeypatch)
    shape, G, C = (2, 8, 9, 13), 4, 8
    x, w, b, _, _ = _inputs(shape, G, torch.float32, channels_last=True)
    proj = torch.randn(2, 3 * C)  # (B, 3C)
    proj[:, C:2 * C] *= 0.5
    scale, shift = proj[:, C:2 * C], proj[:, 2 * C:]  # (B, C) each, strides (3C, 1)
    assert not scale.is_contiguous() and not shift.is_contiguous()
    _check_against_fp64([x, w, b, scale, shift], G, "silu", "triton")


@pytest.mark.parametrize("path", ["single", "looping", "split", "whole_rows"])
def test_eps_of_low_variance_groups(monkeypatch, path):
    """rstd = 1 / sqrt(var + eps) on every path, with the eps of the call: groups whose variance (~6e-5)
    is of the order of eps (1e-4, not the default), where dropping eps or using another one changes y and
    every gradient by tens of percent. (The other tests' inputs have variance ~2: eps there is 5e-6 of it.)"""
    _path(path, monkeypatch)
    shape, G = (2, 8, 9, 13), 4
    p = _plan(shape, G, True)
    assert {"single": p.single, "looping": p.fused and not p.single, "split": p.nsplit > 1,
            "whole_rows": p.nsplit > 1 and p.block_c == triton.next_power_of_2(shape[1])}[path], p
    inputs = _inputs(shape, G, torch.float32, channels_last=True)
    inputs[0] = (inputs[0] * 5e-3).contiguous(memory_format=torch.channels_last)  # std 7.5e-3
    _check_against_fp64(inputs, G, "silu", "triton", eps=1e-4)


def test_input_bias_with_a_producers_moments(small_norm_parts):
    """The moments a producer hands over are those of x; the input bias is added to them when merged."""
    from mdm_fast.ops import concat_channels_for_norm

    a = torch.randn(2, 4, 9, 13).to(memory_format=torch.channels_last)
    b = torch.randn(2, 4, 9, 13).to(memory_format=torch.channels_last) + 3.0
    x, moments = concat_channels_for_norm(a, b, 4, impl="triton")
    assert moments is not None
    xb = 5.0 * torch.randn(8)
    y = group_norm_act(x, 4, None, None, impl="triton", moments=moments, input_bias=xb)
    want = reference(x.double() + xb.double()[:, None, None], 4, None, None)
    assert _max_err(y, want) <= 2e-5 * want.abs().max().item()


def test_ref_backend_input_bias_gradients():
    """The ref backend with an input bias: PyTorch's autograd outside compile, and the custom op's formula."""
    inputs = _with_input_bias(_inputs((2, 12, 5, 7), 4, torch.float32, channels_last=True))
    _check_against_fp64(inputs, 4, "silu", "ref")
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = torch.ops.mdm_fast.group_norm_act_fwd(*leaves[:5], 4, 1e-5, "silu", "ref", None, leaves[5])[0]
    dy = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, leaves, dy)]
    want = _run(inputs, 4, "silu", "public", dy, dtype=torch.float64)
    for i, (g, r) in enumerate(zip(got, want)):
        assert _max_err(g, r) <= 1e-4 * max(1.0, r.abs().max().item()), i


@pytest.mark.parametrize("path", ["single", "looping", "split"])
@pytest.mark.parametrize("ss_dtype", [torch.float32, torch.bfloat16])  # bf16: a projection under autocast
@pytest.mark.parametrize("with_input_bias", [False, True])
def test_triton_backward_writes_the_parameter_gradients_terms(monkeypatch, path, ss_dtype, with_input_bias):
    """Besides its kernels, the triton backward runs one torch op: the sum over the batch of the
    per-sample terms the kernels wrote (dweight, dbias, and dinput_bias: no pass over dx), not the
    per-(sample, channel) arithmetic; it writes dscale and dshift in their parameters' dtype (no casts
    after)."""
    _path(path, monkeypatch)
    inputs = _inputs((2, 8, 9, 13), 4, torch.float32, channels_last=True)
    x, w, b, sc, sh, xb = _with_input_bias(inputs) if with_input_bias else [*inputs, None]
    sc, sh = sc.to(ss_dtype), sh.to(ss_dtype)
    y, mean, rstd = torch.ops.mdm_fast.group_norm_act_fwd(x, w, b, sc, sh, 4, 1e-5, "silu", "triton", None, xb)
    dy = torch.randn_like(y)
    launches = kern.backward

    def uncounted(*args):  # the launches (and the interpreter's copies around them) are not counted
        with torch.utils._python_dispatch._disable_current_modes():
            return launches(*args)

    monkeypatch.setattr(kern, "backward", uncounted)
    with OpCounts() as ops:  # the custom op's implementation, which the op hides from dispatch modes
        grads = _backward_impl(dy, x, w, b, sc, sh, mean, rstd, 4, 1e-5, "silu", "triton", xb)
    assert [g.dtype for g in grads] == [x.dtype, torch.float32, ss_dtype, ss_dtype]
    assert grads[1].shape == (3 if with_input_bias else 2, 8)  # dweight, dbias (, dinput_bias)
    want = _backward_impl(dy, x, w, b, sc, sh, mean, rstd, 4, 1e-5, "silu", "ref", xb)
    for g, r in zip(grads, want):
        assert torch.allclose(g.float(), r.float(), rtol=1e-2 if ss_dtype == torch.bfloat16 else 1e-4, atol=1e-4)
    assert ops.calls == {"aten.sum.dim_IntList": 1}, ops.calls


def test_channels_last_norms_the_fused_path_reads_twice_take_whole_rows(monkeypatch):
    """The public models' large channels_last norms (sampling batch 32 and 8, training batch 16) read
    whole rows where the fused path would read them twice from DRAM or a split of GPB groups would read
    rows of fewer than 32 channels (C/G = 3-24); a power-of-two C/G keeps the split of 32-channel rows
    (faster on the H200); those whose groups fit a tile, or whose fused second pass finds them in L2, stay
    fused; NCHW keeps its plans."""
    whole = [(32, 192, 256 * 256), (32, 768, 64 * 64), (32, 384, 64 * 64), (32, 384, 128 * 128),
             (8, 96, 512 * 512), (8, 192, 256 * 256), (32, 512, 64 * 64)]
    groups = [(32, 64, 256 * 256), (32, 128, 128 * 128), (32, 256, 64 * 64), (16, 256, 64 * 64),
              (8, 64, 1024 * 1024), (8, 128, 256 * 256), (8, 512, 64 * 64)]
    for shape in whole + groups:
        p = kern.plan(*shape, 32, True)
        assert 1 < p.nsplit <= kern.MAX_SPLIT and p.rows >= kern.WHOLE_ROWS_MIN_ROWS, shape
        if shape in whole:
            assert (p.gpb, p.block_c) == (32, triton.next_power_of_2(shape[1])), shape
        else:
            assert p.gpb * shape[1] // 32 == p.block_c == kern.WHOLE_ROWS_BELOW_CHANNELS, shape
        assert kern.plan(*shape, 32, False).gpb == 1
    assert kern.plan(8, 32, 1024 * 1024, 32, True).block_c == 32  # one channel per group: all of them either way
    # 1024 px x 64 B per program, 264 resident: 17 MB, in L2 (in backward, 8 per SM reading x and dy: not)
    assert kern.plan(32, 512, 32 * 32, 32, True).fused
    assert not kern.plan(32, 512, 32 * 32, 32, True, backward=True).fused
    assert kern.plan(32, 768, 16 * 16, 32, True).single  # 12.6 MB, one tile per group
    assert kern.plan(32, 1536, 16 * 16, 32, True).fused  # 25 MB; 6.3 MB resident
    force_whole_rows(monkeypatch, 64, 5)  # whole rows wanted for every channels_last norm
    one_row = kern.plan(1, 64, 1, 32, True)  # one row: no split
    assert one_row == dataclasses.replace(kern._groups_plan(1, 64, 1, 32, True, 132, 64), acc_rows=one_row.acc_rows,
                                          vec_rows=one_row.vec_rows, stages=one_row.stages)


@pytest.mark.parametrize("shape,G,dtype,cl,ss,affine,act", [SPLIT_CASES[0], SPLIT_CASES[1], SPLIT_CASES[3]])
def test_triton_fused_looping_matches_reference(monkeypatch, shape, G, dtype, cl, ss, affine, act):
    """The fused path with groups larger than one tile: statistics pass, then a second pass over the group."""
    small_tiles(monkeypatch, 32)
    p = _plan(shape, G, cl)
    assert p.fused and not p.single
    _check_against_fp64(_inputs(shape, G, dtype, cl, ss, affine), G, act, "triton")


def test_register_cap_is_for_channels_last_plans():
    """The compiler's register cap (kernel_report checks what it buys) goes with channels_last plans, fused
    and whole-row; NCHW plans keep the compiler's choice."""
    for shape in [(32, 512, 32 * 32), (32, 768, 16 * 16), (32, 128, 128 * 128)]:
        assert kern.plan(*shape, 32, True).max_registers == kern.MAX_REGISTERS
        assert kern.plan(*shape, 32, True, backward=True).max_registers == kern.MAX_REGISTERS
        assert kern.plan(*shape, 32, False).max_registers is None


def test_a_group_of_one_single_tile_is_read_once_in_backward_too():
    """SINGLE_TILE elements per group stay in registers also in the backward, whose looping tiles
    (TILE_BWD) are smaller."""
    assert kern.SINGLE_TILE == 32 * 256 > kern.TILE_BWD
    p = kern.plan(1, 32, 256, 1, False, backward=True)  # (B, C, S, G): one group of 32 x 256
    assert p.single and p.block_s == 256


def test_channels_last_programs_take_several_groups():
    assert kern.plan(8, 32, 1 << 20, 32, True).gpb == 32  # one channel per group: 32 groups, 64 B rows
    assert kern.plan(8, 32, 1 << 20, 32, False).gpb == 1
    assert kern.plan(2, 48, 15, 16, True).gpb == 1  # 3 channels per group: not a power of two


@pytest.mark.parametrize("path", ["single", "looping", "split"])  # split: a last part shorter than a tile
def test_large_mean_is_stable(monkeypatch, path):
    """Statistics in fp32 with a mean far from zero (no plain E[x^2] - E[x]^2): sums shifted by the mean of
    each part's first tile, also where that tile is partial."""
    _path(path, monkeypatch)
    p = kern.plan(2, 8, 36, 4, False)
    assert p.fused or p.nsplit * p.rows - 36 > p.block_s // 2, p  # (split) the last part: under half a tile
    inputs = _inputs((2, 8, 6, 6), 4, torch.float32, scale_shift=False)
    inputs[0] = inputs[0] + 300.0
    _check_against_fp64(inputs, 4, "silu", "triton")


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[10]])
def test_ref_backend_gradients(case):
    shape, G, dtype, cl, ss, affine, act = case
    _check_against_fp64(_inputs(shape, G, dtype, cl, ss, affine), G, act, "ref")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ref_backend_rounds_once_in_low_precision(dtype):
    """The ref backend computes in fp32 and rounds y and every gradient once to the input precision: each
    within an ulp of the fp64 value (the public formula run in fp16/bf16 rounds after every op: ~5-900 ulps)."""
    inputs = _inputs((2, 8, 6, 6), 2, dtype)  # (B, C, H, W)
    dy = torch.randn(inputs[0].shape, dtype=dtype)
    got = _run(inputs, 2, "silu", "ref", dy)
    want = _run(inputs, 2, "silu", "public", dy, dtype=torch.float64)
    for i, (g, w) in enumerate(zip(got, want)):
        ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1e-3))))  # at |w|
        assert ((g.double() - w).abs() <= ulp + 1e-6 * w.abs().max()).all(), i


def test_non_dense_input_is_made_contiguous():
    """A non-dense x is copied NCHW-contiguous; a producer's moments (of its dense layout) are dropped."""
    x = torch.randn(2, 8, 6, 12)[..., ::2]  # (B, C, H, W), W strided
    y = group_norm_act(x, 4, None, None, impl="triton")
    torch.testing.assert_close(y, reference(x, 4, None, None), atol=2e-5, rtol=1e-5)
    y = group_norm_act(x, 4, None, None, impl="triton", moments=torch.zeros(2, 2, 3, 8))  # (2, B, parts, C)
    torch.testing.assert_close(y, reference(x, 4, None, None), atol=2e-5, rtol=1e-5)


def test_moments_for_a_fused_norm_are_refused():
    """Moments fit only the split path's parts: where the norm takes the fused path they are refused,
    not silently ignored."""
    x = torch.randn(2, 8, 5, 7).to(memory_format=torch.channels_last)  # (B, C, H, W)
    assert kern.moments_plan(x.shape, 4, x.device, x.element_size()) is None
    with pytest.raises(ValueError, match="takes the fused path"):
        group_norm_act(x, 4, None, None, impl="triton", moments=torch.zeros(2, 2, 2, 8))  # (2, B, parts, C)


def test_inference_skips_the_custom_op_only_without_autograd_or_tracing():
    x, w, b, sc, sh = _inputs((2, 8, 5, 7), 4, torch.float32)
    with torch.no_grad():
        y = group_norm_act(x, 4, w, b, 1e-5, sc, sh, impl="triton")
    torch.testing.assert_close(y, reference(x, 4, w, b, 1e-5, sc, sh), atol=2e-5, rtol=1e-5)
    assert y.grad_fn is None
    y = group_norm_act(x, 4, w.requires_grad_(), b, 1e-5, sc, sh, impl="triton")
    assert y.grad_fn is not None


def test_ref_backend_is_the_public_formulation():
    x, w, b, sc, sh = _inputs((2, 8, 5, 7), 4, torch.float32)
    y = group_norm_act(x, 4, w, b, 1e-5, sc, sh, impl="ref")
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, w, b, 1e-5) * (1 + sc[..., None, None])
                                    + sh[..., None, None])
    assert torch.equal(y, want)


def test_eps_zero_is_allowed():
    """eps only has to be non-negative: 0 is the plain standardisation."""
    x = torch.randn(2, 4, 3, 3)  # (B, C, H, W)
    torch.testing.assert_close(group_norm_act(x, 2, None, None, eps=0, impl="ref"),
                               reference(x, 2, None, None, eps=0))


def test_a_second_derivative_raises_on_the_kernel_backend_and_is_right_on_ref():
    """A gradient penalty (create_graph=True) through the triton backward, whose kernels make no graph, was
    silently missing its second-derivative term; it raises now, naming the op. The ref backend's is PyTorch's."""
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view_as(x)

    def penalty(impl, x):
        y = group_norm_act(x, 4, None, None, impl=impl)
        g, = torch.autograd.grad((y * w).sum(), x, create_graph=True)
        return y.sum() + (g ** 2).sum()

    want, = torch.autograd.grad(penalty("ref", x), x)
    assert torch.autograd.gradcheck(lambda t: penalty("ref", t), (x,))
    with pytest.raises(RuntimeError, match="GroupNormAct: no second derivative"):
        torch.autograd.grad(penalty("triton", x.float()), x)
    y = group_norm_act(x.float(), 4, None, None, impl="triton")  # first derivatives: as before
    got, = torch.autograd.grad((y * w.float()).sum(), x)
    torch.testing.assert_close(got, torch.autograd.grad((group_norm_act(x, 4, None, None, impl="ref") * w).sum(),
                                                        x)[0], rtol=1e-4, atol=1e-4)
    assert want.abs().max() > 0


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_opcheck(backend):
    x, w, b, sc, sh = _inputs((2, 4, 3, 5), 2, torch.float32, channels_last=True)
    x.requires_grad_()
    w.requires_grad_()
    sc.requires_grad_()
    torch.library.opcheck(torch.ops.mdm_fast.group_norm_act_fwd.default, (x, w, b, sc, sh, 2, 1e-5, "silu", backend))
    y, mean, rstd = torch.ops.mdm_fast.group_norm_act_fwd(x.detach(), w, b, sc, sh, 2, 1e-5, "silu", backend)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.mdm_fast.group_norm_act_bwd.default,
                          (dy, x.detach(), w.detach(), b, sc.detach(), sh, mean, rstd, 2, 1e-5, "silu", backend))
    sc16, sh16 = sc.detach().bfloat16(), sh.bfloat16()  # dscale, dshift in their dtypes (a bf16 projection)
    torch.library.opcheck(torch.ops.mdm_fast.group_norm_act_bwd.default,
                          (dy, x.detach(), w.detach(), b, sc16, sh16, mean, rstd, 2, 1e-5, "silu", backend))
    xb = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.mdm_fast.group_norm_act_fwd.default,
                          (x, w, b, sc, sh, 2, 1e-5, "silu", backend, None, xb))


def test_compiles_without_graph_breaks():
    x, w, b, sc, sh = _inputs((2, 8, 5, 7), 4, torch.float32)
    f = torch.compile(lambda *a: group_norm_act(*a, impl="ref"), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x, 4, w, b, 1e-5, sc, sh), reference(x, 4, w, b, 1e-5, sc, sh))


# ---- dispatch --------------------------------------------------------------------------------


def _resolve(x, impl="auto"):
    return dispatch.resolve(OP, impl, x, None, None, None, None)


def test_auto_leaves_the_interpreter_to_explicit_requests(monkeypatch):
    x = torch.randn(2, 4, 3, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _resolve(x) == "ref"
    assert _resolve(x, impl="triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _resolve(x) == "ref"
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        _resolve(x, impl="triton")
    assert _resolve(x.double()) == "ref"


@pytest.mark.parametrize("value", ["1", "true", "On", "yes", "Y", "0", "2", "t", ""])
def test_interpreter_flag_read_as_triton_reads_it(monkeypatch, value):
    """TRITON_INTERPRET=true runs Triton's interpreter as =1 does: dispatch agrees with triton's knob."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert dispatch.triton_interpreting() == triton.knobs.runtime.interpret
    x = torch.randn(2, 4, 3, 3)  # (B, C, H, W)
    assert (dispatch.why_not(OP, "triton", x, None, None, None, None) is None) == triton.knobs.runtime.interpret


def test_overrides(monkeypatch):
    x = torch.randn(2, 4, 3, 3)
    monkeypatch.setenv("MDM_FAST_IMPL", "ref")
    assert _resolve(x) == "ref"
    monkeypatch.delenv("MDM_FAST_IMPL")
    with use_impl("ref"):
        assert _resolve(x) == "ref"
    assert _resolve(x, impl="ref") == "ref"
    with use_impl("sdpa"):  # a global preference this op has no backend for: automatic choice
        assert _resolve(x) == _resolve(x, impl="auto")
    with pytest.raises(BackendUnavailable, match="no sdpa backend"):
        _resolve(x, impl="sdpa")  # named in the call: an error
    monkeypatch.setenv("MDM_FAST_IMPL", "triton")
    with use_impl("ref"):  # the block beats the environment
        assert _resolve(x) == "ref"
        with use_impl("triton"):  # the innermost block wins, and leaving it restores the outer one
            assert _resolve(x) == "triton"
        assert _resolve(x) == "ref"
    monkeypatch.delenv("MDM_FAST_IMPL")
    with use_impl("triton"), concurrent.futures.ThreadPoolExecutor(1) as pool:  # a block is the thread's own
        assert _resolve(x) == "triton" and pool.submit(_resolve, x).result() == "ref"
    monkeypatch.setenv("MDM_FAST_IMPL", " Ref ")  # as a shell may leave it
    assert _resolve(x) == "ref"
    monkeypatch.setenv("MDM_FAST_IMPL", "fastest")
    with pytest.raises(ValueError, match="environment variable MDM_FAST_IMPL must be .* got 'fastest'"):
        _resolve(x)
    monkeypatch.delenv("MDM_FAST_IMPL")
    with pytest.raises(ValueError, match="got 'fastest'"), use_impl("fastest"):
        pass


def test_register_and_resolve_rules(monkeypatch):
    """register refuses unknown backends and ops without ref; auto skips backends that say why not, and
    ends at ref where the preference order names no runnable one; with no CUDA tensor among the
    arguments, auto leaves Triton to the interpreter's explicit requests."""
    monkeypatch.setitem(dispatch._REGISTRY, "probe", None)  # removed again after the test
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        dispatch.register("probe", {"ref": lambda: None, "tpu": lambda: None}, ["ref"])
    with pytest.raises(ValueError, match="must have a 'ref' backend"):
        dispatch.register("probe", {"triton": lambda: None}, ["triton"])
    dispatch.register("probe", {"ref": lambda: None, "triton": lambda: "not today", "torch": lambda: None},
                      preference=["triton"])
    assert dispatch.resolve("probe", "auto") == "ref"
    always = {"ref": lambda n: None, "torch": lambda n: None}
    dispatch.register("probe", always, preference=lambda n: ["torch", "ref"] if n > 128 else ["ref", "torch"])
    monkeypatch.setenv("MDM_FAST_IMPL", "")  # set but empty: automatic choice
    assert dispatch.resolve("probe", "auto", 256) == "torch" and dispatch.resolve("probe", "auto", 64) == "ref"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.register("probe", {"ref": lambda: None, "triton": lambda: None}, preference=["triton", "ref"])
    assert dispatch.resolve("probe", "auto") == "ref"  # no tensors at all: still not on CUDA
    assert dispatch.resolve("probe", "triton") == "triton"


def test_common_reasons(monkeypatch):
    """The shared reason helpers: the first reason given wins; the cuda backend and library backends
    refuse CPU tensors even once the extension or package is there."""
    assert dispatch.first_reason(None, "first", "second") == "first"
    assert dispatch.first_reason(None, None) is None
    x = torch.randn(2, 4, 3, 3)
    monkeypatch.setattr(_ext, "ext", object())  # as if mdm_fast._C were built
    assert "needs CUDA tensors" in dispatch.cuda_ext_reason(None, x)
    assert "torch needs CUDA tensors" in dispatch.package_reason("torch", None, x)  # an installed package
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in dispatch.triton_reason(None, x)  # a None argument ends no check
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "tensor on meta" in dispatch.triton_reason(x, x.to("meta"))  # the interpreter runs CPU tensors only
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: False)
    assert dispatch.triton_reason(x) == "the triton package is not installed"
    assert "float64 not supported (supported: float32): the input of shape (2, 4, 3, 3)" in dispatch.dtype_reason(
        (torch.float32,), None, x.double())  # names the tensor by its shape


def test_explicit_backend_that_cannot_run_says_why(monkeypatch):
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        group_norm_act(x, 2, None, None, impl="cuda")
    with pytest.raises(BackendUnavailable, match="float64"):
        group_norm_act(x.double(), 2, None, None, impl="triton")
    with pytest.raises(BackendUnavailable, match=r"float64 .* shape \(2, 4, 3, 3, 1\)"):  # 5-D: x's own shape
        group_norm_act(x.double()[..., None], 2, None, None, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        group_norm_act(x, 2, None, None, impl="triton")


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.randn(2, 4, 9)), r"\(B, C, H, W\)"),
    (dict(x=torch.randint(0, 3, (2, 4, 3, 3))), "float16, bfloat16 or float32"),
    (dict(num_groups=3), "dividing the 4 channels"),
    (dict(num_groups=0), "positive int"),
    (dict(weight=torch.randn(3)), r"weight must have shape \(4,\)"),
    (dict(bias=torch.randn(4, 1)), r"bias must have shape \(4,\)"),
    (dict(scale=torch.randn(4)), r"scale must have shape \(2, 4\)"),
    (dict(shift=torch.randn(2, 4, 1, 1)), r"shift must have shape \(2, 4\)"),
    (dict(input_bias=torch.randn(2, 4)), r"input_bias must have shape \(4,\)"),
    (dict(act="relu"), "act must be 'silu' or None"),
    (dict(eps=-1.0), "eps"),
])
def test_bad_inputs_raise_value_error(kwargs, match):
    args = dict(x=torch.randn(2, 4, 3, 3), num_groups=2, weight=None, bias=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        group_norm_act(**args)


def test_an_empty_batch_runs_like_pytorch_whatever_backend_was_asked_also_compiled():
    """A mixed batch's top level can hold no samples (mixed_ratio at a small batch): an empty x gives an
    empty output and zero parameter gradients, as PyTorch's ops do (it raised), on any requested backend,
    and under torch.compile (which runs the custom op: its ref code reshaped to (0, G, -1))."""
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    sc, sh = torch.randn(0, 4, requires_grad=True), torch.randn(0, 4, requires_grad=True)
    compiled = torch.compile(functools.partial(group_norm_act, num_groups=2), backend="aot_eager", fullgraph=True)
    for impl, fn in (("triton", group_norm_act), ("ref", group_norm_act), ("ref", compiled)):
        assert dispatch.resolve("group_norm_act", impl, x, w, b, sc, sh) == "ref"
        y = fn(x, num_groups=2, weight=w, bias=b, scale=sc, shift=sh, impl=impl)
        assert y.shape == x.shape
        grads = torch.autograd.grad(y.sum(), (x, w, b, sc, sh))
        assert [tuple(g.shape) for g in grads] == [(0, 4, 3, 3), (4,), (4,), (0, 4), (0, 4)]
        assert all(not g.any() for g in grads)


# ---- GPU ---------------------------------------------------------------------------------------


def _check_against_pytorch_error(inputs, G, act, impl, atol=1e-5):
    """err(backend) <= 2 * err(PyTorch in the input precision) + atol, both vs fp64, for y and every gradient."""
    x = inputs[0]
    dy = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    got = _run(inputs, G, act, impl, dy)
    torch_lp = _run(inputs, G, act, "public", dy)
    want = _run(inputs, G, act, "public", dy, dtype=torch.float64)
    for i, (g, t, r) in enumerate(zip(got, torch_lp, want)):
        scale = max(1.0, r.abs().max().item())
        bound = 2 * _max_err(t, r) + atol * scale
        assert _max_err(g, r) <= bound, f"output {i}: err {_max_err(g, r):.3g} > {bound:.3g}"


GPU_CASES = [
    ((4, 64, 33, 31), 32),  # odd H, W; 2 channels per group
    ((2, 48, 16, 16), 16),  # C not a multiple of 32
    ((2, 32, 40, 40), 32),  # one channel per group
    ((2, 24, 8, 8), 1),  # one group
    ((2, 768, 64, 64), 32),  # a very large group (24 channels x 4096 pixels)
    ((2, 64, 4, 16, 16), 32),  # 5-D
]


# the cuda backend needs mdm_fast._C: where its build failed, its cases say so as skips, and the triton
# ones still run (under pytest --maxfail they would otherwise stop the GPU run early)
GPU_IMPLS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    _ext.ext is None, reason=f"mdm_fast._C not built: {_ext.load_error}"))]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape,G", GPU_CASES)
@pytest.mark.parametrize("ss", [True, False])
def test_gpu_matches_reference(impl, dtype, cl, shape, G, ss):
    inputs = _inputs(shape, G, dtype, cl, scale_shift=ss, device="cuda")
    _check_against_pytorch_error(inputs, G, "silu" if ss else None, impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("shape", [(4, 32, 1024, 1024), (16, 64, 256, 256), (16, 256, 64, 64), (16, 768, 16, 16),
                                   (8, 192, 128, 128)])  # channels_last: the last one on whole rows, 6 per group
@pytest.mark.parametrize("cl", [False, True])
def test_gpu_model_shapes(impl, shape, cl):
    inputs = _inputs(shape, 32, torch.bfloat16, cl, device="cuda")
    _check_against_pytorch_error(inputs, 32, "silu", impl)


@pytest.mark.gpu
@pytest.mark.parametrize("stages,lanes", [(1, True), (2, True), (4, True), (3, False)])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(16, 128, 128, 128), (8, 192, 128, 128), (16, 512, 32, 32)])
def test_gpu_plan_knobs(monkeypatch, stages, lanes, cl, shape):
    """The triton kernels under the sweep's other values of PIPELINE_STAGES and LANE_ACCUMULATORS (the
    interpreter ignores the stages), so that a default the sweep flips is one already tested: split,
    whole-row and fused paths."""
    monkeypatch.setattr(kern, "PIPELINE_STAGES", stages)
    monkeypatch.setattr(kern, "LANE_ACCUMULATORS", lanes)
    inputs = _with_input_bias(_inputs(shape, 32, torch.bfloat16, cl, device="cuda"))
    _check_against_pytorch_error(inputs, 32, "silu", "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape,G", [GPU_CASES[0], GPU_CASES[1], ((16, 256, 64, 64), 32), ((8, 192, 128, 128), 32),
                                     ((2, 32, 512, 512), 32)])
def test_gpu_input_bias(impl, dtype, cl, shape, G):
    """group_norm(x + input_bias): against the public code's conv output with its bias, in x's precision.
    The last shape has one channel per group over many pixels (the 1024x1024 model's outer levels):
    dinput_bias is 0 there, the triton kernels' closed form a difference of large sums."""
    inputs = _with_input_bias(_inputs(shape, G, dtype, cl, device="cuda"))
    _check_against_pytorch_error(inputs, G, "silu", impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("cl", [False, True])
def test_gpu_more_than_2_31_elements(impl, cl):
    """A batch of more than 2^31 elements (the 1024x1024 model's outer level past batch 32): the last
    sample, whose offsets overflow int32, gives what it gives alone, forward and backward."""
    x, w, b, sc, sh = _inputs((33, 64, 1024, 1024), 32, torch.bfloat16, cl, device="cuda")
    assert x.numel() > 2**31
    x.requires_grad_()
    y = group_norm_act(x, 32, w, b, scale=sc, shift=sh, impl=impl)
    dy = torch.randn_like(y)
    dx, = torch.autograd.grad(y, x, dy)
    alone = x[-1:].detach().requires_grad_()
    y_alone = group_norm_act(alone, 32, w, b, scale=sc[-1:], shift=sh[-1:], impl=impl)
    torch.testing.assert_close(y[-1:], y_alone, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx[-1:], torch.autograd.grad(y_alone, alone, dy[-1:])[0], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_weight_none_and_split_path(impl, monkeypatch):
    monkeypatch.setattr(kern, "FUSED_MIN_PROGRAMS_PER_SM", 10**6)
    monkeypatch.setattr(kern, "SPLIT_MIN_ELEMENTS", 0)
    inputs = _inputs((2, 16, 37, 29), 4, torch.float32, affine=False, device="cuda")
    _check_against_pytorch_error(inputs, 4, "silu", impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_gpu_runs_on_the_current_stream(impl):
    # The fixed 0.05 bound this replaces failed once for cuda on an H200 (not diagnosed further): outputs
    # reach ~10 here, where one bf16 ulp is 0.06, so that bound sat below rounding.
    inputs = _inputs((2, 64, 32, 32), 32, torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _check_against_pytorch_error(inputs, 32, "silu", impl)
    torch.cuda.current_stream().wait_stream(side)
