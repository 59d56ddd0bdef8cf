"""CUDA-graph runners: the static-buffer logic on CPU (capture skipped), replay == eager on a GPU."""
import pytest
import torch

import mdm_fast
from mdm_fast.diffusion import NestedDiffusion, NestedDiffusionConfig
from mdm_fast.engine import GraphedCallable, GraphedTrainStep, graphed_sampler_step, graphs
from test_config import CONFIGS
from test_fast_model import randomize, tiny_inputs, tiny_nested_config
from test_text import needs_minilm

DIFFUSION = dict(sampler_config=dict(num_diffusion_steps=100, prediction_type="V_PREDICTION",
                                     schedule_type="DEEPFLOYD", schedule_shifted=True),
                 use_vdm_loss_weights=False, use_double_loss=True, no_use_residual=True)


def tiny_setup(device="cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        model = randomize(mdm_fast.build_model("nested_unet", tiny_nested_config()), 0.02).eval()
    diffusion = NestedDiffusion.for_model(NestedDiffusionConfig.from_dict(DIFFUSION), model)
    _, _, cond, mask = tiny_inputs(2)
    return model, diffusion, cond.to(device), mask.to(device)


def test_graphed_callable_reuses_static_buffers_per_signature():
    calls = []

    def fn(xs, y):
        calls.append(1)
        return [x * 2 + y for x in xs]

    g = GraphedCallable(fn, capture=False)
    a = g([torch.ones(2), torch.zeros(3)], torch.tensor(1.0))
    b = g([torch.full((2,), 3.0), torch.ones(3)], torch.tensor(2.0))
    assert g.num_graphs == 1
    assert torch.equal(a[0], torch.full((2,), 3.0)) and torch.equal(b[1], torch.full((3,), 4.0))
    g([torch.ones(4), torch.zeros(3)], torch.tensor(1.0))
    assert g.num_graphs == 2
    g([torch.ones(2), torch.zeros(3)], torch.tensor(1.0, dtype=torch.float64))  # another dtype: its own buffers
    assert g.num_graphs == 3
    out = g([torch.ones(2, device="meta"), torch.zeros(3)], torch.tensor(1.0))  # another device: its own too
    assert g.num_graphs == 4 and out[0].device.type == "meta"


def test_graphed_callable_keys_on_constants_and_structure_and_clones_outputs():
    """A non-tensor argument and the arguments' structure (dict keys) are part of the signature: a new one
    runs with its own values, not a stale entry's. Outputs are clones (unless clone_outputs=False: the
    static buffers, which the next call overwrites)."""
    g = GraphedCallable(lambda d, k: d["x"] * k if "x" in d else d["y"] - k, capture=False)
    t = torch.ones(2)
    assert torch.equal(g({"x": t}, 2), torch.full((2,), 2.0)) and torch.equal(g({"x": t}, 3), torch.full((2,), 3.0))
    assert torch.equal(g({"y": t}, 3), torch.full((2,), -2.0)) and g.num_graphs == 3
    for clone in (True, False):
        identity = GraphedCallable(lambda x: x, capture=False, clone_outputs=clone)  # returns its static buffer
        first = identity(torch.ones(2))
        identity(torch.zeros(2))
        assert torch.equal(first, torch.ones(2) if clone else torch.zeros(2))


def test_graphed_callable_runs_signatures_beyond_max_graphs_eagerly():
    calls = []
    g = GraphedCallable(lambda x: calls.append(x.shape) or x + 1, capture=False, max_graphs=1)
    g(torch.ones(2))
    out = g(torch.ones(3))
    assert g.num_graphs == 1 and g.eager_calls == 1 and torch.equal(out, torch.full((3,), 2.0))
    g(torch.zeros(2))
    assert g.eager_calls == 1 and calls == [(2,), (3,), (2,)]


def sample(device, graphed):
    model, diffusion, cond, mask = tiny_setup(device)
    sampler = diffusion.sampler(num_inference_steps=4)
    denoise = diffusion.make_denoise(model, cond, mask, guidance_scale=3.0,
                                     uncond_conditioning=torch.zeros_like(cond[:1]),
                                     uncond_mask=torch.ones_like(mask[:1]))
    gen = torch.Generator(device).manual_seed(1)
    x_t = sampler.initial_noise(2, 3, 16, generator=gen, device=device)
    step_fn = graphed_sampler_step(sampler, denoise, capture=graphed) if graphed is not None else None
    steps = list(sampler.steps(denoise, x_t, generator=gen, step_fn=step_fn))
    return steps, step_fn


def test_sampler_step_fn_matches_the_plain_loop_on_cpu():
    plain, _ = sample("cpu", None)
    static, fn = sample("cpu", False)
    assert fn.num_graphs == 1 and len(plain) == len(static) == 4
    for a, b in zip(plain, static):
        for x, y in zip(a.x_s + a.x0, b.x_s + b.x0):
            assert torch.equal(x, y)


def test_a_sampler_step_whose_capture_fails_samples_eagerly(monkeypatch, caplog):
    """graphed_sampler_step falls back: a capture that fails (stood in for on the CPU) is logged, and the
    steps run eagerly from then on, giving the plain loop's samples."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "default_generators", (torch.Generator(),))
    monkeypatch.setattr(graphs, "end_generator_captures", lambda gens: None)

    def failing_capture(self, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedCallable, "_capture", failing_capture)
    plain, _ = sample("cpu", None)
    with caplog.at_level("WARNING"):
        eager, fn = sample("cpu", True)
    assert "capture failed" in caplog.text and not fn.capture
    for a, b in zip(plain, eager):
        assert all(torch.equal(x, y) for x, y in zip(a.x_s + a.x0, b.x_s + b.x0))


def loss_fn_for(model, diffusion):
    def loss_fn(images, cond, mask):
        return diffusion.loss(model, images, cond, mask)[0]
    return loss_fn


def test_train_step_runner_without_capture_trains():
    model, diffusion, cond, mask = tiny_setup()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = GraphedTrainStep(model, opt, loss_fn_for(model, diffusion), max_grad_norm=1.0, capture=False)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    before = [p.detach().clone() for p in model.parameters()]
    first = images.clone()
    loss = step(images, cond, mask)
    assert loss.shape == () and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    step(torch.zeros_like(images), cond, mask)  # copied into the runner's own buffers, not into the first batch
    assert torch.equal(images, first)
    with pytest.raises(ValueError, match="shapes"):
        step(images[:1], cond[:1], mask[:1])


def test_train_step_runner_without_capture_is_the_eager_step():
    """capture=False: each call is zero_grad, loss, backward, clip to max_grad_norm and the optimizer
    step on that call's batch: the parameters of those steps written out (SGD: clipping shows); set_lr
    reaches a float learning rate (0: a step that moves nothing)."""
    params = {}
    for runner in (False, True):
        model, diffusion, cond, mask = tiny_setup()
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_fn = loss_fn_for(model, diffusion)
        step = GraphedTrainStep(model, opt, loss_fn, max_grad_norm=1e-3, capture=False)
        for i in range(2):
            images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1  # (B, C, H, W)
            torch.manual_seed(10 + i)  # the loss's noise
            if runner:
                step(images, cond, mask)
            else:
                opt.zero_grad(set_to_none=True)
                loss_fn(images, cond, mask).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
                opt.step()
        params[runner] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params[False], params[True]))
    step.set_lr(0.0)
    step(images, cond, mask)
    assert all(torch.equal(a, b) for a, b in zip(params[True], model.parameters()))


def test_train_step_runner_rejects_optimizers_it_cannot_capture():
    model, diffusion, _, _ = tiny_setup()
    with pytest.raises(ValueError, match="capturable"):
        GraphedTrainStep(model, torch.optim.AdamW(model.parameters()), loss_fn_for(model, diffusion), capture=True)


@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager_sampling():
    plain, _ = sample("cuda", None)
    graphed, fn = sample("cuda", True)
    assert fn.num_graphs == 1
    for a, b in zip(plain, graphed):
        for x, y in zip(a.x_s, b.x_s):
            assert torch.equal(x, y)


@pytest.mark.gpu
def test_gpu_graphed_train_step_tracks_eager():
    """Capture does not change results: the capture restores the CUDA generator after its warm-up, so
    replay k draws the noise of eager step k from the same seed, and the loss curves agree step by step
    (to float rounding, which Adam carries on); the optimizer counts no warm-up step."""
    losses = {}
    for capture in (False, True):
        model, diffusion, cond, mask = tiny_setup("cuda")
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
        step = GraphedTrainStep(model, opt, loss_fn_for(model, diffusion), max_grad_norm=1.0, capture=capture)
        torch.manual_seed(0)
        images = torch.rand(2, 3, 16, 16, device="cuda") * 2 - 1
        losses[capture] = torch.stack([step(images, cond, mask) for _ in range(30)]).cpu()
        # replay k is step k: the capture's warm-up steps left no count (nor moments) in the optimizer
        assert all(state["step"].item() == 30 for state in opt.state.values()), capture
    torch.testing.assert_close(losses[True][:10], losses[False][:10], rtol=1e-2, atol=1e-4)
    assert abs(losses[True][-10:].mean() - losses[False][-10:].mean()) < 0.5 * losses[False][:5].mean()


@pytest.mark.gpu
def test_gpu_fast_training_tracks_the_reference_for_50_steps():
    """The same initial weights, data and noise draws, 50 AdamW steps in bf16: the fast model's loss
    curve follows the reference's step by step (bf16 rounding differs, so it may drift slowly)."""
    from mdm_fast.reference import build_model as build_reference

    curves = {}
    for fast in (False, True):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = randomize(build_reference("nested_unet", tiny_nested_config()), 0.02)
        if fast:
            model = mdm_fast.optimize(model)
        diffusion = NestedDiffusion.for_model(NestedDiffusionConfig.from_dict(DIFFUSION), model)
        _, _, cond, mask = tiny_inputs(4)
        cond, mask = cond.cuda(), mask.cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = torch.Generator("cuda").manual_seed(1)
        images = torch.rand(4, 3, 16, 16, device="cuda", generator=data) * 2 - 1
        losses = []
        for step in range(50):
            gen = torch.Generator("cuda").manual_seed(step)
            with torch.autocast("cuda", torch.bfloat16):
                loss = diffusion.loss(model, images, cond, mask, generator=gen)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[fast] = torch.tensor(losses)
    ref, fast = curves[False], curves[True]
    assert torch.allclose(fast[:10], ref[:10], rtol=0.05, atol=1e-3)  # step by step at first
    assert abs(fast[-10:].mean() - ref[-10:].mean()) < 0.1 * ref[-10:].mean()  # the same level at the end


@pytest.mark.gpu
def test_gpu_replay_draws_from_a_registered_generator_as_eager_calls_do():
    gen = torch.Generator("cuda")

    def fn(x):
        return x + torch.randn(x.shape, generator=gen, device="cuda")

    g = GraphedCallable(fn, generators=(gen,))
    x = torch.zeros(4, device="cuda")
    for seed in range(3):  # the warm-up's draws are undone: the first replay draws as the first call would
        gen.manual_seed(seed)
        replay = g(x)
        gen.manual_seed(seed)
        assert torch.equal(replay, fn(x))


@pytest.mark.gpu
def test_gpu_graphed_step_captures_a_ddp_backward(tmp_path, monkeypatch):
    """cuda_graphs: on under DDP: the last micro-step's graph holds NCCL's all-reduce (a one-rank group
    here, standing in for several), the others skip it; replays equal the same steps run eagerly."""
    import torch.distributed as dist

    from mdm_fast.train.distributed import DistInfo, wrap_model
    from mdm_fast.train.graphed_step import GraphedMicroSteps

    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        params = {}
        for capture in (True, False):
            model, diffusion, cond, mask = tiny_setup("cuda")
            model.train()
            ddp = wrap_model(model, DistInfo(0, 2, 0), "ddp", for_capture=True)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
            gen = torch.Generator("cuda")
            step = GraphedMicroSteps(list(model.parameters()), opt,
                                     lambda *a: diffusion.loss(ddp, *a, generator=gen), gen, accumulations=2,
                                     max_grad_norm=1.0, capture=capture, ddp=ddp)
            images = torch.rand(2, 3, 16, 16, device="cuda") * 2 - 1
            for i in range(4):
                for micro in range(2):
                    gen.manual_seed(10 * i + micro)
                    step.micro_step(images, cond, mask, last=micro == 1)
                stats, ok = step.update()
                assert float(ok) == 1.0 and torch.isfinite(stats["loss"])
            assert step.runner.num_graphs == 2 and step.eager_calls == 0  # with and without all-reduce
            params[capture] = [p.detach().clone() for p in model.parameters()]
        for a, b in zip(params[True], params[False]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_a_failed_capture_falls_back_to_eager_or_raises(monkeypatch, caplog):
    """eager_on_error: the failure is logged, after_warmup undoes the warm-up, the generator states are
    restored and the function runs eagerly from then on; otherwise the error propagates."""
    stand_in = torch.Generator().manual_seed(5)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "default_generators", (stand_in,))
    gen = torch.Generator().manual_seed(3)
    resets, calls = [], []

    def fn(x):
        calls.append(1)
        return x + torch.rand(x.shape, generator=gen)

    def failing_capture(self, args):
        self.fn(*args)  # a warm-up run that draws, then the capture fails
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedCallable, "_capture", failing_capture)
    ended = []  # the generators taken out of capture mode (PyTorch leaves them in it after a failure)
    monkeypatch.setattr(graphs, "end_generator_captures", lambda gens: ended.append(list(gens)))
    g = GraphedCallable(fn, capture=True, generators=(gen,), after_warmup=lambda: resets.append(1),
                        eager_on_error=True)
    with caplog.at_level("WARNING"):
        out = g(torch.zeros(3))
    assert "capture failed" in caplog.text and resets == [1] and not g.capture
    assert ended == [[gen, stand_in]]
    gen.manual_seed(3)
    assert torch.equal(out, torch.rand(3, generator=gen))  # the eager call drew what a first call draws
    g(torch.zeros(3))
    assert len(calls) == 3 and g.num_graphs == 1
    strict = GraphedCallable(fn, capture=True, generators=(gen,))
    with pytest.raises(RuntimeError, match="stream is capturing"):
        strict(torch.zeros(3))
    assert len(ended) == 2

    def broken(gens):
        raise RuntimeError("an illegal memory access was encountered")

    monkeypatch.setattr(graphs, "end_generator_captures", broken)
    with pytest.raises(RuntimeError, match="cuda_graphs: off"):
        GraphedCallable(fn, capture=True, generators=(gen,), eager_on_error=True)(torch.zeros(3))


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operators that read a device value back to the host (a CUDA-graph capture fails on
    them, and an eager step stalls): .item()/bool()/float() of a tensor, data-dependent shapes; and
    tensors made from host data (torch.tensor(...): a host-to-device copy on a GPU, refused in a capture)."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
               "aten.equal", "aten.is_nonzero", "aten.lift_fresh")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        masks = name.startswith(("aten.index.Tensor", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or []))
        if name.startswith(self.SYNCING) or masks or (name.startswith("aten.repeat_interleave.Tensor")
                                                      and kwargs.get("output_size") is None):
            self.found.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("eta", [None, 0.0], ids=["ddpm", "ddim"])
