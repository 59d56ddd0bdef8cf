"""Fused operations of mdm_fast, each a torch.library custom op with ref/triton/cuda backends.

``impl="auto"`` picks the fastest backend that can run the inputs; ``MDM_FAST_IMPL`` or
``use_impl("triton")`` override the choice globally (see :mod:`mdm_fast.ops.dispatch`).
"""
from mdm_fast.ops.dispatch import BackendUnavailable, registered_ops, use_impl  # noqa: F401
# One import line per op family below.
