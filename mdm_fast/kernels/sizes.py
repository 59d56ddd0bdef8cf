"""Integer helpers of the launchers (host code): Triton's ``triton.cdiv`` and ``triton.next_power_of_2``
are constexpr functions, about 2 us a call from Python, and a group norm's plan made ~10 of them per
launch. These plain functions give the same results for the positive sizes launchers pass."""
from typing import Tuple


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for y > 0."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as Triton's); n may be any integer type (numpy's too)."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


def row_lanes(block_s: int, block_c: int, itemsize: int, num_warps: int, channels_last: bool) -> Tuple[int, int]:
    """(lanes, vec) of the layout Triton gives a (block_s, block_c) tile loaded with 16-byte vectors along
    its contiguous axis, then the 32 lanes of a warp, then the warps (the rest repeats in registers):
    rows r and r + lanes * vec of the tile sit in one thread, and so do the vec consecutive rows of a
    vector where the rows are contiguous (NCHW; vec is 1 channels_last, where the vectors run along the
    channels). lanes * vec divides block_s."""
    if channels_last:
        vec = max(1, min(16 // itemsize, block_c))
        lanes_c = min(32, block_c // vec)
        warps_c = min(num_warps, max(1, block_c // (vec * lanes_c)))
        return min(block_s, (32 // lanes_c) * (num_warps // warps_c)), 1
    vec = max(1, min(16 // itemsize, block_s))
    lanes_s = min(32, block_s // vec)
    return lanes_s * min(num_warps, max(1, block_s // (vec * lanes_s))), vec
