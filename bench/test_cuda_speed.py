"""GPU benchmark of the CUDA backend (pytest-benchmark), never run yet (no GPU so
far; `make gpu-check` runs it and tables it, bench/README.md "CUDA").

Layers: the distinct VGG-16 3x3 layer shapes on 32x32 inputs, batch 64, fwd+bwd
(with the saliency), active fractions 1 / 0.75 / 0.5 / 0.25, fp32 and bf16:

- cudnn: our op, the default CUDA path (our gathers/scatters and fused
  grad_output pass around cuDNN on the compact tensors),
- igemm: our op on our implicit-GEMM kernels (DCE_CUDA_CONV=igemm),
- dense: cuDNN's F.conv2d on the full layer (what DCE must beat), at p=1,
- narrow: cuDNN on a physically narrower layer (the bound DCE aims for),
- gather: index_select + F.conv2d + index_copy (the naive baseline).

fp32 convs through cuDNN (cudnn, dense, narrow, gather) use TF32 as nn.Conv2d
does by default (torch.backends.cudnn.allow_tf32); igemm is full fp32.

Steps: one whole VGG-16-BN training step (bench/step_cases.py) at p = 1, 0.5,
0.25 for ours (CUCB selection, masked SGD, saliency; cudnn and igemm) against
the narrow network (and the dense one at p=1), with the host synchronizations
of one step counted by torch.profiler (extra_info.host_syncs_per_step).

Skipped without a GPU. Run: pytest bench/test_cuda_speed.py --benchmark-json=out.json
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import dce_kernels
from step_cases import make_step_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

BATCH = 64
# (in_channels, out_channels, spatial) of the distinct VGG-16 3x3 layers on CIFAR-size input.
LAYERS = [(64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4)]
FRACTIONS = [1.0, 0.75, 0.5, 0.25]
STEP_FRACTIONS = [1.0, 0.5, 0.25]
DTYPES = [torch.float32, torch.bfloat16]
ROUNDS = 20

# Host-side CUDA calls that wait for the device.
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


@pytest.fixture
def cuda_conv_impl():
    """Sets the CUDA implementation for one benchmark, restoring the previous one."""
    previous = dce_kernels.get_cuda_conv_impl()

    def use(impl):
        dce_kernels.set_cuda_conv_impl(impl)

    yield use
    dce_kernels.set_cuda_conv_impl(previous)


def _setup(cin, cout, hw, frac, dtype):
    dev = "cuda"
    x = torch.randn(BATCH, cin, hw, hw, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(cout, cin, 3, 3, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(cout, device=dev, dtype=dtype, requires_grad=True)
    ki, ko = max(1, round(cin * frac)), max(1, round(cout * frac))
    in_idx = torch.randperm(cin, device=dev)[:ki].sort().values
    out_idx = torch.randperm(cout, device=dev)[:ko].sort().values
    return x, w, b, in_idx, out_idx


def _timed(benchmark, fn):
    def step():
        fn()
        torch.cuda.synchronize()

    step()  # warm-up (cuDNN heuristics, lazy module loading)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=2)


def _ids(v):
    return str(v).replace("torch.", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("frac", FRACTIONS, ids=lambda f: f"p{f}")
@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: f"{l[0]}x{l[1]}@{l[2]}")
@pytest.mark.parametrize("impl", ["cudnn", "igemm", "dense", "narrow", "gather"])
def test_conv_fwd_bwd(benchmark, cuda_conv_impl, impl, layer, frac, dtype):
    cin, cout, hw = layer
    if impl == "dense" and frac != 1.0:
        pytest.skip("dense is measured once, at p=1")
    x, w, b, in_idx, out_idx = _setup(cin, cout, hw, frac, dtype)
    probe = torch.zeros(cout, device="cuda", dtype=dtype, requires_grad=True)
    benchmark.extra_info.update(kind="layer", impl=impl, layer=f"{cin}x{cout}@{hw}", frac=frac,
                                dtype=_ids(dtype))

    if impl in ("cudnn", "igemm"):
        cuda_conv_impl(impl)

        def fn():
            y = dce_kernels.channel_sparse_conv2d(x, w, b, in_idx, out_idx, 1, 1,
                                                  saliency_probe=probe)
            y.backward(torch.ones_like(y))
    elif impl == "dense":
        def fn():
            F.conv2d(x, w, b, 1, 1).backward(torch.ones(BATCH, cout, hw, hw, device="cuda",
                                                        dtype=dtype))
    elif impl == "narrow":
        xn = x.detach()[:, : in_idx.numel()].contiguous().requires_grad_()
        wn = w.detach()[: out_idx.numel(), : in_idx.numel()].contiguous().requires_grad_()
        bn = b.detach()[: out_idx.numel()].contiguous().requires_grad_()

        def fn():
            y = F.conv2d(xn, wn, bn, 1, 1)
            y.backward(torch.ones_like(y))
    else:
        def fn():
            xs = x.index_select(1, in_idx)
            ws = w.index_select(0, out_idx).index_select(1, in_idx)
            ys = F.conv2d(xs, ws, b.index_select(0, out_idx), 1, 1)
            y = torch.zeros(BATCH, cout, hw, hw, device="cuda", dtype=dtype).index_copy(1, out_idx, ys)
            y.backward(torch.ones_like(y))

    _timed(benchmark, fn)


def host_syncs(fn) -> dict:
    """How often one call of ``fn`` makes the host wait for the GPU: synchronizing CUDA
    runtime calls and device-to-host copies seen by torch.profiler, and the synchronizing
    ATen calls that torch.cuda's sync debug mode reports."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    counts = {}
    try:
        # No synchronize of ours inside: what fn waits for has finished when it returns.
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
        torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        counts["sync_calls"] = sum(n in SYNC_CALLS for n in names)
        counts["dtoh_copies"] = sum(n.startswith("Memcpy DtoH") for n in names)
    except Exception as e:  # a profiler without CUPTI must not lose the timing
        counts["profiler_error"] = repr(e)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    counts["sync_debug_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
    return counts


@pytest.mark.parametrize("frac", STEP_FRACTIONS, ids=lambda f: f"p{f}")
@pytest.mark.parametrize("impl", ["cudnn", "igemm", "narrow", "dense"])
def test_vgg16_training_step(benchmark, cuda_conv_impl, impl, frac):
    if impl == "dense" and frac != 1.0:
        pytest.skip("dense is measured once, at p=1")
    if impl in ("cudnn", "igemm"):
        cuda_conv_impl(impl)
    candidate = "ours" if impl in ("cudnn", "igemm") else impl
    step = make_step_cases(frac, only=candidate, device="cuda")[candidate]
    for _ in range(3):  # past the selector's warm-up (tau=2) and cuDNN's first calls
        step()
    syncs = host_syncs(step)
    benchmark.extra_info.update(kind="step", impl=impl, frac=frac, dtype="float32",
                                host_syncs_per_step=syncs.get("sync_calls"), syncs=syncs)
    _timed(benchmark, step)
