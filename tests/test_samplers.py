"""The joint sampler loop, CFG, partial starts and the side-by-side output, with stand-in models."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdm_fast.diffusion import (DiffusionConfig, NestedDiffusion, NestedDiffusionConfig, SamplerConfig,
                                inference_timesteps, tile_levels)


class TinyNested(nn.Module):
    """Stand-in with the model interface: one 1x1 conv per level, the masked mean of the conditioning as
    a bias; records its calls and its last micros."""

    nest_ratio = [4]
    is_temporal = [False]

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 3, 1) for _ in range(2)])
        self.calls = []

    def forward(self, x_t, times, conditioning, cond_mask, micros={}):
        self.calls.append((times.clone(), [x.shape for x in x_t], conditioning.shape[0]))
        self.micros = micros
        m = conditioning.new_ones(conditioning.shape[:2]) if cond_mask is None else cond_mask  # (B, T)
        bias = ((conditioning.mean(-1) * m).sum(1) / m.sum(1)).view(-1, 1, 1, 1)
        return [c(x) * 0.5 + bias[: x.shape[0]] for c, x in zip(self.convs, x_t)]


def _diffusion(steps=20, shifted=True, kind="V_PREDICTION", target=None, **kw):
    sc = SamplerConfig(num_diffusion_steps=steps, schedule_type="DEEPFLOYD", prediction_type=kind,
                       loss_target_type=target, schedule_shifted=shifted, schedule_shifted_power=2)
    return NestedDiffusion(NestedDiffusionConfig(sampler_config=sc, no_use_residual=True, **kw), [4], [False])


def _public_update(x_t, pred, g, gl, scale, noise, eta=None):
    """Public NestedSampler step for V_PREDICTION, CLIP, the DDPM posterior (eta None) or DDIM, written out."""
    x0 = ((x_t * g.sqrt() - pred * (1 - g).sqrt()) * scale).clip(-1, 1) / scale
    alpha = g / gl
    beta = 1 - alpha
    bt = beta * (1 - gl) / (1 - g)
    if eta is None:
        xs = x0 * beta * gl.sqrt() / (1 - g) + x_t * alpha.sqrt() * (1 - gl) / (1 - g)
    else:
        bt = eta**2 * bt
        xs = x0 * gl.sqrt() + (x_t - x0 * g.sqrt()) / (1 - g).sqrt() * (1 - gl - bt).sqrt()
    return xs + bt.sqrt() * noise if noise is not None else xs


@pytest.mark.parametrize("shifted,n,eta,target", [(True, 4, None, None), (False, 4, None, None), (True, 20, 0.5, None),
                                                  (True, 4, None, "DDPM")])
def test_loop_matches_public_sequence(shifted, n, eta, target):
    """n = 20 steps reach t = 1, where the public sampler draws no noise; DDIM with eta > 0 draws it too.
    The sampler reads the model's output as its prediction_type (v), whatever loss_target_type trains it
    (the public 256x256 and 1024x1024 configs: V_PREDICTION with a DDPM loss target)."""
    torch.manual_seed(0)
    diff, model = _diffusion(shifted=shifted, target=target), TinyNested()
    cond, mask = torch.randn(2, 5, 8), torch.ones(2, 5)
    sampler = diff.sampler(num_inference_steps=n, ddim_eta=eta)
    gen = torch.Generator().manual_seed(3)
    x = sampler.initial_noise(2, 3, 16, generator=gen)
    out = sampler.sample(diff.make_denoise(model, cond, mask), x, generator=gen)
    gen_ours = gen
    # the public loop, by hand, with the same random stream
    gen = torch.Generator().manual_seed(3)
    x = [torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)]
    ts = inference_timesteps(20, n)
    table = diff.schedule.gammas
    scales = [1.0, 1.0] if shifted else [4.0, 1.0]
    for t, s in zip(ts[:-1], ts[1:]):
        pred = model(x, torch.full((2,), t - 1), cond, mask)
        noise = [torch.randn(xi.shape, generator=gen) for xi in x] if t != 1 else [None, None]  # need_noise
        noise = noise if s > 0 else [None, None]  # drawn, times a zero variance
        x = [_public_update(x[i], pred[i], table[i, t], table[i, s], scales[i], noise[i], eta) for i in range(2)]
    assert torch.equal(gen.get_state(), gen_ours.get_state())  # the next batch draws the public noise
    for got, want, sc in zip(out, x, scales):
        torch.testing.assert_close(got, (want * sc).clamp(-1, 1), atol=1e-5, rtol=1e-5)
    times = [c[0][0].item() for c in model.calls[:n]]
    assert times == [t - 1 for t in ts[:-1]]  # one model call per step, at model time t - 1


class TinyPlain(nn.Module):
    """A plain (one-level) stand-in: one 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x_t, times, conditioning, cond_mask, micros={}):
        return self.conv(x_t) * 0.5


