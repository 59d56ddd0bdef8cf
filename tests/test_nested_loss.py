"""The nested training loss against a direct re-derivation of the public NestedDiffusion.get_loss."""
import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdm_fast.diffusion import DiffusionConfig, NestedDiffusion, NestedDiffusionConfig, SamplerConfig, prediction_kind
from mdm_fast.diffusion.schedules import gamma_table, shift_gammas, vdm_loss_weights
from mdm_fast.reference.data import reference_dir

GOLDEN = reference_dir() / "golden"
N = 50


class Stand(nn.Module):
    def __init__(self, levels, nest_ratio=(), is_temporal=()):
        super().__init__()
        if nest_ratio:
            self.nest_ratio, self.is_temporal = list(nest_ratio), list(is_temporal)
        self.convs = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1) for _ in range(levels)])
        self.seen = None

    def forward(self, x_t, times, conditioning, cond_mask, micros={}):
        single = torch.is_tensor(x_t)
        xs = [x_t] if single else x_t
        self.seen = [x.detach().clone() for x in xs]
        out = [c(x) + times[: x.shape[0]].view(-1, 1, 1, 1) / N for c, x in zip(self.convs, xs)]
        return out[0] if single else out


def _cfg(shifted=True, pred="V_PREDICTION", target="DDPM", **kw):
    sc = dict(num_diffusion_steps=N, schedule_type="DEEPFLOYD", prediction_type=pred, loss_target_type=target,
              schedule_shifted=shifted, schedule_shifted_power=2)
    return NestedDiffusionConfig.from_dict(dict(sampler_config=sc, **kw))


