"""FLOP formulas of the dce ops and parameter counts of sparse layers.

The reference for every FLOP count is PyTorch's own counter on a physically
narrower dense conv: the conv the active channels amount to.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dce_kernels import ChannelSparseConv2d, channel_sparse_conv2d
from dce_kernels.flops import count_flops, count_params
from toolkit import ConvCase


def flops_of(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# Sparse convolutions and how many of their channels are active.
CASES = [
    ConvCase(2, 8, 12, 9, 9, active_in=4, active_out=3),
    ConvCase(3, 6, 5, 10, 7, kernel=(3, 1), stride=(2, 1), padding=(1, 0), active_in=4,
             active_out=5),
    ConvCase(1, 16, 16, 8, 8, kernel=1, padding=0, active_in=16, active_out=6),
    ConvCase(2, 5, 9, 11, 11, stride=2, padding=2, dilation=2, active_in=1, active_out=5),
    ConvCase(4, 7, 3, 6, 5, kernel=5, stride=3, padding=2, active_in=2, active_out=1),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("mode", ["forward", "fwd+bwd", "fwd+bwd-weights-only"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_op_flops_equal_narrow_dense_conv(case, mode, bias):
    case = dataclasses.replace(case, bias=bias)
    in_idx, out_idx = case.random_indices()
    backward = mode != "forward"
    input_grad = mode == "fwd+bwd"

    x, weight, b = case.tensors(torch.float32, "cpu")
    x.requires_grad_(input_grad)
    weight.requires_grad_(backward)
    if bias:
        b.requires_grad_(backward)
    # The narrow conv holds only the active channels, as separate leaf tensors.
    x_n = x.detach()[:, in_idx].clone().requires_grad_(input_grad)
    w_n = weight.detach()[out_idx][:, in_idx].clone().requires_grad_(backward)
    b_n = b.detach()[out_idx].clone().requires_grad_(backward) if bias else None

    def run(conv):
        def go():
            y = conv()
            if backward:
                y.backward(torch.randn_like(y))
        return go

    args = case.conv_args()
    ours = flops_of(run(lambda: channel_sparse_conv2d(x, weight, b, in_idx, out_idx, **args)))
    ref = flops_of(run(lambda: F.conv2d(x_n, w_n, b_n, **args)))
    assert ref > 0
    assert ours == ref


def test_backward_counts_follow_output_mask():
    # Direct calls of the backward op: each mask entry adds its own conv.
    x, wgt = torch.randn(2, 6, 8, 8), torch.randn(4, 6, 3, 3)
    in_idx, out_idx = torch.tensor([0, 3, 5]), torch.tensor([1, 2])
    g = torch.randn(2, 4, 6, 6)
    op = torch.ops.dce.channel_sparse_conv2d_backward.default

    def bwd(mask):
        return flops_of(lambda: op(g, x, wgt, None, in_idx, out_idx, [1, 1], [0, 0], [1, 1], 1,
                                   mask))

    one_conv = 2 * 2 * 6 * 6 * 2 * 3 * 9  # 2 * N * H_out * W_out * |out| * |in| * kH * kW
    assert bwd([False, False, True]) == 0
    assert bwd([True, False, False]) == one_conv
    assert bwd([False, True, True]) == one_conv
    assert bwd([True, True, False]) == 2 * one_conv


@pytest.mark.parametrize("backward", [False, True])
def test_full_activation_equals_nn_conv2d(backward):
    dense = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    sparse = ChannelSparseConv2d.from_dense(dense)
    x = torch.randn(3, 6, 12, 12)
    assert count_flops(sparse, x, backward) == count_flops(dense, x, backward) > 0


@pytest.mark.parametrize("backward", [False, True])
def test_grouped_conv_counts_the_dense_conv_it_runs(backward):
    dense = nn.Conv2d(8, 6, 3, padding=1, groups=2)
    sparse = ChannelSparseConv2d.from_dense(dense)
    sparse.set_active(out_idx=[0, 4], in_idx=[1, 2, 6])
    x = torch.randn(2, 8, 7, 7)
    assert count_flops(sparse, x, backward) == count_flops(dense, x, backward) > 0


@pytest.mark.parametrize("backward", [False, True])
def test_depthwise_conv_on_its_active_planes_counts_the_narrow_depthwise_conv(backward):
    sparse = ChannelSparseConv2d(9, 9, 3, padding=1, groups=9)
    sparse.set_active(out_idx=[1, 4, 5, 8], in_idx=[1, 4, 5, 8])
    narrow = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    x = torch.randn(2, 9, 7, 5)
    assert count_flops(sparse, x, backward) == count_flops(narrow, x[:, :4], backward) > 0


@pytest.mark.parametrize("backward", [False, True])
def test_count_flops_of_a_model_equals_its_narrow_twin(backward):
    active = [[0, 2], [1, 3, 4, 7], [0, 5, 6]]  # channels kept at each of 3 widths 3/8/8
    sparse = nn.Sequential(ChannelSparseConv2d(3, 8, 3, padding=1), nn.ReLU(),
                           ChannelSparseConv2d(8, 8, 3, stride=2))
    sparse[0].set_active(out_idx=active[1], in_idx=active[0])
    sparse[2].set_active(out_idx=active[2], in_idx=active[1])
    narrow = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2))
    x = torch.randn(2, 3, 10, 10)
    ours = count_flops(sparse, x, backward)
    assert ours == count_flops(narrow, x[:, active[0]], backward) > 0
    if backward:
        # Forward, then backward: weight grads of both layers and the input grad of the
        # second (the model's input needs none): 3x the forward less the first layer.
        fwd = count_flops(narrow, x[:, active[0]])
        assert ours == 3 * fwd - count_flops(narrow[:1], x[:, active[0]])


def test_count_flops_leaves_model_state_alone():
    model = nn.Sequential(ChannelSparseConv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = model[1].running_mean.clone()
    count_flops(model, torch.randn(2, 3, 6, 6), backward=True)
    assert model.training and model[0].training
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model[1].running_mean, before)


def test_count_flops_backward_needs_a_tensor_output():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.conv(x), x

    with pytest.raises(TypeError, match="one tensor"):
        count_flops(Pair(), torch.randn(1, 1, 2, 2), backward=True)


def test_count_params_active_channels_by_hand():
    conv1 = ChannelSparseConv2d(6, 8, 3)
    bn = nn.BatchNorm2d(8)
    conv2 = ChannelSparseConv2d(8, 4, (3, 1), bias=False)
    grouped = ChannelSparseConv2d(4, 6, 3, groups=2)  # in-groups {0,1},{2,3}; out {0,1,2},{3,4,5}
    head = nn.Linear(10, 3)
    model = nn.Sequential(conv1, bn, conv2, grouped, head)
    conv1.set_active(out_idx=[0, 3, 5], in_idx=[1, 2])
    conv2.set_active(out_idx=[2], in_idx=[0, 3, 5, 6])
    grouped.set_active(out_idx=[1, 4], in_idx=[0, 2, 3])

    conv1_n = 3 * 2 * 9 + 3
    conv2_n = 1 * 4 * 3
    grouped_n = (1 + 2) * 9 + 2  # out 1 sees input 0; out 4 sees inputs 2 and 3; 2 biases
    head_n = 10 * 3 + 3
    assert count_params(model) == conv1_n + 2 * 8 + conv2_n + grouped_n + head_n
    assert count_params(model, per_channel={bn: [0, 3, 5]}) == (
        conv1_n + 2 * 3 + conv2_n + grouped_n + head_n)
    everything = (6 * 8 * 9 + 8) + 2 * 8 + 8 * 4 * 3 + (6 * 2 * 9 + 6) + head_n
    assert count_params(model, active_only=False) == everything
    assert everything == sum(p.numel() for p in model.parameters())

    conv1.set_active()
    grouped.set_active()
    assert count_params(model) == everything - 8 * 4 * 3 + conv2_n


def test_count_params_counts_shared_tensors_once():
    lin = nn.Linear(4, 5)
    assert count_params(nn.ModuleList([lin, lin])) == 4 * 5 + 5