def test_the_captured_steps_read_nothing_back_to_the_host(eta):
    """What the graphs capture, run on CPU under a detector: the training micro-step (fast model with
    masked cross-attention, nested diffusion loss), the update (clip, fused AdamW, zero, device-side EMA
    skip) and the sampling step with guidance."""
    from mdm_fast.train import ModelEma
    from mdm_fast.train.graphed_step import GraphedMicroSteps

    model, diffusion, cond, mask = tiny_setup()
    model.train()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = GraphedMicroSteps(list(model.parameters()), opt, lambda *a: diffusion.loss(model, *a, generator=gen),
                             gen, accumulations=2, max_grad_norm=1.0, capture=False)
    ema = ModelEma(model, 0.9, warmup_steps=1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    step.micro_step(images, cond, mask, last=False)  # the buffers exist before the detector watches
    with _HostSyncs() as watch:
        step.micro_step(images, cond, mask, last=True)
        _, ok = step.update()
        ema.update(model, skipped=1.0 - ok)
    assert watch.found == []
    model.eval()
    sampler = diffusion.sampler(num_inference_steps=4, ddim_eta=eta)
    null, null_mask = torch.zeros_like(cond[:1]), torch.ones_like(mask[:1])
    denoise = diffusion.make_denoise(model, cond, mask, guidance_scale=3.0, uncond_conditioning=null,
                                     uncond_mask=null_mask)
    x_t = sampler.initial_noise(2, 3, 16, generator=gen)
    fn = graphed_sampler_step(sampler, denoise, capture=False)
    steps = sampler.steps(denoise, x_t, generator=gen, step_fn=fn)
    next(steps)
    with _HostSyncs() as watch:
        next(steps)
    assert watch.found == []


@pytest.mark.parametrize("stem", ["256x256", "1024x1024"])
def test_the_public_models_steps_read_nothing_back(monkeypatch, stem):
    """The public 256x256 and 1024x1024 configs (mixed ratios, micro-conditioning, text projection,
    both nesting levels): their diffusion loss and backward, and a guided sampling step, on fake tensors
    (shapes only, seconds) with the backends a GPU picks: no operator a CUDA-graph capture would refuse."""
    import warnings

    import yaml
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mdm_fast.config import load_experiment
    from mdm_fast.ops import dispatch

    monkeypatch.setattr(dispatch, "triton_reason", lambda *t: None)  # fake CUDA: the triton custom ops
    raw = yaml.safe_load((CONFIGS / f"cc12m_{stem}.yaml").read_text())
    raw["unet_config"]["initialize_inner_with_pretrained"] = None
    cfg = load_experiment(raw)
    size = int(stem.split("x")[0])
    with warnings.catch_warnings(), FakeTensorMode():
        warnings.simplefilter("ignore")
        model = mdm_fast.build_model(cfg.model, cfg.unet_dict(2048))
        diffusion = NestedDiffusion.for_model(cfg.diffusion_config, model)
        images, cond, mask = torch.rand(2, 3, size, size) * 2 - 1, torch.randn(2, 77, 2048), torch.ones(2, 77)
        with _HostSyncs() as watch:
            loss, _ = diffusion.loss(model, images, cond, mask, generator=torch.Generator())
            loss.backward()
        model.eval()  # and a sampling step with guidance
        sampler = diffusion.sampler(num_inference_steps=4)
        denoise = diffusion.make_denoise(model, cond, mask, guidance_scale=7.5,
                                         uncond_conditioning=torch.zeros(1, 77, 2048), uncond_mask=torch.ones(1, 77))
        gen = torch.Generator()
        steps = sampler.steps(denoise, sampler.initial_noise(2, 3, size, generator=gen), generator=gen)
        with _HostSyncs() as sampling:
            next(steps)
    assert watch.found == [] and sampling.found == []


def _generate_twice_with_and_without_a_cache(device):
    from mdm_fast.text import ClassLabelEncoder
    from mdm_fast.train.grids import generate

    model, diffusion, _, _ = tiny_setup(device)
    encoder = ClassLabelEncoder(24)  # the tiny model's conditioning width

    def run(cache, prompts, seed):
        return generate(diffusion, model, encoder, prompts, 1, 16, torch.device(device), steps=3, guidance=2.0,
                        seed=seed, cache=cache)

    cache = {}
    shared = [run(cache, ["1", "2"], 0), run(cache, ["5", "7"], 1)]
    fresh = [run(None, ["1", "2"], 0), run(None, ["5", "7"], 1)]
    return cache, shared, fresh, run


def test_generate_reuses_its_sampler_and_buffers_across_batches(monkeypatch):
    """mdm-fast sample's batches: one pipeline per shape, the second batch's conditioning copied into
    the first's buffers, the same images as separate calls; the shapes used last are kept."""
    import mdm_fast.train.grids as grids

    monkeypatch.setattr(grids, "MAX_PIPELINES", 4)
    cache, shared, fresh, run = _generate_twice_with_and_without_a_cache("cpu")
    assert len(cache) == 1
    for a, b in zip(shared, fresh):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    run(cache, ["3"], 2)  # another batch size: another pipeline
    assert len(cache) == 2
    first = next(iter(cache.values()))
    for n in (3, 4, 5):  # the cache keeps the MAX_PIPELINES shapes used last
        run(cache, ["1"] * n, n)
    assert len(cache) == 4 and first not in cache.values()
    pipes = list(cache.values())
    run(cache, ["2"] * 3, 6)  # a hit moves its shape to the newest end: the next new shape evicts another
    run(cache, ["2"] * 6, 7)
    assert pipes[1] in cache.values() and pipes[0] not in cache.values()


@pytest.mark.gpu
def test_gpu_generate_replays_one_captured_step_across_batches():
    cache, shared, fresh, _ = _generate_twice_with_and_without_a_cache("cuda")
    (pipe,) = cache.values()
    assert pipe.step_fn is not None and pipe.step_fn.num_graphs == 1
    for a, b in zip(shared, fresh):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
def test_gpu_generate_shapes_taking_turns_share_a_pool_and_match_uncached_calls():
    """The captured steps of two batch shapes share one memory pool; taking turns (A, B, A, B, under bf16
    autocast as mdm-fast sample runs), every batch gives the images of a fresh, uncached call."""
    from mdm_fast.text import ClassLabelEncoder
    from mdm_fast.train.grids import generate

    model, diffusion, _, _ = tiny_setup("cuda")
    model.requires_grad_(False)  # as mdm-fast sample loads it: one set of cast weights for both shapes
    encoder = ClassLabelEncoder(24)

    def run(cache, prompts, seed):
        return generate(diffusion, model, encoder, prompts, 1, 16, torch.device("cuda"), steps=3, guidance=2.0,
                        seed=seed, cache=cache, autocast=torch.bfloat16)

    turns = [(["1", "2"], 0), (["3"], 1), (["5", "7"], 2), (["4"], 3)]
    cache = {}
    shared = [run(cache, prompts, seed) for prompts, seed in turns]
    assert len(cache) == 2 and len({pipe.pool for pipe in cache.values()}) == 1
    assert all(pipe.step_fn.num_graphs == 1 for pipe in cache.values())
    fresh = [run(None, prompts, seed) for prompts, seed in turns]
    for a, b in zip(shared, fresh):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def _two_samplers(device, monkeypatch):
    """Two bf16 samplers of one model being trained (so each casts its own copies), the first's inputs, and
    a count of the text projections' folds (the weights the model derives from a set of copies)."""
    from mdm_fast.models.text_kv import TextProjections

    folds, fold = [], TextProjections._folded
    monkeypatch.setattr(TextProjections, "_folded", lambda self, dtype: folds.append(1) or fold(self, dtype))
    model, diffusion, cond, mask = tiny_setup(device)
    x_t = [torch.randn(2, 3, 16, 16, device=device), torch.randn(2, 3, 8, 8, device=device)]
    times = torch.tensor([0.3, 0.7], device=device)
    first = diffusion.make_denoise(model, cond, mask, autocast=torch.bfloat16)
    second = diffusion.make_denoise(model, cond[:1], mask[:1], autocast=torch.bfloat16)
    return first, second, x_t, times, folds


def test_two_samplers_keep_their_own_derived_weights(monkeypatch):
    """Each sampler's cast copies keep what the model derives from them while the other runs: the first,
    called again after the second, folds nothing anew (a captured step reads them at fixed addresses)."""
    first, second, x_t, times, folds = _two_samplers("cpu", monkeypatch)
    with torch.no_grad():
        want = first(x_t, times)
        second([x[:1] for x in x_t], times[:1])
        assert len(folds) == 2
        again = first(x_t, times)
    assert len(folds) == 2 and all(torch.equal(a, b) for a, b in zip(again, want))


@pytest.mark.gpu
def test_gpu_a_captured_sampler_replays_right_after_another_ran(monkeypatch):
    """The first sampler's captured step, replayed after the second one ran (and the memory it freed was
    written over), still gives its eager result: its derived weights stayed alive."""
    first, second, x_t, times, _ = _two_samplers("cuda", monkeypatch)
    with torch.no_grad():
        want = first(x_t, times)
        graphed = GraphedCallable(first)
        assert all(torch.equal(a, b) for a, b in zip(graphed(x_t, times), want))
        second([x[:1] for x in x_t], times[:1])
        junk = [torch.full((1 << k,), float("nan"), device="cuda") for k in range(8, 22) for _ in range(4)]
        got = graphed(x_t, times)
    del junk
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_denoise_under_autocast_runs_the_model_in_bf16_and_returns_x_t_dtype():
    """make_denoise(autocast=bfloat16): the model's convolutions see bf16, the predictions (and the guidance
    combination) come back in float32, close to the fp32 ones."""
    model, diffusion, cond, mask = tiny_setup("cpu")
    seen = []
    model.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x_t = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    times = torch.tensor([0.3, 0.7])
    uncond, umask = torch.zeros(1, *cond.shape[1:]), torch.ones(1, mask.shape[1])
    outs = {}
    for dtype in (None, torch.bfloat16):
        denoise = diffusion.make_denoise(model, cond, mask, guidance_scale=3.0, uncond_conditioning=uncond,
                                         uncond_mask=umask, autocast=dtype)
        with torch.no_grad():
            outs[dtype] = denoise(x_t, times)
    assert seen == [torch.float32, torch.bfloat16]
    for a, b in zip(outs[None], outs[torch.bfloat16]):
        assert b.dtype == torch.float32
        # relative: the predictions are ~0.05 (an atol of 0.05 passed zeros); bf16 is ~1.5% off here
        assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item()


def test_guidance_null_with_fewer_tokens_is_padded_with_masked_zeros():
    """A one-token null (TextEncoder.null) against captions of 5 tokens: padded with masked zero tokens,
    the null the trainer's conditioning dropout shows the model (it failed to concatenate before)."""
    model, diffusion, cond, mask = tiny_setup()
    one = diffusion.make_denoise(model, cond, mask, guidance_scale=3.0, uncond_conditioning=torch.zeros(1, 1, 24),
                                 uncond_mask=torch.ones(1, 1))
    first_only = torch.zeros(1, 5)
    first_only[:, 0] = 1
    full = diffusion.make_denoise(model, cond, mask, guidance_scale=3.0, uncond_conditioning=torch.zeros(1, 5, 24),
                                  uncond_mask=first_only)
    x_t, times = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)], torch.tensor([10, 500])
    assert all(torch.equal(a, b) for a, b in zip(one(x_t, times), full(x_t, times)))