@pytest.mark.parametrize("n", [4, 20])
def test_plain_loop_draws_noise_as_the_public_sampler(n):
    """The public plain Sampler draws noise at every step but the one to s = 0 (NestedSampler: but the one
    from t = 1); 4 of 20 steps end at 5 -> 0, which draws nothing: a second batch on the same generator
    starts from the public noise."""
    sc = SamplerConfig(num_diffusion_steps=20, schedule_type="DEEPFLOYD", prediction_type="V_PREDICTION")
    diff, model = NestedDiffusion(DiffusionConfig(sampler_config=sc)), TinyPlain()
    sampler = diff.sampler(num_inference_steps=n)
    gen = torch.Generator().manual_seed(3)
    x = sampler.initial_noise(2, 3, 8, generator=gen)
    out = sampler.sample(diff.make_denoise(model, torch.zeros(2, 1, 4), None), x, generator=gen)
    gen_public = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=gen_public)
    ts = inference_timesteps(20, n)
    table = diff.schedule.gammas
    for t, s in zip(ts[:-1], ts[1:]):
        pred = model(x, None, None, None)
        noise = torch.randn(x.shape, generator=gen_public) if s != 0 else None  # need_noise=(time_step_last != 0)
        x = _public_update(x, pred, table[0, t], table[0, s], 1.0, noise)
    assert torch.equal(gen.get_state(), gen_public.get_state())
    torch.testing.assert_close(out[0], x.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_steps_yield_intermediates_and_ddim_is_deterministic():
    diff, model = _diffusion(), TinyNested()
    cond = torch.randn(2, 5, 8)
    sampler = diff.sampler(num_inference_steps=5, ddim_eta=0.0)
    x = sampler.initial_noise(2, 3, 16)
    steps = list(sampler.steps(diff.make_denoise(model, cond, None), x))
    assert [(st.t, st.s) for st in steps] == list(zip(sampler.timesteps[:-1], sampler.timesteps[1:]))
    assert [tuple(v.shape) for v in steps[-1].x0] == [(2, 3, 16, 16), (2, 3, 4, 4)]
    a = sampler.sample(diff.make_denoise(model, cond, None), x, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(diff.make_denoise(model, cond, None), x, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    anc = diff.sampler(num_inference_steps=5)
    c = anc.sample(diff.make_denoise(model, cond, None), x, generator=torch.Generator().manual_seed(1))
    d = anc.sample(diff.make_denoise(model, cond, None), x, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(c[0], d[0])
    assert all(v.abs().max() <= 1 for v in c)
    raw = diff.sampler(num_inference_steps=5, ddim_eta=0.0, threshold="none")  # x0 not clipped on the way
    last = list(raw.steps(diff.make_denoise(model, cond, None), x))[-1].x_s
    assert all(v.abs().max() > 1 for v in last)
    out = raw.sample(diff.make_denoise(model, cond, None), x)
    assert all(torch.equal(o, v.clamp(-1, 1)) for o, v in zip(out, last))  # the final sample is clipped


def test_classifier_free_guidance():
    diff, model = _diffusion(), TinyNested()
    cond, null = torch.randn(2, 5, 8), torch.zeros(1, 5, 8)
    x, times = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 4)], torch.tensor([7, 7])
    got = diff.make_denoise(model, cond, torch.ones(2, 5), 3.0, uncond_conditioning=null)(x, times)
    assert model.calls[-1][2] == 4  # one call on the doubled batch
    c = diff.predict(model, x, times, cond, None)
    u = diff.predict(model, x, times, null.expand(2, 5, 8), None)
    for g, ci, ui in zip(got, c, u):
        torch.testing.assert_close(g, ui + 3.0 * (ci - ui))
    stacked = diff.make_denoise(model, torch.cat([null.expand(2, 5, 8), cond]), None, 3.0)(x, times)
    assert all(torch.allclose(a, b) for a, b in zip(got, stacked))  # the public [uncond; cond] layout
    with pytest.raises(ValueError, match="2 x 2"):
        diff.make_denoise(model, cond, None, 3.0)(x, times)
    out = diff.sample(model, torch.cat([null.expand(2, 5, 8), cond]), None, 16, num_inference_steps=2,
                      guidance_scale=3.0)  # the stacked layout: a batch of 2
    assert [tuple(o.shape) for o in out] == [(2, 3, 16, 16), (2, 3, 4, 4)]


def test_guidance_null_rows_masks_and_micros():
    """What the model sees under guidance: the null padded to the captions' tokens with masked zeros, its
    mask (default: all of its own tokens) padded likewise, the captions' own mask (also
    without guidance), and per-sample micro-conditioning doubled with the batch (other entries as given)."""
    diff, model = _diffusion(), TinyNested()
    cond, mask = torch.randn(2, 5, 8), torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # (B, T, D), (B, T)
    null = torch.randn(1, 2, 8)  # two tokens, not zeros: the masks show in the masked mean
    x, times = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 4)], torch.tensor([7, 7])

    def want(null, null_mask):  # (1, t, D), (1, 5)
        u = diff.predict(model, x, times, F.pad(null, (0, 0, 0, 5 - null.shape[1])).expand(2, 5, 8),
                         null_mask.expand(2, 5))
        c = diff.predict(model, x, times, cond, mask)
        return [ui + 3.0 * (ci - ui) for ui, ci in zip(u, c)]

    micros = {"size": torch.tensor([16.0, 32.0]), "scale": torch.tensor(2.0), "crop": 3}
    got = diff.make_denoise(model, cond, mask, 3.0, micros, null, torch.tensor([[1.0, 0]]))(x, times)
    assert model.micros["size"].tolist() == [16, 32, 16, 32] and model.micros["scale"] is micros["scale"]
    assert model.micros["crop"] == 3
    for g, w in zip(got, want(null, torch.tensor([[1.0, 0, 0, 0, 0]]))):
        torch.testing.assert_close(g, w)
    got = diff.make_denoise(model, cond, mask, 3.0, uncond_conditioning=null[:, :1])(x, times)
    for g, w in zip(got, want(null[:, :1], torch.tensor([[1.0, 0, 0, 0, 0]]))):
        torch.testing.assert_close(g, w)
    got = diff.make_denoise(model, cond, mask, 3.0, uncond_conditioning=null)(x, times)  # both tokens count
    for g, w in zip(got, want(null, torch.tensor([[1.0, 1, 0, 0, 0]]))):
        torch.testing.assert_close(g, w)
    rows = torch.randn(2, 2, 8)  # one null per sample
    got = diff.make_denoise(model, cond, mask, 3.0, uncond_conditioning=rows, uncond_mask=torch.ones(2, 2))(x, times)
    for g, w in zip(got, want(rows, torch.tensor([[1.0, 1, 0, 0, 0]]))):
        torch.testing.assert_close(g, w)
    got = diff.make_denoise(model, cond, mask)(x, times)
    for g, w in zip(got, diff.predict(model, x, times, cond, mask)):
        torch.testing.assert_close(g, w)


