"""Integer helpers of the launchers (host code): Triton's ``triton.cdiv`` and ``triton.next_power_of_2``
are constexpr functions, about 2 us a call from Python, and a group norm's plan made ~10 of them per
launch. These plain functions give the same results for the positive sizes launchers pass."""


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for y > 0."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as Triton's); n may be any integer type (numpy's too)."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0
