import numpy as np
import triton

from mdm_fast.kernels.sizes import cdiv, next_power_of_2, row_lanes


def test_the_launchers_integer_helpers_agree_with_tritons():
    sizes = [0, 1, 2, 3, 5, 16, 17, 31, 32, 33, 77, 128, 129, 1000, 4095, 4096, 4097, 2**20 + 1, 2**33 - 1]
    for n in sizes:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 7, 16, 64, 128, 8192):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(np.int64(77)) == 128


def test_row_lanes_follow_tritons_layout():
    """sizes.row_lanes: the lanes of a tile's layout (16-byte vectors along its contiguous axis, then the
    lanes, then the warps), e.g. channels_last, the forward's 32-channel bf16 tiles of 8 warps: 4 lanes
    x 8 channels per row, 8 rows per warp, 64 rows; whole rows of 1024 channels: 4 warps across a row;
    NCHW, 1024 rows of 8 channels: vectors of 8 rows, 32 lanes and 4 warps along the rows. Whether Triton
    lays the real tiles out so: test_kernel_report (no barrier in their loops)."""
    assert row_lanes(256, 32, 2, 8, True) == (64, 1)
    assert row_lanes(64, 128, 2, 8, True) == (16, 1)
    assert row_lanes(8, 1024, 2, 8, True) == (2, 1)
    assert row_lanes(64, 128, 4, 8, True) == (8, 1)
    assert row_lanes(4, 32, 2, 8, True) == (4, 1)  # at most the tile's rows
    assert row_lanes(1024, 8, 2, 8, False) == (128, 8)
    assert row_lanes(2048, 4, 4, 8, False) == (256, 4)
    assert row_lanes(16, 2, 4, 2, False) == (4, 4)  # at most the tile's rows