def test_partial_start_and_step_counts():
    diff, model = _diffusion(), TinyNested()
    sampler = diff.sampler(num_inference_steps=10)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    start = sampler.noised_start(images, 7, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    eps = [torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)]
    for x, x0, e, g in zip(start, [images, F.avg_pool2d(images, 4)], eps, diff.schedule.gammas[:, 7]):
        torch.testing.assert_close(x, g.sqrt() * x0 + (1 - g).sqrt() * e)  # at step 7's gammas (shifted: scale 1)
    assert sampler.timesteps[6:8] == [8, 6]
    steps = list(sampler.steps(diff.make_denoise(model, torch.randn(2, 5, 8), None), start, start_t=7))
    assert steps[0].t == 6 and steps[-1].s == 0  # off the grid: from the next step down, as the public code
    steps = list(sampler.steps(diff.make_denoise(model, torch.randn(2, 5, 8), None), start, start_t=8))
    assert [st.t for st in steps] == [8, 6, 4, 2]
    model.calls.clear()
    diff.sample(model, torch.randn(2, 5, 8), None, 16, num_inference_steps=10, init_images=images, start_t=8)
    assert [c[0][0].item() for c in model.calls] == [7, 5, 3, 1]  # from step 8 down, at model time t - 1
    top = sampler.noised_start(images, 20)  # start_t may be N: from the top inference step, 19
    assert next(sampler.steps(diff.make_denoise(model, torch.randn(2, 5, 8), None), top, start_t=20)).t == 19
    with pytest.raises(ValueError, match="start step"):
        sampler.noised_start(images, 0)
    for bad in (0, -3, 21):  # start_t 0 ran no step and returned the noise as the image
        with pytest.raises(ValueError, match=r"start_t must be in \[1, 20\]"):
            next(sampler.steps(diff.make_denoise(model, torch.randn(2, 5, 8), None), start, start_t=bad))
    for bad in (0, 21):  # 0 ran all 20 steps
        with pytest.raises(ValueError, match="num_inference_steps"):
            diff.sampler(num_inference_steps=bad)
    for bad in (-0.5, float("nan"), float("inf")):  # NaN passed a "< 0" check: black images
        with pytest.raises(ValueError, match="ddim_eta must be None .* or a finite number >= 0"):
            diff.sampler(ddim_eta=bad)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number, got nan"):
        diff.make_denoise(model, torch.randn(2, 5, 8), None, guidance_scale=float("nan"))


