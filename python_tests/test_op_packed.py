"""Packed channel layouts of the op (input and/or output holding only the active
channels) against the full-width masked dense reference, on every backend."""
from __future__ import annotations

import pytest
import torch

from toolkit import OP_CASES, ConvCase, balanced_index, close_kwargs, masked_dense, random_index

LAYOUTS = [(True, False), (False, True), (True, True)]
FRACTIONS = [(0.5, 0.5), (0.3, 1.0), (1.0, 0.3)]


def _sorted_index(num_channels, fraction, device):
    return random_index(num_channels, fraction).sort().values.to(device)


def _run_packed(backend, x, wt, b, in_idx, out_idx, args, grad_output, layout):
    packed_in, packed_out = layout
    x_arg = (x[:, in_idx] if packed_in else x).clone().requires_grad_()
    w_arg = wt.clone().requires_grad_()
    b_arg = b.clone().requires_grad_() if b is not None else None
    probe = torch.zeros(wt.shape[0], dtype=wt.dtype, device=wt.device, requires_grad=True)
    y = backend.conv(x_arg, w_arg, b_arg, in_idx, out_idx, saliency_probe=probe,
                     packed_input=packed_in, packed_output=packed_out, **args)
    y.backward(grad_output[:, out_idx] if packed_out else grad_output)
    return y, x_arg.grad, w_arg.grad, (b_arg.grad if b is not None else None), probe.grad


def _check_against_masked_dense(backend, case, x, wt, b, in_idx, out_idx, layout, dtype):
    """The packed call's output and every gradient against the full-width float64
    masked dense reference, narrowed to the active channels where packed."""
    args = case.conv_args()
    grad_output = torch.randn_like(torch.nn.functional.conv2d(x, wt, None, **args))

    y, gx, gw, gb, sal = _run_packed(backend, x, wt, b, in_idx, out_idx, args, grad_output,
                                     layout)
    ref = masked_dense(x, wt, b, in_idx, out_idx, grad_output, **args)
    packed_in, packed_out = layout
    cpu_in, cpu_out = in_idx.cpu(), out_idx.cpu()
    tol = close_kwargs(dtype)
    torch.testing.assert_close(y.double().cpu(), ref.output[:, cpu_out] if packed_out
                               else ref.output, **tol)
    torch.testing.assert_close(gx.double().cpu(), ref.grad_input[:, cpu_in] if packed_in
                               else ref.grad_input, **tol)
    torch.testing.assert_close(gw.double().cpu(), ref.grad_weight, **tol)
    if b is not None:
        torch.testing.assert_close(gb.double().cpu(), ref.grad_bias, **tol)
    torch.testing.assert_close(sal.double().cpu(), ref.saliency, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"in{'P' if l[0] else 'F'}-out{'P' if l[1] else 'F'}")
@pytest.mark.parametrize("fractions", FRACTIONS, ids=lambda f: f"pin{f[0]}-pout{f[1]}")
@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_packed_layouts_match_masked_dense(backend, case, fractions, layout, dtype):
    x, wt, b = case.tensors(dtype, backend.device)
    in_idx = _sorted_index(x.shape[1], fractions[0], backend.device)
    out_idx = _sorted_index(wt.shape[0], fractions[1], backend.device)
    _check_against_masked_dense(backend, case, x, wt, b, in_idx, out_idx, layout, dtype)


