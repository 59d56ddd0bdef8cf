"""Every Triton kernel the fast model launches compiles for sm_90 (H100/H200), on any machine.

The CPU suites run the kernels under TRITON_INTERPRET=1, which accepts programs the real compiler rejects
and never allocates registers or shared memory. Here a subprocess imports the kernels compiled (the
interpreter is switched on for our dispatch only after the import, so CPU tensors take the triton
backend where a GPU's tensors would) and routes every launch to the compile-only driver: each one
compiles for sm_90 with the specialisations a GPU would see, every autotune candidate included, and is
recorded instead of run.

The public 256x256 and 1024x1024 models (their real channels, groups, heads and text width; 64 and
128 px instead of 256 and 1024 so the CPU keeps up) run a no-grad forward and a training step, forward
and backward, under bf16 autocast (the 256 model also in fp32), and so does the golden temporal case
(1-D attention over frames). The 256 model also runs the public training loss (its noisy-pyramid
kernel) and a guided sampler step (the sampler-update kernel) as the trainer and the sampler call them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import collections, importlib, json, os, pkgutil, sys, traceback, warnings
sys.path.insert(0, os.getcwd())
import torch
from triton.runtime import driver
import mdm_fast.kernels
from mdm_fast.engine.precompile import CompileOnlyDriver

launched = collections.Counter()
driver.set_active(CompileOnlyDriver(90, on_launch=lambda name, metadata, grid: launched.update([name])))
modules = [importlib.import_module(f"mdm_fast.kernels.{m.name}")
           for m in pkgutil.iter_modules(mdm_fast.kernels.__path__)]
os.environ["TRITON_INTERPRET"] = "1"  # our dispatch now lets CPU tensors take the (compiled) triton backend
for module in modules:
    if hasattr(module, "triton_interpreting"):
        module.triton_interpreting = lambda: False  # the Hopper configs, not the interpreter's
from mdm_fast.ops import dispatch
dispatch._on_interpreter = lambda args, kwargs: False  # "auto" picks triton where a GPU would

from benchmarks.models import TEXT_WIDTH, public_config
from mdm_fast import build_model
from mdm_fast.models import set_channels_last

def train_step(model, args, dtype=torch.bfloat16):  # a no-grad forward, then forward and backward
    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        with torch.no_grad():
            model(*args)
        sum(o.float().sum() for o in model(*args)).backward()

def model_step(stem, size, channels_last, dtype=torch.bfloat16):
    name, cfg, _ = public_config(stem)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(name, cfg)
    set_channels_last(model, channels_last)
    x = [torch.randn(1, 3, size // r, size // r) for r in model.resolution_ratios()]
    train_step(model, (x, torch.tensor([500]), torch.randn(1, 77, TEXT_WIDTH), torch.ones(1, 77)), dtype)

def loss_and_sampling_step():  # the 256 model's training loss (noisy pyramid) and a guided sampler step
    from benchmarks.models import CONFIGS
    from mdm_fast.config import load_experiment
    from mdm_fast.diffusion import NestedDiffusion
    exp = load_experiment(CONFIGS / "cc12m_256x256.yaml")
    name, cfg, _ = public_config("256x256")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(name, cfg)
    diffusion = NestedDiffusion.for_model(exp.diffusion_config, model)
    text, mask = torch.randn(2, 77, TEXT_WIDTH), torch.ones(2, 77)
    with torch.autocast("cpu", torch.bfloat16):
        diffusion.loss(model, torch.rand(2, 3, 64, 64) * 2 - 1, text, mask)[0].backward()
    sampler = diffusion.sampler(num_inference_steps=2)
    with torch.no_grad():
        denoise = diffusion.make_denoise(model, text, mask, guidance_scale=7.5, uncond_conditioning=text,
                                         uncond_mask=mask, autocast=torch.bfloat16)
        next(iter(sampler.steps(denoise, sampler.initial_noise(2, 3, 64))))

def golden_step(name):  # a golden case's config and inputs (the temporal one: 1-D attention over frames)
    from mdm_fast.reference.data import reference_dir
    case = torch.load(reference_dir() / "golden" / f"{name}.pt", weights_only=True)
    model = build_model(case["model"], case["unet_config"], case["input_channels"], case["output_channels"])
    model.load_state_dict(case["state_dict"])
    inp = case["inputs"]
    train_step(model, (inp["x_t"], inp["times"], inp["conditioning"], inp["cond_mask"]))

def reuse(first, then):
    # dk/dv at the 256 model's level 2 (256 tokens, 768 channels, 8 heads of 96; training batch 2): the
    # choice timed for `first` is made the 64x64 candidate (as a GPU may time it), then `then` runs
    from mdm_fast.kernels import attention as kern
    from mdm_fast.ops.attention import _kv_views, _out_view, _qkv_views
    def backward(token_major, masked):
        pixels = lambda c: (torch.empty(2, 256, c, dtype=torch.bfloat16).transpose(1, 2) if token_major
                            else torch.empty(2, c, 256, dtype=torch.bfloat16))  # (B, c, L)
        q, k, v = _qkv_views(pixels(3 * 768), 8)
        kc, vc = _kv_views(torch.empty(2, 77, 2 * 768, dtype=torch.bfloat16), 8)
        mask = torch.ones(2, 77, dtype=torch.bool) if masked else None
        out = _out_view(pixels(768), 8)
        kern.backward(out, q, k, v, kc, vc, mask, None, out, torch.empty(2, 2, 8, 256), 0.1, q, k, v, kc, vc)
    kern._bwd_dkdv_kernel.cache.clear()
    backward(*first)
    (key, _), = kern._bwd_dkdv_kernel.cache.items()
    picked = next(c for c in kern._bwd_dkdv_kernel.configs if c.kwargs == {"BLOCK_M": 64, "BLOCK_N": 64}
                  and c.num_warps == 8)
    kern._bwd_dkdv_kernel.cache[key] = picked
    backward(*then)

SCENARIOS = {
    "256 channels_last": lambda: model_step("256x256", 64, True),
    "256 nchw": lambda: model_step("256x256", 64, False),
    "1024 channels_last": lambda: model_step("1024x1024", 128, True),
    "256 channels_last fp32": lambda: model_step("256x256", 64, True, torch.float32),
    "temporal golden case": lambda: golden_step("nested_temporal_tiny"),
    "256 loss and sampling": loss_and_sampling_step,
    "masked then unmasked": lambda: reuse((True, True), (True, False)),
    "channel-major then token-major": lambda: reuse((False, False), (True, False)),
}
part, parts = map(int, sys.argv[1:])
for name in list(SCENARIOS)[part::parts]:
    launched.clear()
    try:
        SCENARIOS[name]()
        error = None
    except Exception as e:
        error = "".join(traceback.format_exception(e))[-3000:]
    print(json.dumps(dict(scenario=name, launched=dict(launched), error=error)), flush=True)
"""

