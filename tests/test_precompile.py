"""mdm_fast.engine.precompile: the dry run collects the step's Triton compilations, the worker pool puts
them into Triton's disk cache, and the real step then compiles nothing.

Runs in a subprocess without the CPU interpreter, on the compile-only driver (sm_90 target, launches
recorded instead of run), so it needs no GPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys, tempfile
cache = os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
sys.path.insert(0, os.getcwd())
import torch
from triton.runtime import driver
from mdm_fast.engine.precompile import CompileOnlyDriver, precompile
launched = []
driver.set_active(CompileOnlyDriver(90, on_launch=lambda name, metadata, grid: launched.append(name)))
from mdm_fast.kernels import group_norm as gn, upsample_conv as uc
import triton

@triton.jit
def _main_kernel(X):  # defined in the script: a worker cannot import it, so the dry run submits it to none
    pass

def step():
    for shape in ((4, 64, 32, 32), (2, 96, 9, 13)):
        x, w = torch.empty(shape, dtype=torch.bfloat16), torch.empty(shape[1], dtype=torch.bfloat16)
        gn.forward(x, w, w, None, None, 32, 1e-5, True, False)
    x = torch.empty(2, 32, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    out = torch.empty(2, 64, 16, 16, dtype=torch.bfloat16).to(memory_format=torch.channels_last)  # 2 configs
    uc.upsample_conv3x3_fwd(x, torch.empty(2, 2, 2, 2, 32, 64, dtype=torch.bfloat16), None, out)
    _main_kernel[(1,)](out)
    return torch.rand(3)  # the generator's state must come back

rng = torch.get_rng_state()
stats = precompile(step, workers=2)
same_rng = bool(torch.equal(rng, torch.get_rng_state()))
dry_launches, cached = len(launched), sorted(os.listdir(cache))
step()
new = set(os.listdir(cache)) - set(cached)

from mdm_fast.engine.precompile import _compile_jobs, _skipping_compiles
class Launcher:  # stands in for the GPU driver's launcher class, which the workers build too
    built = []
    def __init__(self, src, metadata):
        Launcher.built.append(metadata.name)
jobs = []
with _skipping_compiles(jobs):
    gn.forward(torch.empty(2, 40, 5, 7), torch.empty(40), torch.empty(40), None, None, 8, 1e-5, True, False)
_compile_jobs(jobs, 90, 32, "__main__:Launcher")

import time
def compiles_while_running():  # a new specialisation, then wait inside the dry run for its compilation
    before = len(os.listdir(cache))
    gn.forward(torch.empty(2, 24, 6, 6), torch.empty(24), torch.empty(24), None, None, 4, 1e-5, True, False)
    deadline = time.time() + 240
    while len(os.listdir(cache)) == before and time.time() < deadline:
        time.sleep(0.2)
    during.append(len(os.listdir(cache)) > before)
during = []
precompile(compiles_while_running, workers=1)

from mdm_fast.engine.precompile import _Pool
pool = _Pool(1)  # a job that kills its worker, then one nobody takes: close() must not hang
pool.submit(("no_such_module", "kernel", "{}"))
pool.submit(jobs[0])
started, failed = pool.close()
print(json.dumps(dict(compiled_during_dry_run=during == [True], dead_pool=[started, failed],
                      kernels=stats.kernels, workers=stats.workers, failed_workers=stats.failed_workers,
                      dry_launches=dry_launches,
                      launches=len(launched), cached=len(cached), new_in_cache=len(new),
                      same_rng=same_rng, autotuned=len(uc._upsample_conv3x3_fwd.cache),
                      launcher_jobs=len(jobs), launchers_built=len(Launcher.built))))
"""


def _run(script_dir, extra_env=None):
    """SCRIPT as a user's file without a ``__main__`` guard (workers must not re-run it)."""
    script = script_dir / "step.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("precompile"))


def test_dry_run_launches_nothing_and_collects_every_kernel(result):
    """Every kernel the workers can import (not the script's own: no worker failed on it)."""
    assert result["dry_launches"] == 0
    assert result["kernels"] >= 4  # two group-norm plans and the upsample-conv's two configs
    assert result["workers"] == 2 and result["failed_workers"] == 0