# Depthwise convs pack too: a channel group's depthwise member reads and writes
# the group's active channels. Packed input needs in_idx equal to out_idx (the same
# tensor, as a ChannelPlan passes, or an equal copy); a packed output alone takes
# any input list. Odd sizes, every conv argument.
DEPTHWISE_CASES = [
    ConvCase(2, 9, 9, 8, 7, groups=9, name="depthwise 3x3"),
    ConvCase(3, 13, 13, 9, 11, stride=2, bias=False, groups=13, name="stride 2, no bias"),
    ConvCase(1, 7, 7, 10, 6, kernel=5, padding=4, dilation=2, groups=7, name="5x5 dilated"),
]
DEPTHWISE_LAYOUTS = [(lists, layout) for lists in ("same tensor", "equal copy", "other input list")
                     for layout in LAYOUTS if lists != "other input list" or not layout[0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("lists, layout", DEPTHWISE_LAYOUTS,
                         ids=lambda v: v if isinstance(v, str) else
                         f"in{'P' if v[0] else 'F'}-out{'P' if v[1] else 'F'}")
@pytest.mark.parametrize("fraction", [0.5, 0.2, 1.0])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
def test_packed_depthwise_matches_masked_dense(backend, case, fraction, lists, layout, dtype):
    x, wt, b = case.tensors(dtype, backend.device)
    out_idx = _sorted_index(case.out_channels, fraction, backend.device)
    in_idx = {"same tensor": out_idx, "equal copy": out_idx.clone(),
              "other input list": _sorted_index(case.in_channels, 0.6, backend.device)}[lists]
    _check_against_masked_dense(backend, case, x, wt, b, in_idx, out_idx, layout, dtype)


# Grouped convs (not depthwise) pack when both lists hold equally many channels of every
# conv group, as a channel group's blocks give them: the narrow grouped conv's own input
# and output. Odd sizes.
GROUPED_CASES = [
    (ConvCase(2, 12, 9, 7, 7, groups=3, name="3 groups"), 2, 1),
    (ConvCase(3, 10, 15, 9, 6, stride=2, bias=False, groups=5, name="5 groups, stride 2"), 1, 2),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: f"in{'P' if v[0] else 'F'}-"
                                                         f"out{'P' if v[1] else 'F'}")
@pytest.mark.parametrize("case,per_in,per_out", GROUPED_CASES, ids=str)
def test_packed_grouped_matches_masked_dense(backend, case, per_in, per_out, layout, dtype):
    x, wt, b = case.tensors(dtype, backend.device)
    in_idx = balanced_index(case.in_channels, case.groups, per_in).to(backend.device)
    out_idx = balanced_index(case.out_channels, case.groups, per_out).to(backend.device)
    _check_against_masked_dense(backend, case, x, wt, b, in_idx, out_idx, layout, dtype)


def test_packed_chain_equals_full_width_chain(backend):
    """Two layers sharing a channel list: packed between them or full width in
    between, same result and same gradients."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, 7, generator=g, dtype=torch.float64).to(backend.device)
    w1 = torch.randn(8, 5, 3, 3, generator=g, dtype=torch.float64).to(backend.device)
    w2 = torch.randn(6, 8, 3, 3, generator=g, dtype=torch.float64).to(backend.device)
    mid = torch.tensor([1, 2, 6], device=backend.device)
    all_in = torch.arange(5, device=backend.device)
    outs = torch.tensor([0, 3, 4, 5], device=backend.device)
    results = []
    for packed in (False, True):
        a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()
        h = backend.conv(x, a, None, all_in, mid, padding=1, packed_output=packed)
        y = backend.conv(torch.relu(h), b, None, mid, outs, padding=1, packed_input=packed)
        (y * y).sum().backward()
        results.append((y.detach(), a.grad, b.grad))
    for full, packed in zip(*results):
        torch.testing.assert_close(packed, full, rtol=1e-10, atol=1e-10)


def _small(device):
    x = torch.randn(2, 6, 5, 5, device=device)
    w = torch.randn(4, 6, 3, 3, device=device)
    return x, w


@pytest.mark.parametrize("case, message", [
    ("unsorted_in", "ascending"),
    ("unsorted_out", "ascending"),
    ("wrong_packed_width", "packed input has 6 channels but in_idx lists 3"),
    ("grouped", "or a grouped conv whose in_idx and out_idx both hold equally many"),
    ("depthwise_other_lists", "in_idx equal to out_idx"),
])
def test_packed_layout_bad_input(backend, case, message):
    x, w = _small(backend.device)
    idx = lambda *v: torch.tensor(v, device=backend.device)  # noqa: E731
    if case == "unsorted_in":
        call = lambda: backend.conv(x[:, [3, 1]], w, None, idx(3, 1), idx(0, 1),  # noqa: E731
                                    packed_input=True)
    elif case == "unsorted_out":
        call = lambda: backend.conv(x, w, None, idx(0, 1), idx(2, 0), packed_output=True)  # noqa: E731
    elif case == "wrong_packed_width":
        call = lambda: backend.conv(x, w, None, idx(0, 1, 2), idx(0, 1), packed_input=True)  # noqa: E731
    elif case == "depthwise_other_lists":
        wd = torch.randn(6, 1, 3, 3, device=backend.device)
        call = lambda: backend.conv(x[:, [0, 2]], wd, None, idx(0, 2), idx(0, 3),  # noqa: E731
                                    groups=6, packed_input=True)
    else:
        wg = torch.randn(4, 3, 3, 3, device=backend.device)
        call = lambda: backend.conv(x, wg, None, idx(0, 1), idx(0, 1), groups=2,  # noqa: E731
                                    packed_output=True)
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_packed(backend, layout):
    packed_in, packed_out = layout
    leaf = dict(dtype=torch.float64, device=backend.device, requires_grad=True)
    x = torch.randn(2, 3 if packed_in else 6, 5, 5, **leaf)
    w = torch.randn(4, 6, 3, 3, **leaf)
    b = torch.randn(4, **leaf)
    probe = torch.zeros(4, **leaf)
    in_idx = torch.tensor([0, 2, 5], device=backend.device)
    out_idx = torch.tensor([1, 3], device=backend.device)
    args = (x, w, b, in_idx, out_idx, [1, 1], [1, 1], [1, 1], 1, probe, packed_in, packed_out)
    torch.library.opcheck(backend.ops.channel_sparse_conv2d.default, args)
