"""ChannelSparseGroupNorm against a GroupNorm written out over the active channels of
each group (float64, odd sizes), nn.GroupNorm when all are active, its packed layout,
its export, and bad input."""
import pytest
import torch
from torch import nn

from dce_kernels import ChannelSparseGroupNorm
from dce_kernels.compact import _plain_group_norm
from toolkit import masked_group_norm


def _balanced(channels, groups, per_group, generator):
    run = channels // groups
    return torch.cat([torch.randperm(run, generator=generator)[:per_group].sort().values
                      + g * run for g in range(groups)])


def _layer(groups, channels, affine=True):
    gn = nn.GroupNorm(groups, channels, eps=1e-4, affine=affine).double()
    if affine:
        with torch.no_grad():
            gn.weight.uniform_(0.5, 1.5)
            gn.bias.uniform_(-1, 1)
    return gn


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("groups,channels,per_group", [(3, 12, 2), (5, 15, 1), (1, 7, 4),
                                                       (2, 10, 5)])
def test_active_channels_match_the_written_out_reference(groups, channels, per_group, affine):
    gen = torch.Generator().manual_seed(channels)
    dense = _layer(groups, channels, affine)
    layer = ChannelSparseGroupNorm.from_module(dense)
    assert layer.weight is dense.weight  # shared, not copied
    idx = _balanced(channels, groups, per_group, gen)
    layer.set_active(idx)
    x = torch.randn(3, channels, 5, 7, dtype=torch.float64, generator=gen)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xs)
    want = masked_group_norm(xr, groups, dense.weight, dense.bias, dense.eps, idx)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    params = [dense.weight, dense.bias] if affine else []
    got = torch.autograd.grad(y, [xs] + params, g)
    ref = torch.autograd.grad(want, [xr] + params, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    inactive = torch.ones(channels, dtype=torch.bool)
    inactive[idx] = False
    assert y[:, inactive].eq(0).all() and got[0][:, inactive].eq(0).all()

    # Packed: only the active channels in, the same values out.
    layer.packed = True
    torch.testing.assert_close(layer(x[:, idx]), y[:, idx].detach(), rtol=0, atol=0)
    layer.packed = False
    # The export: nn.GroupNorm of as many groups over the active channels.
    plain = _plain_group_norm(layer)
    assert type(plain) is nn.GroupNorm and plain.num_groups == groups
    torch.testing.assert_close(plain(x[:, idx]), y[:, idx].detach(), rtol=1e-12, atol=1e-12)


def test_all_channels_active_is_nn_group_norm_and_bad_input_raises():
    gen = torch.Generator().manual_seed(0)
    dense = _layer(3, 9)
    layer = ChannelSparseGroupNorm.from_module(dense)
    x = torch.randn(2, 9, 4, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="equally many active channels in every group"):
        layer.set_active([0, 1, 3])  # two of group 0, one of group 1, none of group 2
    layer.set_active([0, 4, 8])
    with pytest.raises(ValueError, match="input has 8 channels"):
        layer(x[:, :8])
    layer.packed = True
    with pytest.raises(ValueError, match="packed input has 9 channels, but 3 are active"):
        layer(x)
    with pytest.raises(TypeError, match="expects an nn.GroupNorm"):
        ChannelSparseGroupNorm.from_module(nn.BatchNorm2d(4))
