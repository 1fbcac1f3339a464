"""Channel-sparse BatchNorm, channel linking and masked optimizer steps."""
import copy

import pytest
import torch
from torch import nn

from dce_kernels import ChannelSparseBatchNorm2d, ChannelSparseConv2d
from dce_kernels.channels import ChannelPlan, plan_for, sequential_groups
from dce_kernels.optim import ActiveBlock, MaskedOptimizer


# -- BatchNorm skip ---------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_skip_matches_masked_dense(momentum):
    c = 6
    idx = torch.tensor([0, 2, 3])
    sparse = ChannelSparseBatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        sparse.weight.uniform_(0.5, 1.5)
        sparse.bias.uniform_(-0.5, 0.5)
        sparse.running_mean.uniform_(-1, 1)
        sparse.running_var.uniform_(0.5, 2)
    dense = copy.deepcopy(nn.BatchNorm2d(c, momentum=momentum))
    dense.load_state_dict(sparse.state_dict())
    assert set(sparse.state_dict()) == set(nn.BatchNorm2d(c).state_dict())
    sparse.set_active(idx)
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    mask = torch.zeros(1, c, 1, 1)
    mask[:, idx] = 1

    for step in range(3):
        x = torch.randn(4, c, 5, 5, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        y = sparse(x)
        y_ref = dense(x_ref) * mask  # reference: dense BN, inactive outputs masked
        assert torch.allclose(y, y_ref, atol=1e-5)
        assert y[:, [1, 4, 5]].eq(0).all()
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
        assert torch.allclose(sparse.weight.grad, dense.weight.grad, atol=1e-5)
        assert sparse.weight.grad[[1, 4, 5]].eq(0).all()
        sparse.weight.grad = sparse.bias.grad = dense.weight.grad = dense.bias.grad = None

    inactive = torch.tensor([1, 4, 5])
    for name in ("running_mean", "running_var"):
        now = getattr(sparse, name)
        assert torch.equal(now[inactive], before[name][inactive])  # untouched
        assert torch.allclose(now[idx], getattr(dense, name)[idx], atol=1e-6)
        assert not torch.equal(now[idx], before[name][idx])
    assert sparse.num_batches_tracked.item() == 3

    sparse.eval(), dense.eval()
    x = torch.randn(2, c, 3, 3)
    assert torch.allclose(sparse(x), dense(x) * mask, atol=1e-6)


def test_batchnorm_all_active_is_batchnorm():
    bn, ref = ChannelSparseBatchNorm2d(4), nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 2, 2)
    assert torch.allclose(bn(x), ref(x))
    with pytest.raises(ValueError, match="outside"):
        bn.set_active([0, 4])


# -- linking -----------------------------------------------------------------------

def _net(in_ch=3, widths=(6, 8, 5), classes=4):
    layers, c = [], in_ch
    for i, w in enumerate(widths):
        layers += [ChannelSparseConv2d(c, w, 3, padding=1, bias=(i == 1)),
                   ChannelSparseBatchNorm2d(w), nn.ReLU()]
        if i == 0:
            layers.append(nn.MaxPool2d(2))
        c = w
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.0), nn.Linear(c * 4, classes)]
    return nn.Sequential(*layers)


def test_sequential_groups_link_producers_and_consumers():
    net = _net()
    groups = sequential_groups(net)
    assert len(groups) == 3
    assert groups[0].producer is net[0] and groups[0].norms == [net[1]]
    assert groups[0].consumers == [net[4]]  # through ReLU and MaxPool
    assert groups[1].consumers == [net[7]]
    assert groups[2].linears == [net[13]] and groups[2].consumers == []


def test_selection_links_input_channels_and_matches_masked_dense():
    net = _net()
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
        plan_for(_net()).apply([torch.tensor([0])])
    with pytest.raises(ValueError, match="no ChannelSparseConv2d"):
        plan_for(nn.Sequential(nn.Linear(2, 2)))


# -- optimizer masking -------------------------------------------------------------

