"""Shapes chosen to break the tiling of the csrc/kernels implicit GEMMs
(toolkit.TILING_CASES): each runs forward + backward + saliency on the emulated
kernels against the masked dense reference."""
import pytest
import torch

from dce_kernels import emulated
from toolkit import TILING_CASES, ConvCase, run_case


@pytest.mark.parametrize("case", TILING_CASES, ids=str)
def test_tiling_shapes(case):
    run_case(emulated.channel_sparse_conv2d, "cpu", torch.float64, case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tiling_low_precision(dtype):
    run_case(emulated.channel_sparse_conv2d, "cpu", dtype,
             ConvCase(1, 67, 66, 3, 5, active_in=65, active_out=65))
