"""The real CUDA backend (dce::* on CUDA tensors), both of its implementations
(dce_kernels.set_cuda_conv_impl: "cudnn", the compact-conv composition around
cuDNN, and "igemm", our implicit-GEMM kernels), checked exactly like the
emulated ones: the same cases, tiling shapes and reference (toolkit.py) as
test_emulated_backend.py / test_emulated_tiling.py. Skipped without a GPU; the
shared correctness suite also picks up the `cuda` and `cuda-igemm` backends by
itself then.
"""
import pytest
import torch
import torch.nn.functional as F

import dce_kernels
from toolkit import KERNEL_CASES, TILING_CASES, ConvCase, assert_close_scaled, \
    masked_conv2d, run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _has_cuda_kernels():
    return torch._C._dispatch_has_kernel_for_dispatch_key("dce::channel_sparse_conv2d", "CUDA")


@pytest.fixture(autouse=True)
def _require_kernels():
    if not _has_cuda_kernels():
        pytest.fail("a GPU is present but dce_kernels was built without its CUDA kernels")


@pytest.fixture(params=dce_kernels.ops.CUDA_CONV_IMPLS)
def impl(request):
    previous = dce_kernels.get_cuda_conv_impl()
    dce_kernels.set_cuda_conv_impl(request.param)
    yield request.param
    dce_kernels.set_cuda_conv_impl(previous)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_cases_on_gpu(case, dtype, impl):
    run_case(dce_kernels.channel_sparse_conv2d, "cuda", dtype, case)


@pytest.mark.parametrize("case", TILING_CASES, ids=str)
def test_tiling_shapes_on_gpu(case, impl):
    run_case(dce_kernels.channel_sparse_conv2d, "cuda", torch.float64, case)


def test_gpu_matches_emulator_bit_for_bit_in_float64_forward():
    """Same source, same summation order per output element: the forward of
    the igemm kernels on the GPU and on the emulator should agree to the last
    bit in float64."""
    from dce_kernels import emulated

    x = torch.randn(2, 9, 10, 10, dtype=torch.float64)
    w = torch.randn(7, 9, 3, 3, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    in_idx, out_idx = torch.tensor([0, 3, 4, 8]), torch.tensor([6, 1, 2])
    cpu = emulated.channel_sparse_conv2d(x, w, b, in_idx, out_idx, 1, 1)
    previous = dce_kernels.get_cuda_conv_impl()
    dce_kernels.set_cuda_conv_impl("igemm")
    try:
        gpu = dce_kernels.channel_sparse_conv2d(x.cuda(), w.cuda(), b.cuda(), in_idx.cuda(),
                                                out_idx.cuda(), 1, 1)
    finally:
        dce_kernels.set_cuda_conv_impl(previous)
    assert torch.equal(cpu, gpu.cpu())


def test_large_layer_on_gpu(impl):
    run_case(dce_kernels.channel_sparse_conv2d, "cuda", torch.float32,
             ConvCase(8, 128, 128, 16, 16, active_in=64, active_out=96))


def test_tf32_default_stays_within_tf32_error():
    """With cuDNN's TF32 default (what nn.Conv2d gets too) the cudnn path is as
    close to the float64 reference as a 10-bit mantissa allows."""
    previous = (dce_kernels.get_cuda_conv_impl(), torch.backends.cudnn.allow_tf32)
    dce_kernels.set_cuda_conv_impl("cudnn")
    torch.backends.cudnn.allow_tf32 = True
    try:
        x = torch.randn(4, 64, 16, 16, dtype=torch.float64)
        w = torch.randn(48, 64, 3, 3, dtype=torch.float64)
        in_idx, out_idx = torch.randperm(64)[:40], torch.randperm(48)[:30]
        y = dce_kernels.channel_sparse_conv2d(x.cuda().float(), w.cuda().float(), None,
                                              in_idx.cuda(), out_idx.cuda(), 1, 1)
        ref = masked_conv2d(x, w, None, in_idx, out_idx, 1, 1, 1, 1)
        assert_close_scaled(y, ref, torch.float16, "output (TF32)")
    finally:
        dce_kernels.set_cuda_conv_impl(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_runs_the_op_in_the_autocast_dtype(dtype, impl):
    """Under torch.autocast the op runs in the autocast dtype, as F.conv2d does, and the
    gradients reach the fp32 parameters in fp32."""
    x = torch.randn(2, 16, 9, 9, device="cuda", requires_grad=True)
    w = torch.randn(12, 16, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(12, device="cuda", requires_grad=True)
    in_idx = torch.tensor([1, 4, 5, 9, 15], device="cuda")
    out_idx = torch.tensor([0, 3, 11], device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = dce_kernels.channel_sparse_conv2d(x, w, b, in_idx, out_idx, 1, 1)
        assert y.dtype == F.conv2d(x, w, b, 1, 1).dtype == dtype
    y.float().square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    ref = masked_conv2d(x.detach().double().cpu(), w.detach().double().cpu(),
                        b.detach().double().cpu(), in_idx.cpu(), out_idx.cpu(), 1, 1, 1, 1)
    assert_close_scaled(y, ref, dtype, "output (autocast)")