def test_real_step_finds_every_kernel_in_the_cache(result):
    assert result["cached"] >= result["kernels"]
    assert result["new_in_cache"] == 1  # nothing compiled by the real step but the script's own kernel
    # the autotuner, which forgot the dry run's choice, benchmarks each config then launches the chosen one;
    # and the script's kernel
    assert result["launches"] == result["kernels"] + 2
    assert result["autotuned"] == 1  # chosen by the real step, not by the dry run's empty timings


def test_workers_compile_while_the_dry_run_goes_on(result):
    assert result["compiled_during_dry_run"]


def test_a_worker_that_dies_is_reported_and_does_not_hang_the_pool(result):
    assert result["dead_pool"] == [1, 1]


def test_workers_build_the_launchers_of_the_kernels_they_compile(result):
    assert result["launcher_jobs"] >= 1 and result["launchers_built"] == result["launcher_jobs"]


def test_random_state_is_restored(result):
    assert result["same_rng"]


def test_can_be_turned_off(tmp_path):
    with pytest.raises(AssertionError):  # precompile returns None: the script cannot read its stats
        _run(tmp_path, {"MDM_FAST_PRECOMPILE": "0"})


GPU_SCRIPT = r"""
import json, os, sys, tempfile
cache = os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
sys.path.insert(0, "tests")
import torch
import mdm_fast
from mdm_fast.engine import precompile
from test_fast_model import randomize, tiny_inputs, tiny_nested_config

torch.manual_seed(0)
model = randomize(mdm_fast.build_model("nested_unet", tiny_nested_config())).cuda().eval()
args = [a.cuda() if torch.is_tensor(a) else [t.cuda() for t in a] for a in tiny_inputs(batch=4)]

def forward():
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        return model(*args)

stats = precompile(forward)
cached = set(os.listdir(cache))
out = forward()
again = forward()
new = sorted(f for d in set(os.listdir(cache)) - cached for f in os.listdir(os.path.join(cache, d)))
print(json.dumps(dict(kernels=stats.kernels, new_in_cache=new,
                      equal=all(torch.equal(a, b) for a, b in zip(out, again)),
                      finite=all(bool(torch.isfinite(o).all()) for o in out))))
"""


@pytest.mark.gpu
def test_gpu_precompiled_model_step_compiles_nothing():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", GPU_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["kernels"] > 0 and r["equal"] and r["finite"]
    assert r["new_in_cache"] == []  # no kernel, no launcher stub compiled by the real step


def test_precompile_training_leaves_model_and_grads_untouched():
    import torch

    from mdm_fast.engine import precompile_training

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    model[0].weight.requires_grad_(False)  # a frozen part is skipped
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(3, 4)
    stats = precompile_training(lambda: model(x).square().mean(), model.parameters())
    assert stats.kernels == 0  # nothing to compile on CPU
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_precompile_training_runs_the_backward_under_no_grad(monkeypatch):
    """A caller under no_grad (a sampler's set-up, an evaluation loop) still gets the backward's kernels."""
    import torch

    from mdm_fast.engine import precompile_training

    calls, grad = [], torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    model, x = torch.nn.Linear(4, 1), torch.randn(3, 4)
    with torch.no_grad():
        precompile_training(lambda: model(x).square().mean(), model.parameters())
    assert calls == [1]


def test_a_failing_dry_run_is_skipped_with_a_warning(caplog):
    import torch

    from mdm_fast.engine import precompile

    def step():
        torch.rand(2)
        raise RuntimeError("garbage in, garbage out")

    state = torch.get_rng_state()
    with caplog.at_level("WARNING"):
        assert precompile(step) is None
    assert "dry run failed" in caplog.text and "garbage in" in caplog.text
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("affinity, local_world, want", [
    (64, None, 16),  # one process: every CPU, at most MAX_WORKERS
    (64, "8", 8),  # 8 torchrun processes on the node: an eighth each
    (12, "8", 1),  # fewer CPUs than processes: still one worker
    (6, "8", 6),  # pinned to 6 of the machine's CPUs already (numactl): all of those
])
def test_default_workers_share_the_machine_among_a_nodes_processes(monkeypatch, affinity, local_world, want):
    import importlib

    pc = importlib.import_module("mdm_fast.engine.precompile")  # the module, not the function of its name
    monkeypatch.setattr(pc.os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(pc.os, "cpu_count", lambda: 12 if affinity == 12 else 64)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert pc.default_workers() == want
