"""The op against the masked dense reference, on every backend present.

Shapes stay small so the emulated backend (CUDA kernels run by a CPU emulator)
can run the same suite; odd sizes are deliberate."""
from __future__ import annotations

import pytest
import torch

from toolkit import OP_CASES, ConvCase, balanced_index, close_kwargs, masked_dense, random_index

FRACTIONS = [(1.0, 1.0), (0.5, 0.5), (0.3, 1.0), (1.0, 0.3), (0.2, 0.7)]


def _run(backend, x, wt, b, in_idx, out_idx, conv_args, grad_output):
    x = x.clone().requires_grad_()
    wt = wt.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    probe = torch.zeros(wt.shape[0], dtype=wt.dtype, device=wt.device, requires_grad=True)
    y = backend.conv(x, wt, b, in_idx, out_idx, saliency_probe=probe, **conv_args)
    y.backward(grad_output)
    return y, x.grad, wt.grad, (b.grad if b is not None else None), probe.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("fractions", FRACTIONS, ids=lambda f: f"pin{f[0]}-pout{f[1]}")
@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_forward_gradients_and_saliency_match_masked_dense(backend, case, fractions, dtype):
    x, wt, b = case.tensors(dtype, backend.device)
    in_idx = random_index(x.shape[1], fractions[0]).to(backend.device)
    out_idx = random_index(wt.shape[0], fractions[1]).to(backend.device)
    args = case.conv_args()
    probe_out = torch.nn.functional.conv2d(x, wt, None, **args)
    grad_output = torch.randn_like(probe_out)

    y, gx, gw, gb, sal = _run(backend, x, wt, b, in_idx, out_idx, args, grad_output)
    ref = masked_dense(x, wt, b, in_idx, out_idx, grad_output, **args)
    tol = close_kwargs(dtype)
    # Output sums over Cin*k*k products; scale the tolerance with the magnitude.
    torch.testing.assert_close(y.double().cpu(), ref.output, **tol)
    torch.testing.assert_close(gx.double().cpu(), ref.grad_input, **tol)
    torch.testing.assert_close(gw.double().cpu(), ref.grad_weight, **tol)
    if b is not None:
        torch.testing.assert_close(gb.double().cpu(), ref.grad_bias, **tol)
    torch.testing.assert_close(sal.double().cpu(), ref.saliency, **tol)


def test_inactive_channels_are_exactly_zero(backend):
    x, wt, b = ConvCase(2, 9, 7, 8, 8).tensors(torch.float32, backend.device)
    in_idx = torch.tensor([0, 4, 5, 8], device=backend.device)
    out_idx = torch.tensor([6, 1, 3], device=backend.device)
    y, gx, gw, gb, sal = _run(backend, x, wt, b, in_idx, out_idx, dict(padding=1),
                              torch.randn(2, 7, 8, 8, device=backend.device))
    inactive_out = [c for c in range(7) if c not in out_idx.tolist()]
    inactive_in = [c for c in range(9) if c not in in_idx.tolist()]
    assert torch.count_nonzero(y[:, inactive_out]) == 0
    assert torch.count_nonzero(gx[:, inactive_in]) == 0
    assert torch.count_nonzero(gw[inactive_out]) == 0
    assert torch.count_nonzero(gw[:, inactive_in]) == 0
    assert torch.count_nonzero(gb[inactive_out]) == 0
    assert torch.count_nonzero(sal[inactive_out]) == 0
    # and the active part is really computed (guards against an all-zero result)
    assert torch.count_nonzero(y[:, out_idx]) > 0
    assert torch.count_nonzero(gw[out_idx][:, in_idx]) > 0


def test_inactive_input_channels_are_never_read(backend):
    x, wt, b = ConvCase(2, 6, 5, 7, 7).tensors(torch.float64, backend.device)
    in_idx = torch.tensor([1, 4], device=backend.device)
    out_idx = torch.tensor([0, 2, 3], device=backend.device)
    poisoned = x.clone()
    poisoned[:, [0, 2, 3, 5]] = float("nan")
    y = backend.conv(poisoned, wt, b, in_idx, out_idx, padding=1)
    expected = backend.conv(x, wt, b, in_idx, out_idx, padding=1)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_float64(backend, with_bias):
    # Small on purpose: gradcheck runs the op twice per input element.
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, device=backend.device, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64, device=backend.device, requires_grad=True)
    b = (torch.randn(3, dtype=torch.float64, device=backend.device, requires_grad=True)
         if with_bias else None)
    in_idx = torch.tensor([3, 0, 2], device=backend.device)
    out_idx = torch.tensor([2, 0], device=backend.device)

    def f(x, w, b):
        return backend.conv(x, w, b, in_idx, out_idx, stride=(2, 1), padding=1, dilation=1)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_index_order_and_int32_indices_do_not_change_the_result(backend):
    x, wt, b = ConvCase(2, 8, 6, 6, 6).tensors(torch.float64, backend.device)
    in_idx = torch.tensor([7, 1, 3, 0], device=backend.device)
    out_idx = torch.tensor([5, 2, 4], device=backend.device)
    a = backend.conv(x, wt, b, in_idx, out_idx, padding=1)
    s = backend.conv(x, wt, b, in_idx.sort().values.int(), out_idx.sort().values.int(), padding=1)
    torch.testing.assert_close(a, s, rtol=1e-12, atol=1e-12)


