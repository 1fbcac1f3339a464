"""ChannelSparseBatchNorm2d: skipping inactive channels against a masked
nn.BatchNorm2d, and packed activations against full-width ones."""
import copy

import pytest
import torch
from torch import nn

from dce_kernels import ChannelSparseBatchNorm2d


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
