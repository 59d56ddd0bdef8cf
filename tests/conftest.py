"""Test setup: Triton runs under its interpreter on machines without CUDA; the public reference cases
(shared/reference) must be there.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection start.
Tests that need a GPU carry ``@pytest.mark.gpu`` and are skipped without CUDA.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running on CPU")
    from mdm_fast.reference.data import reference_dir

    if not (reference_dir() / "golden" / "index.json").is_file():  # the golden tests must not pass by skipping
        raise pytest.UsageError(f"the public reference cases are not at {reference_dir()}: put shared/reference "
                                "inside the checkout or beside it, or name it in MDM_FAST_REFERENCE")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Each test that takes it runs on the CPU (Triton under its interpreter) and, marked gpu, on CUDA."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_norm_parts(monkeypatch):
    """group_norm's split path over whole rows on small channels_last tensors, with several tiles per part,
    and the row kernel of its input's producer (the concatenation) in chunks of 8 channels."""
    from mdm_fast.kernels import rows
    from norm_paths import force_whole_rows

    force_whole_rows(monkeypatch, 64, 3)
    monkeypatch.setattr(rows, "BLOCK_C", 8)
    monkeypatch.setattr(rows, "TILE", 32)
