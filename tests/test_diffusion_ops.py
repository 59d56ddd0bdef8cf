"""The fused diffusion ops: ref against an independent derivation, triton against ref (interpreter on CPU)."""

import pytest
import torch
import torch.nn.functional as F

from mdm_fast.ops import BackendUnavailable, use_impl
from mdm_fast.ops import diffusion_step as ds
from mdm_fast.ops.diffusion_step import noisy_pyramid, sampler_update
from mdm_fast.reference.data import reference_dir

GOLDEN = reference_dir() / "golden" / "sampler_steps.pt"
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _gammas(levels, batch, device="cpu"):
    return torch.rand(levels, batch, device=device) * 0.98 + 0.01  # (L, B) away from 0 and 1


def _spy(monkeypatch, name):
    """Count the calls of the Triton host function ``name``: a backend table that sent "triton" to ref
    would compare ref with itself."""
    from mdm_fast.kernels import diffusion_step as kern

    calls, fn = [], getattr(kern, name)
    monkeypatch.setattr(kern, name, lambda *a: calls.append(1) or fn(*a))
    return calls


def _pyramid_inputs(ratios, B, C, H, W, dtype=torch.float32, device="cpu"):
    img = (torch.rand(B, C, H, W, device=device) * 2 - 1).to(dtype)
    noises = [torch.randn(B, C, H // r, W // r, device=device).to(dtype) for r in ratios]
    g = _gammas(len(ratios), B, device)
    return img, (g.double() if dtype == torch.float64 else g), noises


@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_pyramid_ref_matches_direct_derivation(target):
    ratios, scales = [1, 4, 16], [16.0, 4.0, 1.0]
    img, g, noises = _pyramid_inputs(ratios, 2, 3, 32, 48, torch.float64)
    x0, xt, tgt = noisy_pyramid(img, ratios, g, noises, scales, target, impl="ref")
    for i, (r, s) in enumerate(zip(ratios, scales)):
        want_x0 = F.avg_pool2d(img, r) / s  # pooling the top directly equals the public level-by-level pooling
        gi = g[i].view(-1, 1, 1, 1)
        want_xt = gi.sqrt() * want_x0 + (1 - gi).sqrt() * noises[i]
        want_t = {"eps": noises[i], "v": gi.sqrt() * noises[i] - (1 - gi).sqrt() * want_x0, "x0": want_x0}[target]
        torch.testing.assert_close(x0[i], want_x0, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(xt[i], want_xt, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(tgt[i], want_t, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("ratios,H,W", [([1, 2], 6, 10), ([1, 4], 32, 24), ([1, 4, 16], 32, 48),
                                        ([1, 2, 4, 8], 16, 8), ([1], 5, 7), ([1, 32], 32, 32)])  # 32: over a tile cap
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pyramid_triton_matches_ref(ratios, H, W, dtype, monkeypatch, device):
    img, g, noises = _pyramid_inputs(ratios, 2, 3, H, W, dtype, device)
    inputs = [t.clone() for t in [img, g, *noises]]
    scales = [float(ratios[-1] // r) for r in ratios]
    calls = _spy(monkeypatch, "noisy_pyramid")
    for target in ("eps", "v", "x0"):  # x0: the kernel writes its own copy of x0 as the target
        ref = noisy_pyramid(img, ratios, g, noises, scales, target, impl="ref")
        tri = noisy_pyramid(img, ratios, g, noises, scales, target, impl="triton")
        for a_list, b_list in zip(ref, tri):
            assert len(a_list) == len(b_list) == len(ratios)
            for a, b in zip(a_list, b_list):
                assert a.dtype == b.dtype == dtype
                torch.testing.assert_close(b.float(), a.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert len(calls) == 3 and all(torch.equal(a, b) for a, b in zip(inputs, [img, g, *noises]))  # inputs intact


def test_pyramid_eps_target_is_the_noise_and_x0_target_is_a_copy():
    img, g, noises = _pyramid_inputs([1, 2], 1, 1, 4, 4)
    _, _, tgt = noisy_pyramid(img, [1, 2], g, noises, impl="ref")
    assert all(t is n for t, n in zip(tgt, noises))
    x0, _, tgt = noisy_pyramid(img, [1, 2], g, noises, target="x0", impl="ref")
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(x0, tgt))


def test_pyramid_validation():
    img, g, noises = _pyramid_inputs([1, 4], 2, 3, 16, 16)
    with pytest.raises(ValueError, match="start with 1"):
        noisy_pyramid(img, [2, 4], g, noises)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        noisy_pyramid(img, [1, 4], g[:1], noises)
    with pytest.raises(ValueError, match="noise of ratio 4"):
        noisy_pyramid(img, [1, 4], g, [noises[0], noises[0]])
    with pytest.raises(ValueError, match="divisible"):
        noisy_pyramid(img[..., :14], [1, 4], g, noises)
    with pytest.raises(ValueError, match="target"):
        noisy_pyramid(img, [1, 4], g, noises, target="score")
    img3, g3, n3 = _pyramid_inputs([1, 3], 1, 1, 6, 6)
    with pytest.raises(BackendUnavailable, match="powers of two"):
        with use_impl("triton"):
            noisy_pyramid(img3, [1, 3], g3, n3)
    assert len(noisy_pyramid(img3, [1, 3], g3, n3, impl="auto")[0]) == 2  # auto falls back to ref


def _update_inputs(shapes, dtype=torch.float32, device="cpu", last=False):
    x = [torch.randn(s, device=device).to(dtype) for s in shapes]
    p = [torch.randn(s, device=device).to(dtype) for s in shapes]
    n = [torch.randn(s, device=device).to(dtype) for s in shapes]
    L, B = len(shapes), shapes[0][0]
    g_s = _gammas(L, B, device).clamp(0.2, 0.99)
    g_t = g_s * (torch.rand(L, B, device=device) * 0.9 + 0.05)  # g_t < g_s
    if last:
        g_s[:, 0] = 1.0
    return x, p, n, g_t, g_s


def _public_step(x_t, pred, g, gl, kind, eta, noise, scale, clip):
    """The public get_prediction_xt_last, spelled out independently (eps/v, CLIP or none)."""
    x0 = (x_t - pred * (1 - g).sqrt()) / g.sqrt() if kind == "eps" else x_t * g.sqrt() - pred * (1 - g).sqrt()
    if clip:
        x0 = (x0 * scale).clip(-1, 1) / scale
    alpha = g / gl
    beta = 1 - alpha
    bt = beta * (1 - gl) / (1 - g)
    if eta is None:
        xs = x0 * beta * gl.sqrt() / (1 - g) + x_t * alpha.sqrt() * (1 - gl) / (1 - g)
    else:
        e = (x_t - x0 * g.sqrt()) / (1 - g).sqrt()
        bt = eta**2 * bt
        xs = x0 * gl.sqrt() + e * (1 - gl - bt).sqrt()
        if eta == 0:
            noise = None
    if noise is not None:
        xs = xs + bt.sqrt() * noise
    return x0, xs, (xs - gl.sqrt() * x0) / (1 - gl).sqrt()


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("eta", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_update_ref_matches_public_formulas(kind, eta, clip):
    shapes = [(2, 3, 8, 12), (2, 3, 4, 6)]
    x, p, n, g_t, g_s = _update_inputs(shapes, torch.float64)
    g_t, g_s = g_t.double(), g_s.double()
    scales = [2.0, 1.0]
    x0, xs, eps = sampler_update(x, p, g_t, g_s, n, scales, kind, eta, "clip" if clip else "none", impl="ref")
    for i in range(2):
        want = _public_step(x[i], p[i], g_t[i].view(-1, 1, 1, 1), g_s[i].view(-1, 1, 1, 1), kind, eta, n[i],
                            scales[i], clip)
        for a, b in zip((x0[i], xs[i], eps[i]), want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def _max_err(got, want):
    return (got.double().cpu() - want.double().cpu()).abs().max().item()


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_update_golden_public_steps(impl, device):
    """On the CPU both backends follow the public code's fp32 arithmetic to 1e-6. Near g_s = 1 eps divides
    by sqrt(1 - g_s) and amplifies every rounding (the golden fp32 eps is 1.4e-4 off the exact one), so on
    CUDA, where the kernel's sqrt and division round otherwise, each output's error against the exact
    (fp64) step is bounded by twice the public code's own, plus 1e-6."""
    for case in torch.load(GOLDEN, weights_only=True):
        kind = {"DDPM": "eps", "V_PREDICTION": "v"}[case["prediction_type"]]
        g_t, g_s = case["g_t"][:, 0, 0, 0][None], case["g_s"][:, 0, 0, 0][None]  # (1, B): one level
        assert torch.equal(case["g_t"], g_t[0].view(-1, 1, 1, 1).expand_as(case["g_t"]))
        inputs = [case[key] for key in ("x_t", "pred", "noise")]
        x_t, pred, noise = (t.to(device) for t in inputs)
        x0, xs, eps = sampler_update([x_t], [pred], g_t.to(device), g_s.to(device), [noise], None, kind,
                                     case["ddim_eta"], "clip", impl=impl)
        x_t, pred, noise = (t.double() for t in inputs)
        exact = sampler_update([x_t], [pred], g_t.double(), g_s.double(), [noise], None, kind, case["ddim_eta"],
                               "clip", impl="ref")
        for got, key, want in zip((x0, xs, eps), ("x0", "x_s", "eps"), exact):
            if device == "cpu":
                torch.testing.assert_close(got[0], case[key], atol=1e-6, rtol=1e-6)
            else:
                assert _max_err(got[0], want[0]) <= 2 * _max_err(case[key], want[0]) + 1e-6, key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,eta,thresh,noisy", [("eps", None, "clip", True), ("v", 0.0, "none", True),
                                                   ("v", 0.7, "clip", True), ("x0", None, "none", False),
                                                   ("eps", 2.0, "clip", True)])  # eta > 1: 1 - g_s - var < 0
def test_update_triton_matches_ref(dtype, kind, eta, thresh, noisy, monkeypatch, device):
    """Both backends alike and finite (with eta > 1 DDIM's coefficient of eps_t clamps at 0)."""
    # four levels (the most), odd sizes; the top one over two 1024-element blocks per sample, with a tail
    shapes = [(2, 3, 24, 31), (2, 3, 4, 3), (2, 3, 2, 3), (2, 3, 1, 2)]
    x, p, n, g_t, g_s = _update_inputs(shapes, dtype, device, last=True)
    inputs = [t.clone() for t in [*x, *p, *n, g_t, g_s]]
    args = (x, p, g_t, g_s, n if noisy else None, [8.0, 4.0, 2.0, 1.0], kind, eta, thresh)
    calls = _spy(monkeypatch, "sampler_update")
    ref, tri = sampler_update(*args, impl="ref"), sampler_update(*args, impl="triton")
    exact = sampler_update([t.double() for t in x], [t.double() for t in p], g_t.double(), g_s.double(),
                           [t.double() for t in n] if noisy else None, *args[5:], impl="ref")
    for a_list, b_list, e_list in zip(ref, tri, exact):
        for a, b, e in zip(a_list, b_list, e_list):
            assert b.dtype == dtype and torch.isfinite(b.float()).all()
            # divisions by sqrt(g) and sqrt(1 - g) amplify rounding: the kernel's error against the exact
            # (fp64) step, bounded by twice PyTorch's own in the same dtype
            assert _max_err(b, e) <= 2 * _max_err(a, e) + TOL[dtype] * 4
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(inputs, [*x, *p, *n, g_t, g_s]))


@pytest.mark.parametrize("eta", [None, 0.5])
def test_update_keeps_a_nan_prediction_nan(device, eta):
    """A diverged model's NaN stays NaN through the clip (torch.clip keeps it; a GPU's plain min/max
    would return the bound: plausible images from a broken model). The interpreter keeps NaN either way:
    the CUDA case is the one that can fail."""
    x, p = [torch.randn(1, 2, 4, 4, device=device)], [torch.randn(1, 2, 4, 4, device=device)]
    p[0][0, 0, 0, 0] = float("nan")
    g_t, g_s = torch.tensor([[0.5]], device=device), torch.tensor([[0.8]], device=device)
    for impl in ("ref", "triton"):
        x0, xs, _ = sampler_update(x, p, g_t, g_s, None, None, "x0", eta, "clip", impl=impl)
        assert torch.isnan(x0[0][0, 0, 0, 0]) and torch.isnan(xs[0][0, 0, 0, 0]), impl
        assert torch.isnan(xs[0]).sum() == 1, impl


def test_bad_update_and_pyramid_arguments_are_named():
    """Each was uninitialised memory (a tensor on another device ran the fake kernels), a division by zero
    in the launcher, a schema error printing whole tensors, or a silent truncation (ratio 2.7 as 2)."""
    x, p = [torch.randn(1, 2, 2, 2)], [torch.randn(1, 2, 2, 2)]
    g = torch.tensor([[0.5]])
    for args, match in (((x, p, g.to("meta"), g), "every tensor must be on one device, got .*g_t on meta"),
                        ((x, [p[0].to("meta")], g, g), "pred\\[0\\] on meta"),
                        ((x, [None], g, g), r"pred\[0\] must be a tensor of x_t\[0\]'s shape"),
                        ((x, p, g, g, None, [0.0]), r"signal_scales must be finite and > 0, got \[0.0\]")):
        with pytest.raises(ValueError, match=match):
            sampler_update(*args)
    with pytest.raises(ValueError, match="eta must be None .* or a finite number >= 0"):
        sampler_update(x, p, g, g, None, None, "eps", float("nan"))
    img, gam, noises = _pyramid_inputs([1, 2], 1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"ratios must be integers, got \[1, 2.7\]"):
        noisy_pyramid(img, [1, 2.7], gam, noises)
    with pytest.raises(ValueError, match="every tensor must be on one device, got .*noises\\[1\\] on meta"):
        noisy_pyramid(img, [1, 2], gam, [noises[0], noises[1].to("meta")])


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_prediction_conversions_invert_each_other(kind):
    """For x_t = sqrt(g) x0 + sqrt(1 - g) eps (fp64): pred_from_x0 gives the prediction target of ``kind``
    (eps, v = sqrt(g) eps - sqrt(1 - g) x0, x0) and x0_from_pred takes it back to x0."""
    x0, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    g = _gammas(1, 2).double().view(-1, 1, 1, 1)
    x_t = g.sqrt() * x0 + (1 - g).sqrt() * eps
    want = {"eps": eps, "v": g.sqrt() * eps - (1 - g).sqrt() * x0, "x0": x0}[kind]
    torch.testing.assert_close(ds.pred_from_x0(x_t, x0, g, kind), want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ds.x0_from_pred(x_t, want, g, kind), x0, atol=1e-12, rtol=1e-12)


def test_ref_backends_compute_half_inputs_in_fp32():
    """bf16 inputs: the ref ops are the fp32 ops on the upcast inputs, rounded once at the end."""
    x, p, n, g_t, g_s = _update_inputs([(2, 3, 4, 4)], torch.bfloat16)
    lo = sampler_update(x, p, g_t, g_s, n, [2.0], "v", None, "clip", impl="ref")
    hi = sampler_update([x[0].float()], [p[0].float()], g_t, g_s, [n[0].float()], [2.0], "v", None, "clip", impl="ref")
    assert all(torch.equal(a[0], b[0].bfloat16()) for a, b in zip(lo, hi))
    img, g, noises = _pyramid_inputs([1, 2], 2, 3, 8, 8, torch.bfloat16)
    lo = noisy_pyramid(img, [1, 2], g, noises, [2.0, 1.0], "v", impl="ref")
    hi = noisy_pyramid(img.float(), [1, 2], g, [e.float() for e in noises], [2.0, 1.0], "v", impl="ref")
    assert all(torch.equal(a, b.bfloat16()) for a_list, b_list in zip(lo, hi) for a, b in zip(a_list, b_list))


def test_update_last_step_is_finite_and_noise_free():
    x, p, n, g_t, g_s = _update_inputs([(1, 2, 4, 4)], last=True)
    x0, xs, eps = sampler_update(x, p, g_t, g_s, n, kind="eps", impl="ref")
    torch.testing.assert_close(xs[0], x0[0])  # g_s = 1: x_s is x0, no noise
    assert torch.isfinite(eps[0]).all()


@pytest.mark.parametrize("kind,ratio,top", [("dynamic", 0.995, 100.0), ("dynamic_if", 0.95, 1.5)])
def test_dynamic_threshold_matches_imagen_definition(kind, ratio, top):
    """The public clip_sample's DYNAMIC (0.995, 100) and DYNAMIC_IF (0.95, 1.5) on x0 * scale: per sample
    s = clamp(quantile(|x|, ratio), 1, top), then clip(x, s) / s; samples below, inside and above [1, top]."""
    x0 = torch.randn(3, 2, 10, 10) * torch.tensor([0.05, 0.3, 300.0]).view(3, 1, 1, 1)  # times 2: 0.1, 0.6, 600
    got = ds.threshold(x0, kind, 2.0)
    q = (x0 * 2).reshape(3, -1).abs().quantile(ratio, dim=1)
    assert q[0] < 0.5 and 1 < q[1] < top < q[2]
    s = q.clamp(1, top).view(3, 1, 1, 1)
    torch.testing.assert_close(got, ((x0 * 2).clamp(-s, s) / s) / 2)
    with pytest.raises(BackendUnavailable, match="quantile"):
        x, p, n, g_t, g_s = _update_inputs([(1, 1, 2, 2)])
        sampler_update(x, p, g_t, g_s, None, thresh="dynamic", impl="triton")


def test_update_validation():
    x, p, n, g_t, g_s = _update_inputs([(2, 3, 4, 4), (2, 3, 2, 2)])
    with pytest.raises(ValueError, match="one entry per level"):
        sampler_update(x, p[:1], g_t, g_s)
    with pytest.raises(ValueError, match=r"pred\[1\]"):
        sampler_update(x, [p[0], p[0]], g_t, g_s)
    with pytest.raises(ValueError, match="g_s"):
        sampler_update(x, p, g_t, g_s[:, :1])
    with pytest.raises(ValueError, match="eta"):
        sampler_update(x, p, g_t, g_s, eta=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        sampler_update(x, p, g_t, g_s, thresh="soft")
    with pytest.raises(BackendUnavailable, match="some levels"):
        sampler_update(x, p, g_t, g_s, [n[0], None], impl="triton")
    x5, p5, _, g5, gs5 = _update_inputs([(1, 1, 2, 2)] * 5)
    with pytest.raises(BackendUnavailable, match="more than 4 levels"):  # the kernels take 4
        sampler_update(x5, p5, g5, gs5, impl="triton")
    img5, g5, n5 = _pyramid_inputs([1, 2, 4, 8, 16], 1, 1, 16, 16)
    with pytest.raises(BackendUnavailable, match="more than 4 levels"):
        noisy_pyramid(img5, [1, 2, 4, 8, 16], g5, n5, impl="triton")
    empty = [t[:0] for t in x]  # an empty batch: the ref backend's empty result, not a launch error
    x0, x_s, _ = sampler_update(empty, [t[:0] for t in p], g_t[:, :0], g_s[:, :0], [t[:0] for t in n])
    assert [tuple(t.shape) for t in x_s] == [(0, 3, 4, 4), (0, 3, 2, 2)]


def test_custom_ops_opcheck():
    img, g, noises = _pyramid_inputs([1, 2], 1, 2, 4, 4)
    for target in ("v", "eps"):  # eps: no target tensors
        torch.library.opcheck(ds._noisy_pyramid_op, (img, [1, 2], g, noises, [2.0, 1.0], target, "ref"))
    x, p, n, g_t, g_s = _update_inputs([(1, 2, 4, 4), (1, 2, 2, 2)])
    torch.library.opcheck(ds._sampler_update_op, (x, p, g_t, g_s, n, [2.0, 1.0], "v", None, "clip", "ref"))


@pytest.mark.gpu
def test_gpu_ops_at_model_shapes():
    img, g, noises = _pyramid_inputs([1, 4, 16], 2, 3, 256, 256, torch.bfloat16, "cuda")
    ref = noisy_pyramid(img.float(), [1, 4, 16], g, [n.float() for n in noises], target="v", impl="ref")
    tri = noisy_pyramid(img, [1, 4, 16], g, noises, target="v", impl="triton")
    low = noisy_pyramid(img, [1, 4, 16], g, noises, target="v", impl="ref")  # torch's own bf16 error
    for r, t, lo in zip(ref[1] + ref[2], tri[1] + tri[2], low[1] + low[2]):
        err_t, err_lo = (t.float() - r).abs().max().item(), (lo.float() - r).abs().max().item()
        assert err_t <= 2 * err_lo + 1e-3
