import numpy as np
import triton

from mdm_fast.kernels.sizes import cdiv, next_power_of_2


def test_the_launchers_integer_helpers_agree_with_tritons():
    sizes = [0, 1, 2, 3, 5, 16, 17, 31, 32, 33, 77, 128, 129, 1000, 4095, 4096, 4097, 2**20 + 1, 2**33 - 1]
    for n in sizes:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 7, 16, 64, 128, 8192):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(np.int64(77)) == 128
