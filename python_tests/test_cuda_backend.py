"""The real CUDA kernels (dce::* on CUDA tensors), checked exactly like the
emulated ones: the same cases, tiling shapes and reference (toolkit.py) as
test_emulated_backend.py / test_emulated_tiling.py. Skipped without a GPU; the
shared correctness suite also picks up the `cuda` backend by itself then.
"""
import pytest
import torch

import dce_kernels
from toolkit import KERNEL_CASES, TILING_CASES, ConvCase, run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _has_cuda_kernels():
    return torch._C._dispatch_has_kernel_for_dispatch_key("dce::channel_sparse_conv2d", "CUDA")


@pytest.fixture(autouse=True)
def _require_kernels():
    if not _has_cuda_kernels():
        pytest.fail("a GPU is present but dce_kernels was built without its CUDA kernels")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_cases_on_gpu(case, dtype):
    run_case(dce_kernels.channel_sparse_conv2d, "cuda", dtype, case)


@pytest.mark.parametrize("case", TILING_CASES, ids=str)
def test_tiling_shapes_on_gpu(case):
    run_case(dce_kernels.channel_sparse_conv2d, "cuda", torch.float64, case)


def test_gpu_matches_emulator_bit_for_bit_in_float64_forward():
    """Same source, same summation order per output element: the forward of
    the GPU and of the emulator should agree to the last bit in float64."""
    from dce_kernels import emulated

    x = torch.randn(2, 9, 10, 10, dtype=torch.float64)
    w = torch.randn(7, 9, 3, 3, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    in_idx, out_idx = torch.tensor([0, 3, 4, 8]), torch.tensor([6, 1, 2])
    cpu = emulated.channel_sparse_conv2d(x, w, b, in_idx, out_idx, 1, 1)
    gpu = dce_kernels.channel_sparse_conv2d(x.cuda(), w.cuda(), b.cuda(), in_idx.cuda(),
                                            out_idx.cuda(), 1, 1)
    assert torch.equal(cpu, gpu.cpu())


def test_large_layer_on_gpu():
    run_case(dce_kernels.channel_sparse_conv2d, "cuda", torch.float32,
             ConvCase(8, 128, 128, 16, 16, active_in=64, active_out=96))