def test_unbatched_input_matches_batched(backend):
    x, wt, b = ConvCase(1, 4, 3, 7, 6).tensors(torch.float64, backend.device)
    in_idx = torch.tensor([0, 3], device=backend.device)
    out_idx = torch.tensor([1, 2], device=backend.device)
    batched = backend.conv(x, wt, b, in_idx, out_idx, padding=1)
    unbatched = backend.conv(x[0], wt, b, in_idx, out_idx, padding=1)
    assert unbatched.shape == batched.shape[1:]
    torch.testing.assert_close(unbatched, batched[0], rtol=0, atol=0)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel", [(3, 3), (2, 4)])
def test_string_padding_matches_reference(backend, padding, kernel):
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, device=backend.device)
    w = torch.randn(4, 3, *kernel, dtype=torch.float64, device=backend.device)
    in_idx = torch.tensor([0, 2], device=backend.device)
    out_idx = torch.tensor([1, 3], device=backend.device)
    y = backend.conv(x, w, None, in_idx, out_idx, padding=padding, dilation=(1, 2))
    ref = masked_dense(x, w, None, in_idx, out_idx, torch.ones_like(y), padding=padding,
                       dilation=(1, 2))
    torch.testing.assert_close(y.cpu(), ref.output, rtol=1e-10, atol=1e-10)


def test_grouped_convolution_matches_masked_dense(backend):
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64, device=backend.device)
    w = torch.randn(9, 2, 3, 3, dtype=torch.float64, device=backend.device)
    b = torch.randn(9, dtype=torch.float64, device=backend.device)
    in_idx = torch.tensor([0, 1, 3, 5], device=backend.device)
    out_idx = torch.tensor([0, 4, 7, 8], device=backend.device)
    g = torch.randn(2, 9, 7, 7, dtype=torch.float64, device=backend.device)
    y, gx, gw, gb, sal = _run(backend, x, w, b, in_idx, out_idx, dict(padding=1, groups=3), g)
    ref = masked_dense(x, w, b, in_idx, out_idx, g, padding=1, groups=3)
    for got, want in [(y, ref.output), (gx, ref.grad_input), (gw, ref.grad_weight),
                      (gb, ref.grad_bias), (sal, ref.saliency)]:
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)


def _check_float64_against_masked_dense(backend, case, x, w, b, in_idx, out_idx):
    """Output, gradients and saliency of one call against the masked dense reference
    (float64, random grad_output); returns the output."""
    args = case.conv_args()
    g = torch.randn_like(torch.nn.functional.conv2d(x, w, None, **args))
    y, gx, gw, gb, sal = _run(backend, x, w, b, in_idx, out_idx, args, g)
    ref = masked_dense(x, w, b, in_idx, out_idx, g, **args)
    for got, want in [(y, ref.output), (gx, ref.grad_input), (gw, ref.grad_weight),
                      (gb, ref.grad_bias), (sal, ref.saliency)]:
        if want is not None:
            torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
    return y


# Grouped convs (not depthwise) whose lists hold equally many channels of every conv
# group, ascending (what a channel group with blocks gives them), run as a narrower
# grouped conv; the masked dense reference does not know that. Odd sizes, every arg.
GROUPED_CASES = [
    (ConvCase(2, 12, 9, 7, 7, groups=3, name="3 groups 3x3"), 3, 2),
    (ConvCase(3, 10, 15, 9, 6, stride=2, bias=False, groups=5, name="stride 2, no bias"), 1, 2),
    (ConvCase(1, 8, 8, 10, 9, kernel=(3, 1), padding=(2, 0), dilation=2, groups=2,
              name="non-square dilated"), 3, 1),
]


@pytest.mark.parametrize("inputs", ["balanced", "all", "other channels"])
@pytest.mark.parametrize("outputs", ["balanced", "all"])
@pytest.mark.parametrize("case,per_in,per_out", GROUPED_CASES, ids=lambda c: str(c))
def test_narrow_grouped_conv_matches_masked_dense(backend, case, per_in, per_out, inputs,
                                                  outputs):
    x, w, b = case.tensors(torch.float64, backend.device)
    g_ = case.groups
    out_idx = (balanced_index(case.out_channels, g_, per_out) if outputs == "balanced"
               else torch.arange(case.out_channels)).to(backend.device)
    in_idx = {"balanced": balanced_index(case.in_channels, g_, per_in),
              "all": torch.arange(case.in_channels),
              "other channels": random_index(case.in_channels, 0.6)}[inputs].to(backend.device)
    y = _check_float64_against_masked_dense(backend, case, x, w, b, in_idx, out_idx)


