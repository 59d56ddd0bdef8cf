"""Integer helpers of the launchers (host code): Triton's ``triton.cdiv`` and ``triton.next_power_of_2``
are constexpr functions, about 2 us a call from Python, and a group norm's plan made ~10 of them per
launch. These plain functions give the same results for the positive sizes launchers pass."""


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for y > 0."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as Triton's); n may be any integer type (numpy's too)."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


def layout_rows(block_s: int, block_c: int, itemsize: int, num_warps: int) -> int:
    """Rows of one repetition of the layout Triton gives a (block_s, block_c) tile loaded from rows of
    contiguous channels (16-byte vectors along the channels, then the lanes, then the warps; the rest
    along the rows), at most block_s: rows r and r + this number of the tile sit in the same thread."""
    vec = max(1, min(16 // itemsize, block_c))
    lanes_c = min(32, block_c // vec)
    warps_c = min(num_warps, max(1, block_c // (vec * lanes_c)))
    return min(block_s, (32 // lanes_c) * (num_warps // warps_c))
