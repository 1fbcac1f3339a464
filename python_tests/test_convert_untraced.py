"""dce_kernels.convert on models torch.fx cannot trace as a whole, linked in pieces
(dce_kernels.channels.pieces) from example inputs: a hand-written model with a
branch on the input's size in its forward around traceable children (one of them
untraceable too, with a traceable child of its own) and a channel-wise op of its own,
timm's vgg11_bn (its ConvMlp branches on the size of its input and pools it), and a
model whose own forward reads and adds its children's outputs, where linking is not
certain and those channels stay full.

Per model (untrained, float64): all channels active equals an independent copy of the
original (outputs in training and eval, input gradients); random selections equal
the original with inactive channels zeroed (toolkit.MaskedReference on a copy sharing
the parameters, since capture_original needs an fx graph) and skip only channels
that are exactly zero there; compact_model equals the sparse model in eval."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dce_kernels import ChannelSparseBatchNorm2d, ChannelSparseConv2d, convert
from dce_kernels.channels import conversion_notes, plan_for
from dce_kernels.compact import compact_model
from toolkit import (active_parameter_count, check_against_reference,
                     cucb_steps_touch_only_active_blocks, random_selection,
                     randomize_norms)

TOL = 1e-8


def _x(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _shared_copy(model: nn.Module) -> nn.Module:
    """The model's structure over the very same parameters and buffers: the masked
    reference's hooks go on its (plain) layers, gradients reach the shared tensors."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


class Block(nn.Module):
    """A residual block: traceable."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SizeGate(nn.Module):
    """Untraceable itself (a branch on the size); its child traces."""

    def __init__(self, c, out):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, out, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(out), nn.ReLU(inplace=True))

    def forward(self, x):
        if x.shape[-1] < 2:
            raise ValueError("too small")
        return self.body(x)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6),
                                  nn.ReLU(inplace=True))
        self.block = Block(6)
        self.down = SizeGate(6, 10)
        self.conv = nn.Conv2d(10, 7, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(7, 3)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] > 7:  # torch.fx cannot trace a branch on the size
            x = self.block(x)
        x = F.interpolate(self.down(x), scale_factor=2.0)  # channel-wise, in untraced code
        x = self.conv(x)
        return self.fc(self.pool(x))


class Entangled(nn.Module):
    """Its own forward reads a child's output and adds two: not certain, kept full."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
        self.inner = nn.Sequential(nn.Conv2d(5, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 5, 1), nn.BatchNorm2d(5))
        self.head = nn.Sequential(nn.Conv2d(5, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 2))

    def forward(self, x):
        y = self.a(x)
        if y.mean() > 0:  # data-dependent: reads a's output
            y = y * 1.5
        return self.head(self.inner(y) + y)