def _minilm_model(monkeypatch):
    """The tiny nested model at MiniLM's width (384), its diffusion and the MiniLM encoder (offline)."""
    from mdm_fast.text import minilm_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = dict(tiny_nested_config(), conditioning_feature_dim=384)
    torch.manual_seed(0)
    model = randomize(mdm_fast.build_model("nested_unet", cfg), 0.02)
    diffusion = NestedDiffusion.for_model(NestedDiffusionConfig.from_dict(DIFFUSION), model)
    return model, diffusion, minilm_encoder(16)


@needs_minilm
def test_text_prompts_sample_with_guidance(monkeypatch):
    """Captions through a real text encoder (MiniLM, offline) and classifier-free guidance: the one-token
    null meets captions of several tokens."""
    from mdm_fast.train.grids import generate

    model, diffusion, encoder = _minilm_model(monkeypatch)
    levels = generate(diffusion, model, encoder, ["a red car", "a dog on the beach at night"], 2, 16,
                      torch.device("cpu"), steps=3, guidance=3.0)
    assert [tuple(x.shape) for x in levels] == [(4, 3, 16, 16), (4, 3, 8, 8)]
    assert all(torch.isfinite(x).all() for x in levels)


@needs_minilm
def test_captions_of_several_lengths_taking_turns_in_one_cache_give_the_uncached_images(monkeypatch):
    """mdm-fast sample with captions: each caption length is a batch shape (a pipeline of its own); under
    bf16 autocast, as on a GPU, the pipelines share one set of cast weights, and batches of two lengths
    taking turns give the images of uncached calls."""
    from mdm_fast.models import CastWeights
    from mdm_fast.train.grids import generate

    casts, cast_init = [], CastWeights.__init__
    monkeypatch.setattr(CastWeights, "__init__", lambda self, *a: casts.append(1) or cast_init(self, *a))
    model, diffusion, encoder = _minilm_model(monkeypatch)
    model.eval().requires_grad_(False)  # as mdm-fast sample loads it
    turns = [["a red car"], ["a dog on the beach at night"], ["a blue car"], ["a cat on the roof at noon"]]

    def run(cache, prompts, seed):
        return generate(diffusion, model, encoder, prompts, 1, 16, torch.device("cpu"), steps=2, guidance=3.0,
                        seed=seed, cache=cache, autocast=torch.bfloat16)

    cache = {}
    shared = [run(cache, prompts, seed) for seed, prompts in enumerate(turns)]
    assert len(cache) == 2 and len(casts) == 1  # two caption lengths, one set of cast weights
    fresh = [run(None, prompts, seed) for seed, prompts in enumerate(turns)]
    for a, b in zip(shared, fresh):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@needs_minilm
