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


@pytest.fixture(scope="module")
def models():
    """stem -> (reference, fast copy), each model built once for the module."""
    from mdm_fast import optimize

    built = {}

    def get(stem):
        if stem not in built:
            ref = bm.build(stem, fast=False)
            built[stem] = ref, optimize(copy.deepcopy(ref))
        return built[stem]

    yield get
    built.clear()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("wl", bm.QUICK, ids=lambda w: f"{w.model}-{w.kind}-B{w.batch}")
def test_model_step(benchmark, models, wl, variant):
    """Every workload of the quick suite (``python -m benchmarks.models``), each variant."""
    ref, fast = models(wl.model)
    step = bm.variants("quick", ref, fast, wl, bm.public_config(wl.model)[2])[variant]()

    def run():
        step()
        torch.cuda.synchronize()

    benchmark.extra_info.update(workload=f"{wl.model} {wl.kind} B={wl.batch}", card=torch.cuda.get_device_name())
    benchmark.pedantic(run, warmup_rounds=2, rounds=10)
