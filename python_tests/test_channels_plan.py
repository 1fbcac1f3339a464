"""Channel linking (dce_kernels.channels: sequential_groups, plan_for and
ChannelPlan.apply) on a small sequential network against masked dense layers,
and packed activations between the layers of a plan against full-width ones."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dce_kernels import ChannelSparseBatchNorm2d, ChannelSparseConv2d
from dce_kernels.channels import plan_for, sequential_groups
from dce_kernels.experiments.models import build_model
from toolkit import random_selection, small_sparse_net


def test_sequential_groups_link_producers_and_consumers():
    net = small_sparse_net()
    groups = sequential_groups(net)
    assert len(groups) == 3
    assert groups[0].producer is net[0] and groups[0].norms == [net[1]]
    assert groups[0].consumers == [net[4]]  # through ReLU and MaxPool
    assert groups[1].consumers == [net[7]]
    assert groups[2].linears == [net[13]] and groups[2].consumers == []


def test_selection_links_input_channels_and_matches_masked_dense():
    net = small_sparse_net()
    plan = plan_for(net)
    sel = [torch.tensor([1, 4, 5]), torch.tensor([0, 2, 6, 7]), torch.tensor([3])]
    plan.apply(sel)
    assert torch.equal(net[4].in_idx, sel[0]) and torch.equal(net[4].out_idx, sel[1])
    assert torch.equal(net[7].in_idx, sel[1]) and torch.equal(net[7].out_idx, sel[2])
    assert net[0].in_idx.numel() == 3  # the image's channels all stay
    assert torch.equal(net[5].active_idx, sel[1])

    # Reference: the same weights in dense layers with each conv's outputs masked.
    ref = nn.Sequential(*[
        nn.Conv2d(m.in_channels, m.out_channels, 3, padding=1, bias=m.bias is not None)
        if isinstance(m, ChannelSparseConv2d) else
        nn.BatchNorm2d(m.num_features) if isinstance(m, ChannelSparseBatchNorm2d) else
        copy.deepcopy(m) for m in net])
    ref.load_state_dict(net.state_dict())
    masks = {0: sel[0], 4: sel[1], 7: sel[2]}

    def ref_forward(x):
        for i, m in enumerate(ref):
            x = m(x)
            if i - 1 in masks and isinstance(m, nn.BatchNorm2d):
                keep = torch.zeros(x.shape[1], dtype=torch.bool)
                keep[masks[i - 1]] = True
                x = x * keep.view(1, -1, 1, 1)
        return x

    x = torch.randn(5, 3, 8, 8)
    assert torch.allclose(net(x), ref_forward(x), atol=1e-5)
    net(x).square().sum().backward()
    # Saliency comes only from active channels of each producer.
    for s, idx in zip(plan.saliency(), sel):
        inactive = torch.ones(s.numel(), dtype=torch.bool)
        inactive[idx] = False
        assert s[inactive].eq(0).all() and s[idx].gt(0).any()

    plan.apply(None)
    assert all(m.out_idx.numel() == m.out_channels for m in plan.convs)


def test_linking_errors_are_clear():
    bad = nn.Sequential(ChannelSparseConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="cannot link channels through 1"):
        sequential_groups(bad)
    with pytest.raises(ValueError, match="1 entries for 3 channel groups"):
        plan_for(small_sparse_net()).apply([torch.tensor([0])])
    with pytest.raises(ValueError, match="no ChannelSparseConv2d"):
        plan_for(nn.Sequential(nn.Linear(2, 2)))


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
        selection = random_selection(plan_full.num_channels, 0.4, g)
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


@pytest.mark.parametrize("model", ["small", "resnet20"])
def test_apply_without_validation_reads_nothing_to_the_host_and_sets_the_same(model,
                                                                            monkeypatch):
    from dce_kernels import CUCBSelector
    from toolkit import NoHostReads

    net = small_sparse_net() if model == "small" else build_model("resnet20", 3, 10, width=0.5)
    plan = plan_for(net)
    sel = CUCBSelector(plan.num_channels, fraction=0.4, tau=2, seed=5)
    layers = [m for m in net.modules() if isinstance(m, (ChannelSparseConv2d,
                                                         ChannelSparseBatchNorm2d))]

    def indices():
        return [[t.tolist() for t in ((m.out_idx, m.in_idx) if isinstance(m, ChannelSparseConv2d)
                                      else (m.active_idx,))] for m in layers]

    for _ in range(3):
        chosen = sel.select()
        plan.apply([c.clone() for c in chosen])  # validated: the reference
        want, want_blocks = indices(), [(b.rows, b.cols) for b in plan.active_blocks()]
        plan.apply(None)
        with NoHostReads(monkeypatch) as mode:
            plan.apply(chosen, validate=False)
            plan.saliency()
        assert mode.reads == []
        assert indices() == want
        got_blocks = [(b.rows, b.cols) for b in plan.active_blocks()]
        assert len(got_blocks) == len(want_blocks)
        for (r, c), (wr, wc) in zip(got_blocks, want_blocks):
            assert (r is None) == (wr is None) and (c is None) == (wc is None)
            assert (r is None or torch.equal(r, wr)) and (c is None or torch.equal(c, wc))
        assert [s.tolist() for s in plan.selection] == [c.tolist() for c in chosen]
        sel.update([torch.rand(c) for c in plan.num_channels])
