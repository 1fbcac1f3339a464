"""MaskedOptimizer: inactive rows and their state untouched, active rows trained
as a physically narrow tensor, and a whole network step with a plan's blocks."""
import pytest
import torch

from dce_kernels.channels import plan_for
from dce_kernels.optim import ActiveBlock, MaskedOptimizer
from toolkit import small_sparse_net


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
    net = small_sparse_net()
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