def test_model_predicts_in_eval_mode_and_keeps_its_mode():
    """As the public Diffusion.sample (dropout off); the trainer's grids run between training steps."""
    diff, model = _diffusion(), TinyNested()
    modes = []
    model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    model.train()
    diff.sample(model, torch.randn(2, 5, 8), None, 16, num_inference_steps=2)
    assert modes == [False, False] and model.training


@pytest.mark.gpu
def test_unseeded_initial_noise_is_the_public_stream():
    """The public Diffusion.get_noise draws the top level on the CPU and moves it; the lower levels are
    drawn on the device (normal_ in get_xt_minus_1)."""
    sampler = _diffusion().sampler(num_inference_steps=2)
    torch.manual_seed(5)
    got = sampler.initial_noise(2, 3, 16, device="cuda")
    torch.manual_seed(5)
    top = torch.randn(2, 3, 16, 16).to("cuda")
    low = torch.empty(2, 3, 4, 4, device="cuda").normal_()
    assert torch.equal(got[0], top) and torch.equal(got[1], low)


def test_threshold_none_from_a_config_file():
    """``threshold_function: NONE`` is the public ThresholdType.NONE (it was read as a null and refused)."""
    cfg = NestedDiffusionConfig.from_dict({"sampler_config": {"threshold_function": "NONE",
                                                              "loss_target_type": "null"}, "no_use_residual": True})
    sc = cfg.sampler_config
    assert sc.threshold_function.name == "NONE" and sc.loss_target_type == sc.prediction_type  # null: the same
    diff = NestedDiffusion(cfg, [4], [False])
    assert diff.sampler().threshold == "none"


def test_dynamic_threshold_sampler_runs():
    diff, model = _diffusion(), TinyNested()
    out = diff.sample(model, torch.randn(2, 5, 8), None, 16, num_inference_steps=3, threshold="dynamic_if")
    assert all(v.abs().max() <= 1 for v in out)


def test_tile_levels_side_by_side():
    top, low = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 2, 2)
    grid = tile_levels([top, low], mode="nearest")
    assert grid.shape == (2, 3, 8, 16)
    torch.testing.assert_close(grid[..., 8:], top)  # lowest level first, as the public output_inner
    torch.testing.assert_close(grid[..., :8], F.interpolate(low, size=(8, 8), mode="nearest"))


def test_precompile_changes_nothing():
    """Sampler.precompile runs the first and last steps dry (no Triton JIT on CPU: nothing to compile),
    draws no random numbers and leaves the samples bit-identical."""
    diff, model = _diffusion(), TinyNested()
    cond = torch.randn(2, 5, 8)
    sampler = diff.sampler(num_inference_steps=5)
    x = sampler.initial_noise(2, 3, 16)
    denoise = diff.make_denoise(model, cond, None)
    a = sampler.sample(denoise, x, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    calls = len(model.calls)
    stats = sampler.precompile(denoise, x)
    assert stats.kernels == 0 and len(model.calls) == calls + 2  # the first and the last step, dry
    assert torch.equal(state, torch.get_rng_state())
    b = sampler.sample(denoise, x, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