class Repeat(nn.Module):
    """Untraceable (a branch on the size); its parent calls it twice."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.body(x) if x.shape[-1] > 1 else x


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.rep = Repeat()
        self.head = nn.Sequential(nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(5, 2))

    def forward(self, x):
        return self.head(self.rep(self.rep(self.stem(x))))


def _converted(model, x):
    randomize_norms(model)
    model.train()
    reference = _shared_copy(model)
    original = copy.deepcopy(model)
    convert(model, example_inputs=x)
    return model, reference, original


def _all_channels_equal_the_original(model, original, x):
    plan_for(model).apply(None)
    for training in (True, False):
        model.train(training), original.train(training)
        xm, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, want = model(xm), original(xo)
        g = torch.randn_like(want)
        (gm,), (go,) = torch.autograd.grad(out, [xm], g), torch.autograd.grad(want, [xo], g)
        torch.testing.assert_close(out, want, rtol=TOL, atol=TOL)
        torch.testing.assert_close(gm, go, rtol=1e-7, atol=1e-7 * float(go.abs().max()))


def _random_and_compact(model, reference, x, seed, skips_inputs=True):
    plan = plan_for(model)
    model.train()
    plan.apply(random_selection(plan.num_channels, generator=torch.Generator().manual_seed(seed)))
    assert any(c.in_idx.numel() < c.in_channels for c in plan.convs) == skips_inputs
    assert check_against_reference(model, reference, plan, x, atol=TOL) == []
    model.eval()
    compact = compact_model(model, plan).eval()
    n = sum(p.numel() for p in compact.parameters())
    assert n == active_parameter_count(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=TOL, atol=TOL)
    return compact


def test_branchy_model_is_linked_through_its_children():
    torch.manual_seed(0)
    x = _x(3, 3, 10, 10)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(Branchy())
    model, reference, original = _converted(Branchy().double(), x)
    notes = conversion_notes(model)
    # No conv stays full; the model and SizeGate say how they were linked.
    assert set(notes) == {"Branchy", "down"}
    assert "block <- stem's output" in notes["Branchy"]
    assert "conv <- interpolate(down's output)" in notes["Branchy"]
    assert "down.body <- its input" in notes["down"]
    assert "output <- down.body's output" in notes["down"]
    plan = plan_for(model)
    # stem and the block's residual stream tied, the block's middle, down.body.0, conv.
    assert sorted(g.num_channels for g in plan.groups) == [6, 6, 7, 10]
    assert all(type(m) is ChannelSparseConv2d for m in model.modules()
               if isinstance(m, nn.Conv2d))
    assert all(type(m) is ChannelSparseBatchNorm2d for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))
    _all_channels_equal_the_original(model, original, x)
    compact = _random_and_compact(model, reference, x, seed=3)
    assert sum(p.numel() for p in compact.parameters()) < sum(
        p.numel() for p in original.parameters())


def test_uncertain_links_keep_channels_full_and_say_why():
    torch.manual_seed(1)
    x = _x(3, 3, 6, 6, seed=1)
    model, reference, original = _converted(Entangled().double(), x)
    notes = conversion_notes(model)
    own_code = "its forward, which torch.fx cannot trace, reads"
    assert own_code in notes["a.0"] and "a's output" in notes["a.0"]
    assert own_code in notes["inner.3"] and "inner's output" in notes["inner.3"]
    assert "head <- its own code" in notes["Entangled"]
    plan = plan_for(model)
    # Linked for certain: the channels inside `inner` and inside `head` (a 1x1 conv,
    # pooled and flattened into the Linear).
    assert [g.name for g in plan.groups] == ["inner.0", "head.0"]
    assert all(g.readers_known for g in plan.groups)
    _all_channels_equal_the_original(model, original, x)
    _random_and_compact(model, reference, x, seed=4)


def test_an_untraceable_module_run_twice_is_not_linked():
    torch.manual_seed(3)
    x = _x(3, 3, 5, 5, seed=3)
    model, reference, original = _converted(Twice().double(), x)
    notes = conversion_notes(model)
    assert "rep: runs 2 times in one forward" in notes["stem"]
    assert "ran 2 times in one forward: not linked" in notes["rep"]
    assert type(model.rep.body[0]) is nn.Conv2d  # runs on channels nobody follows
    assert [g.name for g in plan_for(model).groups] == ["head.0"]
    _all_channels_equal_the_original(model, original, x)
    _random_and_compact(model, reference, x, seed=5, skips_inputs=False)
    assert model.head[4].in_idx.numel() < 5  # the Linear reads head.0's active channels


class ReluFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.conv(x.relu_())  # in place on the output of the piece before


class Chained(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = ReluFirst()

    def forward(self, x):
        if x.shape[-1] > 2:
            x = self.a(x)
        return self.b(x)


def test_an_inplace_op_at_the_start_of_a_piece_stops_the_saliency_before_it():
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(UserWarning, match="modifies the output of a in place"):
        model = convert(Chained(), example_inputs=x)
    assert not model.a.track_saliency and model.b.conv.track_saliency
    plan_for(model).apply(None)
    model(x).sum().backward()  # would raise with the saliency of `a` on


def test_without_example_inputs_the_old_fallback_warns():
    with pytest.warns(UserWarning, match="Pass example_inputs"):
        model = convert(Branchy())
    assert all(not g.readers_known for g in plan_for(model).groups)


def test_bad_example_inputs_get_clear_errors():
    with pytest.raises(TypeError, match="example_inputs: a tensor or a tuple"):
        convert(Branchy(), example_inputs=3)
    with pytest.raises(ValueError, match="forward of Branchy on example_inputs raised"):
        convert(Branchy(), example_inputs=torch.randn(2, 4, 9, 9))  # 4 channels, not 3


def test_the_observed_forward_leaves_the_model_as_it_was():
    torch.manual_seed(2)
    model = Branchy().double()
    randomize_norms(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    convert(model, example_inputs=(_x(4, 3, 9, 9),))
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_timm_vgg11_bn_exports_a_compact_network():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = _x(2, 3, 32, 32, seed=5)
    model = timm.create_model("vgg11_bn", pretrained=False, num_classes=10).double()
    model, reference, original = _converted(model, x)
    notes = conversion_notes(model)
    # At 32x32 ConvMlp pools its input in its own (untraced) code before fc1: a
    # channel-wise op, seen in the observed forward, so fc1 reads features.25's channels.
    assert set(notes) == {"pre_logits"}
    assert "pre_logits.fc1 <- adaptive_avg_pool2d(its input)" in notes["pre_logits"]
    assert "pre_logits.fc2 <- pre_logits.drop's output" in notes["pre_logits"]
    plan = plan_for(model)
    assert [g.name for g in plan.groups][-3:] == ["features.25", "pre_logits.fc1",
                                                  "pre_logits.fc2"]
    assert len(plan.groups) == 10
    _all_channels_equal_the_original(model, original, x)
    compact = _random_and_compact(model, reference, x, seed=6)
    assert sum(p.numel() for p in compact.parameters()) < 0.8 * sum(
        p.numel() for p in original.parameters())
    assert model.pre_logits.fc1.in_idx.numel() < 512  # reads features.25's active channels
    # Two CUCB training steps leave every weight outside the active blocks untouched.
    model.train()
    cucb_steps_touch_only_active_blocks(
        model, plan, 2, lambda gen: (torch.randn(2, 3, 32, 32, dtype=torch.float64,
                                                 generator=gen),
                                     torch.randint(0, 10, (2,), generator=gen)))


def test_dce_train_model_hook_links_timm_vgg_in_pieces():
    pytest.importorskip("timm")
    from dce_kernels.experiments.models import build_model

    model = build_model("timm:vgg11_bn", in_channels=1, num_classes=7, image_size=28)
    plan = plan_for(model)
    assert len(plan.groups) == 10 and all(g.readers_known for g in plan.groups)
    assert "net.pre_logits" in conversion_notes(model)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 7)
