"""ChannelSparseLayerNorm: a LayerNorm over channels whose mean and variance run
over the active channels only, against F.layer_norm of the gathered active
channels (float64, odd sizes), channels last and (N, C, H, W) as timm's
LayerNorm2d; all channels active is the module it was made from; packed
activations; bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dce_kernels import ChannelSparseLayerNorm


class LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over the channels of (N, C, H, W) tensors, as timm writes it."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


def _made(channel_dim, c=7, bias=True, affine=True):
    dense = (nn.LayerNorm(c, eps=1e-5, elementwise_affine=affine, bias=bias) if channel_dim == -1
             else LayerNorm2d(c, eps=1e-6, elementwise_affine=affine, bias=bias)).double()
    with torch.no_grad():
        for p in dense.parameters():
            p.uniform_(-1.5, 1.5)
    return dense, ChannelSparseLayerNorm.from_module(dense, channel_dim)


def _input(channel_dim, c=7, generator=None):
    shape = (3, 5, 3, c) if channel_dim == -1 else (3, c, 5, 3)
    return torch.randn(*shape, dtype=torch.float64, generator=generator)


def _reference(x, dense, idx, channel_dim):
    """F.layer_norm over the gathered active channels, scattered into zeros."""
    last = x if channel_dim == -1 else x.permute(0, 2, 3, 1)
    weight = dense.weight[idx] if dense.weight is not None else None
    bias = dense.bias[idx] if dense.bias is not None else None
    active = F.layer_norm(last[..., idx], (idx.numel(),), weight, bias, dense.eps)
    out = torch.zeros_like(last)
    out[..., idx] = active
    return out if channel_dim == -1 else out.permute(0, 3, 1, 2)


@pytest.mark.parametrize("channel_dim", [-1, 1])
@pytest.mark.parametrize("bias,affine", [(True, True), (False, True), (False, False)])
def test_normalizes_over_the_active_channels_only(channel_dim, bias, affine):
    dense, sparse = _made(channel_dim, bias=bias, affine=affine)
    gen = torch.Generator().manual_seed(0)
    dim = channel_dim % 4
    for idx in (torch.tensor([0, 3, 4, 6]), torch.tensor([2]), torch.tensor([1, 5])):
        sparse.set_active(idx)
        x = _input(channel_dim, generator=gen).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y, want = sparse(x), _reference(xr, dense, idx, channel_dim)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        inactive = torch.tensor([i for i in range(7) if i not in idx.tolist()])
        assert y.index_select(dim, inactive).eq(0).all()
        g = torch.randn(y.shape, dtype=y.dtype, generator=gen)
        params = list(dense.parameters())
        got = torch.autograd.grad(y, [x] + params, g)
        ref = torch.autograd.grad(want, [xr] + params, g)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
        assert got[0].index_select(dim, inactive).eq(0).all()
        for p in got[1:]:
            assert p[inactive].eq(0).all()  # inactive weight and bias learn nothing


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_all_channels_active_is_the_module_it_was_made_from(channel_dim):
    dense, sparse = _made(channel_dim)
    assert sparse.dense_type is type(dense) and sparse.weight is dense.weight
    assert set(sparse.state_dict()) == set(dense.state_dict())
    x = _input(channel_dim).requires_grad_()
    y, want = sparse(x), dense(x)
    assert torch.equal(y, want)
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(want, x, g)[0])
    # Selecting a subset and then all of them again is the dense module again.
    sparse.set_active([1, 2])
    sparse.set_active(None)
    assert torch.equal(sparse(x), want)


def test_constructor_is_layernorms_own_channels_last():
    layer = ChannelSparseLayerNorm(5, eps=1e-4).double()
    ref = nn.LayerNorm(5, eps=1e-4).double()
    assert layer.channel_dim == -1 and layer.dense_type is nn.LayerNorm
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(layer.weight)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    assert torch.equal(layer(x), ref(x))
    layer.set_active([0, 4])
    torch.testing.assert_close(layer(x)[..., [0, 4]],
                               F.layer_norm(x[..., [0, 4]], (2,), ref.weight[[0, 4]],
                                            ref.bias[[0, 4]], 1e-4))


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_packed_equals_full_width(channel_dim):
    _, sparse = _made(channel_dim)
    packed = copy.deepcopy(sparse)
    packed.packed = True
    idx = torch.tensor([0, 2, 3, 6])
    sparse.set_active(idx)
    packed.set_active(idx)
    dim = channel_dim % 4
    x = _input(channel_dim).requires_grad_()
    xp = x.detach().index_select(dim, idx).requires_grad_()
    y, yp = sparse(x), packed(xp)
    torch.testing.assert_close(yp, y.index_select(dim, idx), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(yp)
    (y.index_select(dim, idx) * g).sum().backward()
    (yp * g).sum().backward()
    torch.testing.assert_close(xp.grad, x.grad.index_select(dim, idx), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed.weight.grad, sparse.weight.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="packed input has 7 channels, but 4 are active"):
        packed(x)


def test_bad_input_gets_clear_errors():
    with pytest.raises(TypeError, match="expected an nn.LayerNorm"):
        ChannelSparseLayerNorm.from_module(nn.BatchNorm2d(3), 1)
    with pytest.raises(ValueError, match="normalizes over one dim"):
        ChannelSparseLayerNorm.from_module(nn.LayerNorm((3, 4)), -1)
    with pytest.raises(ValueError, match="channel_dim must be 1"):
        ChannelSparseLayerNorm.from_module(nn.LayerNorm(3), 2)
    layer = ChannelSparseLayerNorm.from_module(LayerNorm2d(4), 1)
    with pytest.raises(ValueError, match="outside"):
        layer.set_active([0, 4])
    with pytest.raises(ValueError, match="empty"):
        layer.set_active([])
    layer.set_active([1, 3])
    with pytest.raises(ValueError, match="input has 5 channels in dim 1, the LayerNorm 4"):
        layer(torch.randn(2, 5, 3, 3))