def _active_rows(param, idx):
    return lambda: [ActiveBlock(param, rows=idx)]


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.05),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.05),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
], ids=["sgd-momentum-wd", "sgd-nesterov", "adam", "adamw"])
def test_inactive_rows_untouched_and_active_rows_train_as_a_narrow_tensor(make_opt):
    full = torch.randn(6, 3, requires_grad=True)
    active = torch.tensor([0, 2, 5])
    inactive = torch.tensor([1, 3, 4])
    opt = MaskedOptimizer(make_opt([full]), _active_rows(full, active))
    # Reference: the same optimizer on a physically narrow tensor of the active rows.
    narrow = full.detach()[active].clone().requires_grad_(True)
    ref = make_opt([narrow])
    start = full.detach().clone()
    for _ in range(4):
        target = torch.randn(6, 3)
        target_rows = target[active]
        opt.zero_grad(), ref.zero_grad()
        # Inactive rows get zero gradient, as from the sparse conv.
        ((full * torch.isin(torch.arange(6), active).unsqueeze(1)) - target).square().sum().backward()
        (narrow - target_rows).square().sum().backward()
        opt.step()
        ref.step()
    assert torch.equal(full.detach()[inactive], start[inactive])
    assert torch.allclose(full.detach()[active], narrow.detach(), atol=1e-6)
    for key, value in opt.state[full].items():
        if torch.is_tensor(value) and value.shape == full.shape:
            assert value[inactive].eq(0).all(), key
            assert torch.allclose(value[active], ref.state[narrow][key], atol=1e-6), key


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_state_of_channels_that_go_inactive_is_kept(kind):
    w = torch.randn(4, 5, 3, 3, requires_grad=True)
    blocks = []
    opt_cls = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2)) \
        if kind == "sgd" else (lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=1e-2))
    opt = MaskedOptimizer(opt_cls([w]), lambda: blocks)
    for _ in range(2):  # all channels active: every row gets state
        opt.zero_grad()
        w.square().sum().backward()
        opt.step()
    blocks[:] = [ActiveBlock(w, rows=torch.tensor([0, 2]), cols=torch.tensor([1, 2, 3]))]
    before = w.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[w].items() if v.shape == w.shape}
    for _ in range(3):
        opt.zero_grad()
        (w * torch.randn_like(w)).sum().backward()
        opt.step()
    for t_now, t_before in [(w.detach(), before)] + [
            (opt.state[w][k], v) for k, v in state_before.items()]:
        assert torch.equal(t_now[[1, 3]], t_before[[1, 3]])
        assert torch.equal(t_now[:, [0, 4]], t_before[:, [0, 4]])
        assert not torch.equal(t_now[[0, 2]][:, 1:4], t_before[[0, 2]][:, 1:4])


def test_plan_active_blocks_keep_a_whole_network_step():
    net = _net()
    plan = plan_for(net)
    sel = [torch.tensor([1, 4]), torch.tensor([0, 2, 6]), torch.tensor([3, 4])]
    plan.apply(sel)
    opt = MaskedOptimizer(torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9,
                                          weight_decay=0.1), plan.active_blocks)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
    p = dict(net.named_parameters())

    def unchanged(name, rows=None, cols=None):
        t, b = p[name].detach(), before[name]
        if rows is not None:
            t, b = t[rows], b[rows]
        if cols is not None:
            t, b = t[:, cols], b[:, cols]
        return torch.equal(t, b)

    inactive0 = [0, 2, 3, 5]
    inactive1 = [1, 3, 4, 5, 7]
    assert unchanged("0.weight", rows=inactive0) and not unchanged("0.weight", rows=[1, 4])
    assert unchanged("1.weight", rows=inactive0) and unchanged("1.bias", rows=inactive0)
    assert unchanged("4.weight", rows=inactive1) and unchanged("4.bias", rows=inactive1)
    assert unchanged("4.weight", cols=inactive0)
    assert not unchanged("4.weight", rows=[0, 2, 6], cols=[1, 4])
    assert unchanged("7.weight", cols=inactive1)
    # Linear columns of inactive channels (4 spatial features per channel) too.
    inactive_feats = [f for c in (0, 1, 2) for f in range(4 * c, 4 * c + 4)]
    assert unchanged("13.weight", cols=inactive_feats)
    assert not unchanged("13.weight", cols=list(range(12, 20)))
