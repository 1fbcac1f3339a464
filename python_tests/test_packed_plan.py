"""Packed activations between channel-sparse layers, and the block copies the
masked optimizer uses: each against the full-width path or ATen indexing."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dce_kernels import ChannelSparseBatchNorm2d
from dce_kernels.channels import plan_for
from dce_kernels.experiments.models import build_model
from dce_kernels.ops import gather_block, scatter_block_


def _random_selection(plan, fraction, generator):
    return [torch.randperm(c, generator=generator)[:max(1, round(c * fraction))]
            for c in plan.num_channels]


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_packed_model_equals_full_width_model(name, training):
    """Same selection, same weights: packed and full-width activations give the
    same output, parameter gradients, saliency and BatchNorm statistics."""
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    full = build_model(name, 3, 10, width=0.5).double()
    packed = copy.deepcopy(full)
    plan_full, plan_packed = plan_for(full, pack=False), plan_for(packed)
    assert any(conv.packed_output for conv in plan_packed.convs)
    assert not any(conv.packed_output or conv.packed_input for conv in plan_full.convs)
    x = torch.randn(3, 3, 17, 15, dtype=torch.float64, generator=g)
    y_label = torch.randint(0, 10, (3,), generator=g)
    for model in (full, packed):
        model.train(training)
    for _ in range(2):  # a second step sees other channels and updated statistics
        selection = _random_selection(plan_full, 0.4, g)
        plan_full.apply(selection)
        plan_packed.apply(selection)
        outputs = []
        for model in (full, packed):
            model.zero_grad()
            out = model(x)
            if training:
                F.cross_entropy(out, y_label).backward()
            outputs.append(out.detach())
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-10)
    if training:
        for (n, p_full), p_packed in zip(full.named_parameters(), packed.parameters()):
            torch.testing.assert_close(p_packed.grad, p_full.grad, rtol=1e-9, atol=1e-10, msg=n)
        for s_full, s_packed in zip(plan_full.saliency(), plan_packed.saliency()):
            torch.testing.assert_close(s_packed, s_full, rtol=1e-9, atol=1e-12)
    for (n, b_full), b_packed in zip(full.named_buffers(), packed.buffers()):
        torch.testing.assert_close(b_packed, b_full, rtol=1e-12, atol=1e-12, msg=n)


def test_packed_batchnorm_equals_full_width_batchnorm():
    c, idx = 7, torch.tensor([1, 2, 5])
    full = ChannelSparseBatchNorm2d(c)
    with torch.no_grad():
        full.weight.uniform_(0.5, 1.5)
        full.bias.uniform_(-0.5, 0.5)
    packed = copy.deepcopy(full)
    packed.packed = True
    full.set_active(idx)
    packed.set_active(idx)
    x = torch.randn(4, c, 3, 5, requires_grad=True)
    y_full = full(x)
    x_packed = x.detach()[:, idx].clone().requires_grad_()
    y_packed = packed(x_packed)
    torch.testing.assert_close(y_packed, y_full[:, idx])
    g = torch.randn_like(y_packed)
    y_packed.backward(g)
    y_full.backward(torch.zeros_like(y_full).index_copy(1, idx, g))
    torch.testing.assert_close(x_packed.grad, x.grad[:, idx])
    torch.testing.assert_close(packed.weight.grad, full.weight.grad)
    torch.testing.assert_close(packed.running_mean, full.running_mean)
    with pytest.raises(ValueError, match="packed input has 7 channels, but 3 are active"):
        packed(x)


BLOCK_CASES = [(shape, sides) for shape in [(9, 7, 3, 3), (5, 11), (6,), (4, 3, 2, 5, 2)]
               for sides in ["rows", "cols", "both"] if len(shape) >= 2 or sides == "rows"]


@pytest.mark.parametrize("shape, sides", BLOCK_CASES)
def test_gather_and_scatter_block_match_aten_indexing(shape, sides):
    g = torch.Generator().manual_seed(1)
    src = torch.randn(shape, generator=g, dtype=torch.float64)
    rows = torch.randperm(shape[0], generator=g)[:max(1, shape[0] // 2)] if sides != "cols" else None
    cols = torch.randperm(shape[1], generator=g)[:max(1, shape[1] // 2)] if sides != "rows" else None
    expected = src if rows is None else src[rows]
    expected = expected if cols is None else expected[:, cols]
    torch.testing.assert_close(gather_block(src, rows, cols), expected, rtol=0, atol=0)

    dst = torch.randn(shape, generator=g, dtype=torch.float64)
    block = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    want = dst.clone()
    r = torch.arange(shape[0]) if rows is None else rows
    if cols is None:
        want[r] = block
    else:
        want[r.unsqueeze(1), cols] = block
    scatter_block_(dst, rows, cols, block)
    torch.testing.assert_close(dst, want, rtol=0, atol=0)


@pytest.mark.parametrize("call, message", [
    (lambda t: torch.ops.dce.gather_block(t, torch.tensor([0, 9]), None), "out of range"),
    (lambda t: torch.ops.dce.gather_block(t, torch.tensor([1, 1]), None), "more than once"),
    (lambda t: torch.ops.dce.gather_block(t, torch.tensor([[0]]), None), "1-D"),
    (lambda t: torch.ops.dce.gather_block(t, torch.tensor([0.0]), None), "integer"),
    (lambda t: torch.ops.dce.scatter_block_(t, torch.tensor([0]), None, torch.zeros(2, 4)),
     "block shape"),
    (lambda t: torch.ops.dce.scatter_block_(t, torch.tensor([0]), None,
                                            torch.zeros(1, 4, dtype=torch.float64)), "dtype"),
])
def test_block_ops_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.randn(3, 4))


def test_opcheck_block_ops():
    t = torch.randn(6, 5, 3)
    rows, cols = torch.tensor([4, 0, 2]), torch.tensor([1, 3])
    torch.library.opcheck(torch.ops.dce.gather_block.default, (t, rows, cols))
    torch.library.opcheck(torch.ops.dce.scatter_block_.default,
                          (t.clone(), rows, cols, torch.randn(3, 2, 3)))