def test_a_cached_batch_of_padded_captions_reads_its_own_mask(monkeypatch):
    """Two batches of one shape whose captions pad differently (the same two, swapped): the second copies
    its text mask, not only its embeddings, into the cached pipeline's buffers: the uncached images."""
    from mdm_fast.train.grids import generate

    model, diffusion, encoder = _minilm_model(monkeypatch)
    model.eval().requires_grad_(False)
    batches = [["a red car", "a dog on the beach at night"], ["a dog on the beach at night", "a red car"]]

    def run(cache, prompts):
        return generate(diffusion, model, encoder, prompts, 1, 16, torch.device("cpu"), steps=2, guidance=3.0,
                        seed=0, cache=cache)

    cache = {}
    shared = [run(cache, prompts) for prompts in batches]
    assert len(cache) == 1
    for a, b in zip(shared, [run(None, prompts) for prompts in batches]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@needs_minilm
def test_a_negative_prompt_longer_than_the_prompts_is_the_guidance_null(monkeypatch):
    """generate(negative_prompt=) as the public code samples it: the prompt and the (longer) negative
    prompt encoded in one batch, padded to the longer, the negative prompt's row the unconditional one;
    the same images as that loop by hand, and not those of the empty caption's null."""
    from mdm_fast.train.grids import generate

    model, diffusion, encoder = _minilm_model(monkeypatch)
    cpu = torch.device("cpu")
    prompt, negative = "a red car", "a blurry dark photo of a dog on the beach at night"
    got = generate(diffusion, model, encoder, [prompt], 1, 16, cpu, steps=3, guidance=3.0, negative_prompt=negative)
    both, mask = encoder.encode_text([prompt, negative], cpu)  # (2, T, 384), (2, T): T the negative's tokens
    assert mask[0].sum() < mask[1].sum() == mask.shape[1]
    denoise = diffusion.make_denoise(model, both[:1], mask[:1], guidance_scale=3.0, uncond_conditioning=both[1:],
                                     uncond_mask=mask[1:])
    sampler, gen = diffusion.sampler(num_inference_steps=3), torch.Generator().manual_seed(0)
    for step in sampler.steps(denoise, sampler.initial_noise(1, 3, 16, generator=gen), generator=gen):
        pass
    for a, b in zip(got, sampler.to_images(step.x_s)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    plain = generate(diffusion, model, encoder, [prompt], 1, 16, cpu, steps=3, guidance=3.0)
    assert (got[0] - plain[0]).abs().max() > 1e-3


def test_the_models_suite_trainer_variant_runs_its_logic():
    """benchmarks.models' "trainer step" variant (the step mdm-fast train replays), without a graph on
    the CPU: it trains, and its stats are device values."""
    from benchmarks.models import trainer_step_fn

    model, _, cond, mask = tiny_setup()
    model.train()
    x_t, times, _, _ = tiny_inputs(2)
    before = [p.detach().clone() for p in model.parameters()]
    step = trainer_step_fn(model, (x_t, times, cond, mask))
    for _ in range(2):
        stats, ok = step()
    assert float(ok) == 1.0 and torch.isfinite(stats["loss"]) and torch.isfinite(stats["grad_norm"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_models_suite_trains_the_fast_model_as_the_trainer_does():
    """benchmarks.models' train rows: the fast model's weights cast by one multi-tensor copy per step
    (CastEachCall, as the Trainer), the reference's by autocast per layer (the public code)."""
    from benchmarks.models import step_model
    from mdm_fast.models import CastEachCall
    from mdm_fast.reference import build_model as build_reference

    fast, _, _, _ = tiny_setup()
    assert isinstance(step_model(fast), CastEachCall)
    ref = build_reference("nested_unet", tiny_nested_config())
    assert step_model(ref) is ref
