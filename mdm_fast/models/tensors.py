"""What the fast model asks of a tensor beyond its values: is it a view of another, is it sharded."""
from __future__ import annotations

from torch import Tensor


def same_view(a: Tensor, b: Tensor) -> bool:
    """``b`` is ``a`` or a view of the same elements: same base, offset, shape and strides (the nested
    model hands its outer level ``temb[:bh]`` and ``conditioning[:bh]``, new views even when bh is the
    whole batch)."""
    if a is b:
        return True
    root = a if a._base is None else a._base
    return ((b if b._base is None else b._base) is root and b.storage_offset() == a.storage_offset()
            and b.shape == a.shape and b.stride() == a.stride() and b.dtype == a.dtype)


def is_sharded(p: Tensor) -> bool:
    """A parameter sharded by FSDP2 (a DTensor)."""
    return type(p).__name__ == "DTensor"
