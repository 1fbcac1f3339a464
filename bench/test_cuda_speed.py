"""GPU benchmark of the CUDA kernels (pytest-benchmark), on the ARCHITECTURE.md
shapes: VGG-16 layer shapes on 32x32 inputs, batch 64, fwd+bwd, active
fractions 1 / 0.75 / 0.5 / 0.25, against

- dense: cuDNN's F.conv2d on the full layer (what DCE must beat),
- narrow: cuDNN on a physically narrower layer (the bound DCE aims for),
- gather: index_select + F.conv2d + index_copy (the naive baseline).

Skipped without a GPU. Run: pytest bench/test_cuda_speed.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

import dce_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

BATCH = 64
# (in_channels, out_channels, spatial) of the distinct VGG-16 3x3 layers on CIFAR-size input.
LAYERS = [(64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4)]
FRACTIONS = [1.0, 0.75, 0.5, 0.25]
DTYPES = [torch.float32, torch.bfloat16]


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

    step()  # warm-up (cuDNN autotuning, lazy module loading)
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)


def _ids(v):
    return str(v).replace("torch.", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("frac", FRACTIONS, ids=lambda f: f"p{f}")
@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: f"{l[0]}x{l[1]}@{l[2]}")
@pytest.mark.parametrize("impl", ["dce", "dense", "narrow", "gather"])
def test_conv_fwd_bwd(benchmark, impl, layer, frac, dtype):
    cin, cout, hw = layer
    if impl == "dense" and frac != 1.0:
        pytest.skip("dense is measured once, at p=1")
    x, w, b, in_idx, out_idx = _setup(cin, cout, hw, frac, dtype)
    probe = torch.zeros(cout, device="cuda", dtype=dtype, requires_grad=True)
    benchmark.extra_info.update(impl=impl, cin=cin, cout=cout, hw=hw, frac=frac, dtype=str(dtype))

    if impl == "dce":
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
