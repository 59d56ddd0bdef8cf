import numpy as np
import triton

from mdm_fast.kernels.sizes import cdiv, layout_rows, next_power_of_2


def test_the_launchers_integer_helpers_agree_with_tritons():
    sizes = [0, 1, 2, 3, 5, 16, 17, 31, 32, 33, 77, 128, 129, 1000, 4095, 4096, 4097, 2**20 + 1, 2**33 - 1]
    for n in sizes:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 7, 16, 64, 128, 8192):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(np.int64(77)) == 128


def test_lane_rows_follow_tritons_layout():
    """sizes.layout_rows: rows of one repetition of the tile's layout (16-byte vectors, lanes, then
    warps along the channels first), e.g. the forward's 32-channel bf16 tiles of 8 warps: 4 lanes x 8
    channels per row, 8 rows per warp, 64 rows; whole rows of 1024 channels: 4 warps across a row.
    Whether Triton lays the real tiles out so: test_kernel_report (no barrier in their loops)."""
    assert layout_rows(256, 32, 2, 8) == 64
    assert layout_rows(64, 128, 2, 8) == 16
    assert layout_rows(8, 1024, 2, 8) == 2
    assert layout_rows(64, 128, 4, 8) == 8
    assert layout_rows(4, 32, 2, 8) == 4  # at most the tile's rows
