"""convert never leaves a training step that crashes: in-place ops on a sparse conv's
output (which its saliency needs in backward), as the trace shows them: ``mul_``,
``sigmoid_``, ``x += y`` (fx records ``x + y``; the source line tells), in-place ops
through a view, and an in-place activation module of another library inside a
squeeze-and-excitation gate (switched to out of place, so the conv keeps its saliency)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dce_kernels import convert
from dce_kernels.channels import plan_for
from toolkit import random_selection


class InplaceSigmoid(nn.Module):
    """Like timm's activations: an ``inplace`` flag chooses the method."""

    def __init__(self, inplace=True):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return x.sigmoid_() if self.inplace else x.sigmoid()


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mul = nn.Conv2d(8, 8, 3, padding=1)      # y.mul_(2)
        self.aug = nn.Conv2d(8, 8, 1)                 # y += x
        self.view = nn.Conv2d(8, 8, 1)                # y.view(...).relu_()
        self.reduce = nn.Conv2d(8, 4, 1)              # the gate: pool, reduce, relu, expand,
        self.expand = nn.Conv2d(4, 8, 1)              # in-place sigmoid module
        self.gate = InplaceSigmoid()
        self.raw = nn.Conv2d(8, 8, 1)                 # y.sigmoid_() as a gate by hand
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.mul(x)
        y.mul_(2)
        y = F.relu(y)
        z = self.aug(y)
        z += y
        v = self.view(z)
        v.view(v.size(0), -1).relu_()
        g = self.gate(self.expand(F.relu(self.reduce(v.mean((2, 3), keepdim=True)))))
        h = v * g
        h = h * self.raw(h).sigmoid_()
        return self.head(h).mean((2, 3))


def test_inplace_uses_of_sparse_outputs_are_made_safe_or_warned():
    torch.manual_seed(0)
    original = Blocks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = convert(copy.deepcopy(original))
    warned = " ".join(str(w.message) for w in caught)
    for conv in ("mul", "aug", "view", "raw"):
        assert f"modifies the output of {conv} in place" in warned
        assert not model.get_submodule(conv).track_saliency
    # The gate's module had an inplace flag: switched, no warning, saliency kept.
    assert model.gate.inplace is False and "output of expand" not in warned
    assert model.expand.track_saliency and model.reduce.track_saliency
    # The gate's convs follow v's group (expand is tied to it) and the gate stays selectable.
    plan = plan_for(model)
    groups = {g.name: g for g in plan.groups}
    assert any(model.expand in g.producers for g in groups.values())

    model.train()
    for seed in range(3):  # partial selections, then all channels: never a crash
        plan.apply(random_selection(plan.num_channels,
                                    generator=torch.Generator().manual_seed(seed)))
        x = torch.randn(2, 3, 8, 8)
        loss = F.cross_entropy(model(x), torch.tensor([0, 3]))
        loss.backward()
        assert model.stem.saliency.gt(0).any() and model.expand.saliency.ge(0).all()
    plan.apply(None)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))


@pytest.mark.parametrize("op", ["add_", "relu_", "sigmoid_"])
def test_an_inplace_method_directly_on_a_conv_output_warns(op):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3)
            self.c2 = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.c1(x)
            getattr(y, op)(*((1.0,) if op == "add_" else ()))
            return self.c2(y)

    with pytest.warns(UserWarning, match="modifies the output of c1 in place"):
        model = convert(Net())
    plan = plan_for(model)
    plan.apply([torch.tensor([1, 2])])
    model.train()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