def test_narrow_grouped_conv_never_reads_inactive_weights(backend):
    """The narrow grouped path reads only the active block of the weight (a masked
    dense conv would multiply the NaNs by zero and return NaN)."""
    x, w, b = ConvCase(2, 12, 9, 6, 6, groups=3).tensors(torch.float64, backend.device)
    in_idx = balanced_index(12, 3, 2).to(backend.device)
    out_idx = balanced_index(9, 3, 1).to(backend.device)
    ref = masked_dense(x, w, b, in_idx, out_idx, torch.ones(2, 9, 6, 6, dtype=torch.float64),
                       padding=1, groups=3)
    poisoned = torch.full_like(w, float("nan"))
    run = 4  # input channels per conv group
    for o in out_idx.tolist():
        cols = [c - (o // 3) * run for c in in_idx.tolist() if c // run == o // 3]
        poisoned[o, cols] = w[o, cols]
    y = backend.conv(x, poisoned, b, in_idx, out_idx, padding=1, groups=3)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y.cpu(), ref.output, rtol=1e-10, atol=1e-10)


# Depthwise convs with some outputs inactive run a narrower depthwise conv over the
# active output planes: with the input list the output list (what a channel group
# sets on its depthwise members: the same tensor or an equal copy), all inputs
# active, or an unrelated input list (then some active outputs read zero planes, and
# some active inputs feed no active output). Odd sizes, every conv argument.
DEPTHWISE_CASES = [
    ConvCase(2, 9, 9, 8, 7, groups=9, name="depthwise 3x3"),
    ConvCase(3, 13, 13, 9, 11, stride=2, bias=False, groups=13, name="stride 2, no bias"),
    ConvCase(1, 7, 7, 10, 6, kernel=5, padding=4, dilation=2, groups=7, name="5x5 dilated"),
    ConvCase(2, 5, 5, 6, 9, kernel=(3, 1), stride=(1, 2), padding=(1, 0), groups=5,
             name="non-square everything"),
]


@pytest.mark.parametrize("inputs", ["same tensor", "equal copy", "all", "other channels"])
@pytest.mark.parametrize("fraction", [0.5, 0.2, 1.0])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
def test_depthwise_on_active_planes_matches_masked_dense(backend, case, fraction, inputs):
    x, w, b = case.tensors(torch.float64, backend.device)
    out_idx = random_index(case.out_channels, fraction).to(backend.device)
    in_idx = {"same tensor": out_idx, "equal copy": out_idx.clone(),
              "all": torch.arange(case.in_channels, device=backend.device),
              "other channels": random_index(case.in_channels, 0.6).to(backend.device)}[inputs]
    y = _check_float64_against_masked_dense(backend, case, x, w, b, in_idx, out_idx)
    inactive = torch.ones(case.out_channels, dtype=torch.bool)
    inactive[out_idx.cpu()] = False
    assert y[:, inactive.to(y.device)].eq(0).all()


def test_non_contiguous_and_channels_last_inputs_give_correct_results(backend):
    x, wt, b = ConvCase(2, 6, 5, 9, 9).tensors(torch.float64, backend.device)
    in_idx = torch.tensor([1, 2, 5], device=backend.device)
    out_idx = torch.tensor([0, 4], device=backend.device)
    want = backend.conv(x, wt, b, in_idx, out_idx, padding=1)
    for variant in (x.to(memory_format=torch.channels_last),
                    x.transpose(2, 3).contiguous().transpose(2, 3)):
        assert not variant.is_contiguous()
        got = backend.conv(variant, wt.to(memory_format=torch.channels_last), b, in_idx,
                           out_idx, padding=1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_weight_only_and_input_only_gradients(backend):
    x, wt, b = ConvCase(2, 5, 4, 6, 6).tensors(torch.float64, backend.device)
    in_idx = torch.tensor([0, 3, 4], device=backend.device)
    out_idx = torch.tensor([1, 2], device=backend.device)
    g = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=backend.device)
    ref = masked_dense(x, wt, b, in_idx, out_idx, g, padding=1)

    w_only = wt.clone().requires_grad_()
    backend.conv(x, w_only, b, in_idx, out_idx, padding=1).backward(g)
    torch.testing.assert_close(w_only.grad.cpu(), ref.grad_weight, rtol=1e-10, atol=1e-10)

    x_only = x.clone().requires_grad_()
    backend.conv(x_only, wt, b, in_idx, out_idx, padding=1).backward(g)
    torch.testing.assert_close(x_only.grad.cpu(), ref.grad_input, rtol=1e-10, atol=1e-10)


def test_empty_batch(backend):
    x = torch.randn(0, 4, 5, 5, device=backend.device)
    w = torch.randn(3, 4, 3, 3, device=backend.device)
    y = backend.conv(x, w, None, torch.tensor([0, 1], device=backend.device),
                     torch.tensor([2], device=backend.device), padding=1)
    assert y.shape == (0, 3, 5, 5)