@pytest.fixture(scope="module")
def results():
    """Two processes, half the script's scenarios each (compiling is single-threaded)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), "2"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-3000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["scenario"]: r for r in rows}


GROUP_NORM = {"_fwd_fused", "_bwd_fused", "_fwd_partial", "_fwd_finalize", "_fwd_split_apply", "_bwd_partial",
              "_bwd_finalize", "_bwd_split_apply"}
ATTENTION = {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
CHANNELS_LAST_ONLY = {"_concat_kernel", "_upsample_conv3x3_fwd"}  # NCHW takes PyTorch there


MODEL_STEPS = {  # scenario: the kernels it must launch
    "256 channels_last": GROUP_NORM | ATTENTION | CHANNELS_LAST_ONLY | {"_bias_add_kernel"},
    "256 nchw": {"_fwd_fused", "_bwd_fused", "_bias_add_kernel"} | ATTENTION,
    "1024 channels_last": GROUP_NORM | ATTENTION | CHANNELS_LAST_ONLY | {"_bias_add_kernel"},
    "256 channels_last fp32": GROUP_NORM | ATTENTION | CHANNELS_LAST_ONLY | {"_bias_add_kernel"},
    "temporal golden case": {"_fwd_fused", "_bwd_fused", "_bias_add_kernel"} | ATTENTION,
    "256 loss and sampling": {"_pyramid_kernel", "_update_kernel"} | GROUP_NORM | ATTENTION | CHANNELS_LAST_ONLY,
}
REUSES = ["masked then unmasked", "channel-major then token-major"]


def test_every_scenario_of_the_script_is_checked(results):
    assert sorted(results) == sorted([*MODEL_STEPS, *REUSES])


@pytest.mark.parametrize("scenario", MODEL_STEPS)
def test_model_training_step_compiles_for_sm90(results, scenario):
    r, kernels = results[scenario], MODEL_STEPS[scenario]
    assert r["error"] is None, r["error"]
    missing = kernels - set(r["launched"])
    assert not missing, f"not launched through triton (the test would not compile them): {missing}"


@pytest.mark.parametrize("scenario", REUSES)
def test_attention_choice_is_not_reused_where_it_does_not_fit(results, scenario):
    """dk/dv's 64x64 candidate for d 96 fits sm_90's shared memory with a text mask, or channel-major,
    but not token-major without a mask: a choice timed in one case must not be launched in the other
    (it would raise OutOfResources at the launch)."""
    r = results[scenario]
    assert r["error"] is None, r["error"]
    assert r["launched"].get("_bwd_dkdv_kernel", 0) >= 2
