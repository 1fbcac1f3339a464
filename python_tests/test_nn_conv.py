"""ChannelSparseConv2d as a drop-in nn.Conv2d, and its saliency."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from dce_kernels import ChannelSparseConv2d
from toolkit import masked_dense

CONV_CONFIGS = [
    dict(in_channels=3, out_channels=5, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, bias=False),
    dict(in_channels=5, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    dict(in_channels=3, out_channels=3, kernel_size=3, dilation=2, padding=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="replicate"),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=(1, 2), padding_mode="circular"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="same"),
    dict(in_channels=3, out_channels=5, kernel_size=(2, 4), padding="same", dilation=(1, 2)),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"),
    dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=1, stride=3),
]


def _pair(config, dtype=torch.float64):
    dense = nn.Conv2d(**config, dtype=dtype)
    sparse = ChannelSparseConv2d(**config, dtype=dtype)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_all_active_behaves_exactly_like_nn_conv2d(config, unbatched):
    dense, sparse = _pair(config)
    shape = (config["in_channels"], 9, 8) if unbatched else (2, config["in_channels"], 9, 8)
    x = torch.randn(*shape, dtype=torch.float64)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd, ys = dense(xd), sparse(xs)
    assert ys.shape == yd.shape
    torch.testing.assert_close(ys, yd, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(yd)
    yd.backward(g)
    ys.backward(g)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-12, atol=1e-12)
    for (name, pd), ps in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(ps.grad, pd.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_state_dict_keys_and_constructor_match_nn_conv2d():
    dense, sparse = _pair(dict(in_channels=3, out_channels=4, kernel_size=3))
    assert list(sparse.state_dict()) == list(dense.state_dict())
    sparse.set_active(out_idx=[1, 2])
    assert list(sparse.state_dict()) == list(dense.state_dict())
    assert isinstance(sparse, nn.Conv2d)
    nn.Conv2d(3, 4, 3).load_state_dict(sparse.state_dict())


def test_from_dense_shares_parameters_and_configuration():
    conv = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=1, bias=True,
                     padding_mode="reflect")
    layer = ChannelSparseConv2d.from_dense(conv)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(layer(x), conv(x))
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        ChannelSparseConv2d.from_dense(nn.Linear(3, 3))


def test_set_active_computes_the_masked_reference_and_reports_saliency():
    _, layer = _pair(dict(in_channels=7, out_channels=6, kernel_size=3, padding=1))
    out_idx, in_idx = torch.tensor([5, 0, 2]), torch.tensor([1, 3, 4, 6])
    layer.set_active(out_idx=out_idx, in_idx=in_idx)
    x = torch.randn(3, 7, 8, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    ref = masked_dense(x, layer.weight, layer.bias, in_idx, out_idx, g, padding=1)
    torch.testing.assert_close(y, ref.output)
    torch.testing.assert_close(x.grad, ref.grad_input)
    torch.testing.assert_close(layer.weight.grad, ref.grad_weight)
    torch.testing.assert_close(layer.saliency, ref.saliency)
    assert layer.saliency.shape == (6,)


def test_saliency_is_the_last_backward_not_a_sum():
    layer = ChannelSparseConv2d(3, 4, 3, padding=1)
    x1, x2 = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    layer(x1).square().sum().backward()
    layer(x2).square().sum().backward()
    second = layer.saliency.clone()
    fresh = copy.deepcopy(layer)
    fresh(x2).square().sum().backward()
    torch.testing.assert_close(second, fresh.saliency)


def test_no_saliency_in_eval_or_when_disabled():
    layer = ChannelSparseConv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    layer.eval()
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.saliency) == 0
    layer.train()
    layer.track_saliency = False
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.saliency) == 0
    layer.track_saliency = True
    layer(x).square().sum().backward()
    assert torch.count_nonzero(layer.saliency) == 4


def test_dtype_change_keeps_saliency_working():
    layer = ChannelSparseConv2d(3, 4, 3).double()
    layer(torch.randn(2, 3, 5, 5, dtype=torch.float64)).square().sum().backward()
    assert layer.saliency.dtype == torch.float64
    assert torch.count_nonzero(layer.saliency) == 4


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(out_idx=[0, 0]), ValueError, "more than once"),
    (dict(out_idx=[9]), ValueError, "outside"),
    (dict(in_idx=[-1]), ValueError, "outside"),
    (dict(in_idx=[]), ValueError, "empty"),
    (dict(out_idx=[[0, 1]]), ValueError, "1-D"),
    (dict(out_idx=[0.5]), TypeError, "integer"),
])
def test_set_active_rejects_bad_lists(kwargs, error, message):
    layer = ChannelSparseConv2d(3, 4, 3)
    with pytest.raises(error, match=message):
        layer.set_active(**kwargs)


def test_compile_fullgraph_delivers_saliency_and_matches_eager():
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(ChannelSparseConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            ChannelSparseConv2d(8, 6, 3, padding=1))
        net[0].set_active(out_idx=[0, 3, 4, 7])
        net[3].set_active(in_idx=[0, 3, 4, 7], out_idx=[1, 5])
        return net

    x = torch.randn(4, 3, 10, 10)
    eager, compiled_net = make(), make()
    compiled = torch.compile(compiled_net, fullgraph=True)
    eager(x).square().mean().backward()
    compiled(x).square().mean().backward()
    for a, b in zip(eager.parameters(), compiled_net.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    for i in (0, 3):
        assert torch.count_nonzero(compiled_net[i].saliency) == compiled_net[i].active_out_channels
        torch.testing.assert_close(compiled_net[i].saliency, eager[i].saliency,
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_copied_layer_reports_its_own_saliency(clone):
    """A copy gets a probe of its own: its saliency arrives in the copy, and the
    original's stays as it was."""
    original = ChannelSparseConv2d(3, 5, 3, padding=1)
    copied = clone(original)
    x = torch.randn(2, 3, 6, 6)
    copied(x).square().sum().backward()
    assert copied.saliency.abs().sum() > 0
    assert original.saliency.eq(0).all()
    # The same computation on the original gives the same saliency.
    original(x).square().sum().backward()
    torch.testing.assert_close(copied.saliency, original.saliency)
