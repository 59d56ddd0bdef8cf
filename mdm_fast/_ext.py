"""The optional compiled extension ``mdm_fast._C`` (CUDA kernels in ``csrc/``, bound with pybind11).

``ext`` is the module, or None with ``load_error`` saying why (not built, no CUDA, ...).
"""
from __future__ import annotations

from typing import Optional

ext = None
load_error: Optional[str] = None

try:  # pragma: no cover - depends on the build
    from mdm_fast import _C as ext  # type: ignore[attr-defined,no-redef]
except ImportError as e:  # not built: the package works through Triton and PyTorch
    load_error = f"not built or not importable: {e}; install with nvcc on the PATH (MDM_FAST_BUILD_CUDA=1 forces it)"
