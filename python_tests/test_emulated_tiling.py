"""Shapes chosen to break the tiling of the csrc/kernels implicit GEMMs
(block tile 64 x 64, K step 16; split-K for the weight gradient): sizes of 1,
primes, exactly one tile, one short of and one past a tile, in every GEMM
dimension of every kernel. Each runs forward + backward + saliency on the
emulated kernels in float64 against the masked dense reference."""
import pytest
import torch

from dce_kernels import emulated
from test_emulated_backend import run_case

# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, bias, n_in, n_out), why
TILING = [
    ((1, 1, 1, 1, 1, 1, 1, 0, 1, 1, True, 1, 1), "all-ones"),
    ((1, 2, 67, 1, 1, 1, 1, 0, 1, 1, True, 2, 65), "fwd/wgrad M one past a tile"),
    ((1, 2, 66, 1, 1, 1, 1, 0, 1, 1, False, 2, 64), "fwd/wgrad M exactly one tile"),
    ((1, 2, 64, 1, 1, 1, 1, 0, 1, 1, True, 2, 63), "fwd/wgrad M one short"),
    ((1, 67, 2, 1, 1, 1, 1, 0, 1, 1, True, 65, 2), "dgrad M and wgrad N one past a tile"),
    ((1, 3, 2, 5, 13, 1, 1, 0, 1, 1, True, 3, 2), "fwd N = 65 pixels"),
    ((1, 3, 2, 8, 8, 1, 1, 0, 1, 1, True, 3, 2), "fwd N = 64 pixels"),
    ((1, 3, 2, 7, 9, 1, 1, 0, 1, 1, True, 3, 2), "fwd N = 63 pixels"),
    ((1, 17, 3, 5, 5, 1, 1, 0, 1, 1, True, 17, 3), "fwd K = 17 (one past a K step)"),
    ((1, 16, 3, 5, 5, 1, 1, 0, 1, 1, True, 16, 3), "fwd K = 16"),
    ((2, 3, 17, 4, 4, 1, 1, 0, 1, 1, True, 2, 17), "dgrad K = 17"),
    ((4, 3, 5, 10, 10, 3, 1, 1, 1, 1, True, 2, 3), "wgrad split-K: 400 pixels, 3 splits"),
    ((3, 5, 7, 11, 11, 3, 1, 1, 1, 1, True, 3, 5), "wgrad 363 pixels: ragged last split"),
    ((1, 3, 2, 13, 11, 7, 3, 2, 1, 1, True, 2, 2), "prime spatial, stride 3, 7x7 kernel"),
    ((2, 5, 3, 11, 7, (1, 5), (3, 2), (0, 4), (1, 2), 1, True, 4, 2), "asymmetric everything"),
    ((1, 17, 17, 5, 7, 3, 1, 1, 1, 17, True, 11, 13), "depthwise, 17 groups, prime"),
    ((1, 65, 3, 3, 3, 3, 1, 1, 1, 1, True, 65, 3), "wgrad N = 65*9 columns"),
]


@pytest.mark.parametrize("case", [c for c, _ in TILING], ids=[why for _, why in TILING])
def test_tiling_shapes(case):
    N, Cin, Cout, H, W, k, s, p, d, g, bias, n_in, n_out = case
    run_case(emulated.channel_sparse_conv2d, "cpu", torch.float64, N, Cin, Cout, H, W, k, s, p,
             d, g, bias, n_in, n_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tiling_low_precision(dtype):
    run_case(emulated.channel_sparse_conv2d, "cpu", dtype, 1, 67, 66, 3, 5, 3, 1, 1, 1, 1, True,
             65, 65)
