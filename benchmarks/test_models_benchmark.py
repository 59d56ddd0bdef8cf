"""pytest-benchmark suite of the model workloads (GPU only):

    pytest benchmarks/test_models_benchmark.py --benchmark-only [--benchmark-json out.json]

The same workloads and step functions as ``python -m benchmarks.models`` (reference eager against
mdm_fast eager and mdm_fast + CUDA graphs); pytest-benchmark times with the host clock, so each
step synchronises.
"""
import copy

import pytest
import torch

from benchmarks import models as bm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VARIANTS = ["reference eager", "mdm_fast eager", "mdm_fast + CUDA graphs"]


@pytest.fixture(scope="module", params=["256x256", "1024x1024"])
def models(request):
    from mdm_fast import optimize

    ref = bm.build(request.param, fast=False)
    yield request.param, ref, optimize(copy.deepcopy(ref))
    del ref
    torch.cuda.empty_cache()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["forward", "train"])
def test_model_step(benchmark, models, variant, kind):
    stem, ref, fast = models
    for wl in (w for w in bm.QUICK if w.model == stem and w.kind == kind):
        step = bm.variants("quick", ref, fast, wl, bm.public_config(stem)[2])[variant]()

        def run():
            step()
            torch.cuda.synchronize()

        benchmark.extra_info.update(workload=f"{stem} {kind} B={wl.batch}", card=torch.cuda.get_device_name())
        benchmark.pedantic(run, warmup_rounds=2, rounds=10)
        break
