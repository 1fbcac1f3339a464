"""Focused tests of the emulated backends: the csrc/kernels CUDA kernels, run by
the CPU emulator, against an independent reference (F.conv2d in float64 on
masked dense tensors), on both paths of the CUDA backend: `emulated` (igemm,
every step emulated) and `emulated-cudnn` (the compact-conv composition with
the emulated memory-pass kernels, at::convolution on the CPU in cuDNN's place).
test_cuda_backend.py runs the same cases (toolkit.py) on the real CUDA kernels
when a GPU is present.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from toolkit import BACKENDS, KERNEL_CASES, ConvCase, assert_close_scaled, complement, \
    masked_conv2d, run_case

EMULATED = [b for b in BACKENDS if b.namespace.startswith("dce_emu")]


@pytest.fixture(params=EMULATED, ids=str)
def emu(request):
    """One emulated path: ``emu.conv`` is its functional op, ``emu.ops`` its op library."""
    return request.param


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_float64_matches_reference(case, emu):
    run_case(emu.conv, "cpu", torch.float64, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", KERNEL_CASES[:4], ids=str)
def test_low_precision_matches_reference(case, dtype, emu):
    run_case(emu.conv, "cpu", dtype, case)


def test_int32_index_lists(emu):
    run_case(emu.conv, "cpu", torch.float64,
             ConvCase(2, 6, 5, 6, 6, active_in=4, active_out=3), idx_dtype=torch.int32)


def test_inactive_inputs_and_weights_are_never_read(emu):
    torch.manual_seed(7)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    in_idx, out_idx = torch.tensor([4, 0, 2]), torch.tensor([3, 1])
    off_in, off_out = complement(in_idx, 6), complement(out_idx, 5)
    xn, wn, bn = x.clone(), w.clone(), b.clone()
    xn[:, off_in] = float("nan")
    wn[off_out] = float("nan")
    wn[:, off_in] = float("nan")
    bn[off_out] = float("nan")
    y = emu.conv(xn, wn, bn, in_idx, out_idx, 1, 1)
    x0, w0 = x.clone(), w.clone()
    x0[:, off_in] = 0
    w0[:, off_in] = 0
    ref = masked_conv2d(x0, w0, b, in_idx, out_idx, 1, 1, 1, 1)
    assert torch.isfinite(y).all()
    assert_close_scaled(y, ref, torch.float64, "output")
    gi, gw, gb, sal = emu.ops.channel_sparse_conv2d_backward(
        torch.randn_like(y), xn, wn, y, in_idx, out_idx, [1, 1], [1, 1], [1, 1], 1,
        [True, True, True])
    for t in (gi, gw, gb, sal):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)),
                         ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("with_output", [False, True], ids=["no_h", "h"])
def test_backward_output_mask(mask, with_output, emu):
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    in_idx, out_idx = torch.tensor([1, 3, 4]), torch.tensor([0, 2])
    y = emu.conv(x, w, b, in_idx, out_idx, 1, 1)
    g = torch.randn_like(y)
    gi, gw, gb, sal = emu.ops.channel_sparse_conv2d_backward(
        g, x, w, y if with_output else None, in_idx, out_idx, [1, 1], [1, 1], [1, 1], 1, list(mask))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    masked_conv2d(xr, wr, br, in_idx, out_idx, 1, 1, 1, 1).backward(g)
    for want, got, ref, name in zip(mask, (gi, gw, gb), (xr.grad, wr.grad, br.grad),
                                    ("grad_input", "grad_weight", "grad_bias")):
        if want:
            assert_close_scaled(got, ref, torch.float64, name)
        else:
            assert got is None, f"{name} was not requested and must be None"
    if with_output:
        assert_close_scaled(sal, ((g * y).mean((2, 3))).abs().mean(0), torch.float64, "saliency")
    else:
        assert sal is None


def test_unbatched_same_padding_and_noncontiguous_input(emu):
    x = torch.randn(6, 11, 3, 4, dtype=torch.float64).permute(3, 2, 0, 1)  # (4, 3, 6, 11), strided
    w = torch.randn(5, 3, 4, 3, dtype=torch.float64)  # even kernel height: asymmetric 'same'
    in_idx, out_idx = torch.tensor([2, 0]), torch.tensor([4, 1, 0])
    y = emu.conv(x, w, None, in_idx, out_idx, padding="same")
    xm = x.clone()
    xm[:, 1] = 0
    ref = F.conv2d(xm, w, None, 1, "same")
    ref[:, [2, 3]] = 0
    assert_close_scaled(y, ref, torch.float64, "output")
    y1 = emu.conv(x[0], w, None, in_idx, out_idx, padding=1)
    assert y1.dim() == 3
    assert_close_scaled(y1, masked_conv2d(x[:1], w, None, in_idx, out_idx, 1, 1, 1, 1)[0],
                 torch.float64, "unbatched output")


def test_gradcheck(emu):
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    in_idx, out_idx = torch.tensor([0, 2]), torch.tensor([3, 1])
    assert torch.autograd.gradcheck(
        lambda x, w, b: emu.conv(x, w, b, in_idx, out_idx, 1, 1),
        (x, w, b))


BAD_INDEX = [
    (torch.tensor([0, 0]), "more than once"),
    (torch.tensor([0, 9]), "out of range"),
    (torch.tensor([-1]), "out of range"),
    (torch.tensor([], dtype=torch.long), "empty"),
    (torch.tensor([0.0, 1.0]), "int64 or int32"),
    (torch.tensor([[0, 1]]), "1-D"),
]


@pytest.mark.parametrize("bad,message", BAD_INDEX, ids=[m for _, m in BAD_INDEX])
@pytest.mark.parametrize("which", ["in_idx", "out_idx"])
def test_bad_index_lists_raise(bad, message, which, emu):
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    good = torch.tensor([0, 1])
    args = (bad, good) if which == "in_idx" else (good, bad)
    with pytest.raises(RuntimeError, match=message):
        emu.ops.channel_sparse_conv2d(x, w, None, *args, [1, 1], [0, 0], [1, 1], 1, None)


def test_bad_tensors_raise(emu):
    x, w, idx = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 3, 3), torch.tensor([0, 1])
    call = emu.ops.channel_sparse_conv2d
    with pytest.raises(RuntimeError, match="differs from input dtype"):
        call(x, w.double(), None, idx, idx, [1, 1], [0, 0], [1, 1], 1, None)
    with pytest.raises(RuntimeError, match="channels but weight expects"):
        call(x[:, :3], w, None, idx, idx, [1, 1], [0, 0], [1, 1], 1, None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        call(x, w, torch.zeros(4), idx, idx, [1, 1], [0, 0], [1, 1], 1, None)
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        call(x, w, None, idx, idx, [1, 1], [0, 0], [3, 3], 1, None)
    with pytest.raises(RuntimeError, match="grad_output shape"):
        emu.ops.channel_sparse_conv2d_backward(
            torch.randn(1, 3, 2, 2), x, w, None, idx, idx, [1, 1], [0, 0], [1, 1], 1,
            [True, True, False])


def test_layer_trains_with_emulated_op_and_reports_saliency(emu):
    """The emulated op drives ChannelSparseConv2d-like use: autograd through
    two stacked convolutions, saliency delivered through the probe."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w1 = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    probe = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    mid = torch.tensor([5, 1, 2])
    h = emu.conv(x, w1, None, torch.arange(3), mid, 1, 1, saliency_probe=probe)
    out = emu.conv(torch.relu(h), w2, None, mid, torch.arange(4), 1, 1)
    out.square().sum().backward()
    w1r, w2r = w1.detach().clone().requires_grad_(), w2.detach().clone().requires_grad_()
    hr = masked_conv2d(x, w1r, None, torch.arange(3), mid, 1, 1, 1, 1)
    hr.retain_grad()
    masked_conv2d(torch.relu(hr), w2r, None, mid, torch.arange(4), 1, 1, 1, 1).square().sum().backward()
    assert_close_scaled(w1.grad, w1r.grad, torch.float64, "grad w1")
    assert_close_scaled(w2.grad, w2r.grad, torch.float64, "grad w2")
    sal = (hr.grad * hr.detach()).mean((2, 3)).abs().mean(0)
    assert_close_scaled(probe.grad, sal, torch.float64, "saliency")
    assert (probe.grad[[0, 3, 4]] == 0).all() and (probe.grad[mid] > 0).all()