def _public_loss(model, images, cfg, scales, gen, mixed=None):
    """NestedDiffusion.get_loss of the public code, re-derived step by step (no temporal levels)."""
    sc = cfg.sampler_config
    B = images.shape[0]
    times = torch.randint(0, N, (B,), generator=gen)
    imgs = [images]
    for i in range(1, len(scales)):
        imgs.append(F.avg_pool2d(imgs[-1], scales[i - 1] // scales[i]))
    eps = [torch.randn(x.shape, generator=gen) for x in imgs]
    base = gamma_table(sc)
    g = [(shift_gammas(base, s, 2) if sc.schedule_shifted else base)[times + 1].view(-1, 1, 1, 1) for s in scales]
    x0 = [x / s if not sc.schedule_shifted else x for x, s in zip(imgs, scales)]
    x_t = [gi.sqrt() * x + (1 - gi).sqrt() * e for gi, x, e in zip(g, x0, eps)]
    keep = [B] * len(scales) if mixed is None else [int(m * B) for m in mixed]
    out = model([x[:k] for x, k in zip(x_t, keep)], times, None, None, {})
    out = [torch.cat([p, p.new_zeros(B - p.shape[0], *p.shape[1:])]) for p in out]
    w = [float(v) for v in cfg.multi_res_weights.split(":")] if cfg.multi_res_weights else [1.0] * len(scales)
    total = 0
    for i, (x, p, gi, e, xi0) in enumerate(zip(x_t, out, g, eps, x0)):
        xpred = x * gi.sqrt() - p * (1 - gi).sqrt()  # V -> x0
        p = (x - xpred * gi.sqrt()) / (1 - gi).sqrt()  # x0 -> eps (loss target DDPM)
        if i == 0 or cfg.use_double_loss:
            per = ((p - e) ** 2).mean(dim=(1, 2, 3))
            if mixed is not None:
                per = per / mixed[i]
                per[keep[i]:] = 0
        else:
            per = p.mean() * 0
        total = total + per * w[i]
    if cfg.use_vdm_loss_weights:
        vw = vdm_loss_weights(base)[times + 1]
        return (total * vw).sum() / vw.sum()
    return total.mean()


@pytest.mark.parametrize("shifted", [True, False])
@pytest.mark.parametrize("double,weights,vdm", [(True, "16:4:1", False), (False, None, True)])
def test_loss_matches_public_derivation_three_levels(shifted, double, weights, vdm):
    cfg = _cfg(shifted, use_double_loss=double, multi_res_weights=weights, no_use_residual=True,
               use_vdm_loss_weights=vdm)
    model = Stand(3, [16, 4], [False, False])
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    diff = NestedDiffusion.for_model(cfg, model)
    loss, stats = diff.loss(model, images, None, None, generator=torch.Generator().manual_seed(5))
    want = _public_loss(model, images, cfg, [16, 4, 1], torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert set(stats) == {"times", "loss_level0"} | ({"loss_level1", "loss_level2"} if double else set())
    if not vdm:  # the mean loss is the weighted sum of the levels' mean MSEs
        torch.testing.assert_close(loss, sum(w * stats[f"loss_level{i}"] for i, w in enumerate([16, 4, 1])))
    loss.backward()
    assert all(c.weight.grad is not None for c in model.convs)


def test_mixed_ratio_trains_fewer_high_res_samples():
    cfg = _cfg(use_double_loss=True, no_use_residual=True, mixed_ratio="2:1", use_vdm_loss_weights=False)
    model = Stand(2, [4], [False])
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    loss, _ = NestedDiffusion.for_model(cfg, model).loss(model, images, None, None,
                                                         generator=torch.Generator().manual_seed(1))
    assert [x.shape[0] for x in model.seen] == [4, 6]
    want = _public_loss(model, images, cfg, [4, 1], torch.Generator().manual_seed(1), mixed=[2 / 3, 1.0])
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


def test_plain_unet_loss():
    cfg = DiffusionConfig(sampler_config=SamplerConfig(num_diffusion_steps=N, prediction_type="V_PREDICTION",
                                                       rescale_signal=2.0), use_vdm_loss_weights=False)
    model = Stand(1)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.tensor([3, 40])
    diff = NestedDiffusion(cfg)
    loss, stats = diff.loss(model, images, None, None, times=t, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = gamma_table(cfg.sampler_config)[t + 1].view(-1, 1, 1, 1)
    x0 = images / 2.0  # rescale_signal, in x_t and in the v target alike
    x_t = g.sqrt() * x0 + (1 - g).sqrt() * eps
    torch.testing.assert_close(model.seen[0], x_t)
    v = g.sqrt() * eps - (1 - g).sqrt() * x0
    torch.testing.assert_close(loss, ((model(x_t, t, None, None) - v) ** 2).mean(), atol=1e-6, rtol=1e-6)


def test_a_temporal_models_frame_grid_sets_the_pyramids():
    """for_model takes the frame grid from the model (the golden temporal model: 2x2 frames, not the public
    4x4): its lower level is frame 0 of the 4, where a 4x4 grid made it a mosaic of crops of frames 0 and
    2. The trainer refuses clips of another size than the grid."""
    from mdm_fast.reference import build_model
    from mdm_fast.train.trainer import _check_video_frames
    from test_reference import load_case

    case = load_case("nested_temporal_tiny")
    model = build_model(case["model"], case["unet_config"], case["input_channels"], case["output_channels"])
    diff = NestedDiffusion.for_model(_cfg(no_use_residual=True), model)
    assert model.frames_per_side() == diff.frames_per_side == 2 and diff.is_temporal[0]
    frames = torch.rand(4, 3, 8, 8) * 2 - 1  # 4 frames of 8x8, tiled 2x2 -> 16x16
    images = frames.unflatten(0, (2, 2)).permute(2, 0, 3, 1, 4).reshape(1, 3, 16, 16)
    x0, _, _, _ = diff.pyramid(images, torch.tensor([10]))
    torch.testing.assert_close(x0[1], frames[:1])
    with pytest.raises(ValueError, match=r"video_frames: 16, but the model takes clips of 4 frames \(a 2x2 grid"):
        _check_video_frames(argparse.Namespace(video_frames=16), diff)
    _check_video_frames(argparse.Namespace(video_frames=4), diff)


def test_temporal_levels_take_every_fourth_frame():
    cfg = _cfg(no_use_residual=True)
    model = Stand(2, [2], [True])
    diff = NestedDiffusion.for_model(cfg, model)  # frames_per_side=4, as the public loss
    frames = torch.rand(1, 16, 3, 4, 4) * 2 - 1  # 16 frames of 4x4 tiled 4x4 -> 16x16
    images = torch.zeros(1, 3, 16, 16)
    for k in range(16):
        images[0, :, (k // 4) * 4:(k // 4) * 4 + 4, (k % 4) * 4:(k % 4) * 4 + 4] = frames[0, k]
    x0, x_t, _, _ = diff.pyramid(images, torch.tensor([10]))
    want = torch.zeros(1, 3, 8, 8)
    for j, k in enumerate([0, 4, 8, 12]):  # x[:, ::4] of the 16 frames, re-tiled 2x2
        want[0, :, (j // 2) * 4:(j // 2) * 4 + 4, (j % 2) * 4:(j % 2) * 4 + 4] = frames[0, k]
    torch.testing.assert_close(x0[1], want)
    x0, x_t, tgt, eps = diff.pyramid(images, torch.tensor([10]), torch.Generator().manual_seed(0))
    g = diff.schedule.gammas[:, 11]  # each level at its own (shifted) gammas
    for i in range(2):
        torch.testing.assert_close(x_t[i], g[i].sqrt() * x0[i] + (1 - g[i]).sqrt() * eps[i])
        assert tgt[i] is eps[i]  # loss target DDPM
    loss, _ = diff.loss(model, images, None, None)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("nest,shifted,sizes", [([4], False, [16, 4]), ([16, 4], True, [32, 8, 2])])
def test_residual_from_low_resolution(nest, shifted, sizes):
    """Level i's prediction gains pred_from_x0(x_i, up(clip(x0_{i+1} * s_{i+1})) / s_i), lowest level first:
    x0_{i+1} from level i+1's corrected prediction at its own gammas (shifted: they differ per level)."""
    cfg = _cfg(shifted=shifted, pred="DDPM", target="DDPM", no_use_residual=False)
    model = Stand(len(sizes), nest, [False] * len(nest))
    diff = NestedDiffusion.for_model(cfg, model)
    x = [torch.randn(2, 3, n, n) for n in sizes]
    t = torch.tensor([5, 30])
    got = diff.predict(model, x, t, None, None)
    raw = model(x, t, None, None)
    g = diff.schedule.gammas[:, t + 1].view(len(sizes), -1, 1, 1, 1)  # (L, B, 1, 1, 1)
    scales = [1.0] * len(sizes) if shifted else nest + [1]  # signal scales
    want = list(raw)
    for i in reversed(range(len(sizes) - 1)):
        x0_lo = ((x[i + 1] - want[i + 1] * (1 - g[i + 1]).sqrt()) / g[i + 1].sqrt() * scales[i + 1]).clamp(-1, 1)
        up = F.interpolate(x0_lo, scale_factor=sizes[i] // sizes[i + 1], mode="bicubic") / scales[i]
        want[i] = raw[i] + (x[i] - up * g[i].sqrt()) / (1 - g[i]).sqrt()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.equal(got[-1], raw[-1])


def test_model_output_scale_squashes_every_level():
    """model_output_scale s: every level's prediction is s tanh(pred / s) (the public Model.forward; the
    public nested model skipped it)."""
    model = Stand(2, [4], [False])
    diff = NestedDiffusion.for_model(_cfg(no_use_residual=True, model_output_scale=0.5), model)
    x, t = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 4)], torch.tensor([5, 30])
    got, raw = diff.predict(model, x, t, None, None), model(x, t, None, None)
    assert all(r.abs().max() > 1 for r in raw)  # the squashing shows
    for a, r in zip(got, raw):
        torch.testing.assert_close(a, torch.tanh(r / 0.5) * 0.5)


def test_prediction_kinds_follow_the_public_sampler():
    """DDPM and DDIM predictions are both eps (public get_x0_eps_from_pred), V_PREDICTION is v."""
    assert [prediction_kind(p) for p in ("DDPM", "DDIM", "V_PREDICTION", "X0")] == ["eps", "eps", "v", "x0"]


def test_bad_configs_and_inputs():
    model = Stand(2, [4], [False])
    with pytest.raises(ValueError, match="NestedDiffusionConfig"):
        NestedDiffusion.for_model(DiffusionConfig(), model)
    with pytest.raises(ValueError, match="temporal"):
        NestedDiffusion(_cfg(), [2], [True])  # residual on by default
    with pytest.raises(ValueError, match="nest_ratio"):
        NestedDiffusion(_cfg(no_use_residual=True), [4, 8])
    diff = NestedDiffusion(_cfg(no_use_residual=True), [4])
    with pytest.raises(ValueError, match="divisible"):
        diff.loss(model, torch.rand(2, 3, 18, 18), None, None)
    with pytest.raises(ValueError, match="multi_res_weights"):
        NestedDiffusion(_cfg(use_double_loss=True, multi_res_weights="4:1", no_use_residual=True), [16, 4])


def test_reference_model_trains_and_samples():
    from mdm_fast.reference import build_model

    case = torch.load(GOLDEN / "nested2_tiny.pt", weights_only=True)
    model = build_model(case["model"], case["unet_config"], case["input_channels"], case["output_channels"])
    model.load_state_dict(case["state_dict"])
    cfg = _cfg(use_double_loss=True, multi_res_weights="16:4:1", no_use_residual=True)
    diff = NestedDiffusion.for_model(cfg, model)
    assert diff.ratios == [1, 2, 4]
    cond, mask = case["inputs"]["conditioning"], case["inputs"]["cond_mask"]
    loss, stats = diff.loss(model, torch.rand(2, 3, 32, 32) * 2 - 1, cond, mask)
    loss.backward()
    assert torch.isfinite(loss) and len([k for k in stats if k.startswith("loss_level")]) == 3
    out = diff.sample(model, cond, mask, 32, num_inference_steps=2, guidance_scale=2.0,
                      uncond_conditioning=torch.zeros_like(cond[:1]))
    assert [tuple(o.shape) for o in out] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
