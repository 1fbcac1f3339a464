"""dce_kernels.convert: channel dependencies of hand-made graphs (residual adds,
concatenation, depthwise convs, flatten into Linear, ops it cannot see through,
untraceable models), and bad input."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dce_kernels import (ChannelSparseBatchNorm2d, ChannelSparseConv2d, ChannelSparseLinear,
                         CUCBSelector, DynamicChannels, RandomSelector, convert)
from dce_kernels.channels import (ChannelPlan, GroupSpec, conversion_notes, plan_for,
                                 sequential_groups)
from dce_kernels.channels.group import recorded_spec
from dce_kernels.compact import compact_model
from dce_kernels.cost import FlopsCost
from dce_kernels.flops import count_flops
from toolkit import (active_parameter_count, capture_original, check_against_reference,
                     cucb_steps_touch_only_active_blocks, random_selection, randomize_norms)


class Residual(nn.Module):
    """Stem, two residual blocks (identity, then a 1x1 projection), flatten into Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.a1 = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.a1n = nn.BatchNorm2d(5)
        self.a2 = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.a2n = nn.BatchNorm2d(6)
        self.b1 = nn.Conv2d(6, 7, 3, stride=2, padding=1)
        self.b2 = nn.Conv2d(7, 9, 1)
        self.proj = nn.Conv2d(6, 9, 1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(36, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.a2n(self.a2(F.relu(self.a1n(self.a1(x))))))
        y = self.b2(torch.relu(self.b1(x)))
        x = y + self.proj(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class Dense(nn.Module):
    """Concatenations (a DenseNet block), a depthwise conv and x.view(n, -1)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.l1 = nn.Conv2d(4, 3, 3, padding=1)
        self.n2 = nn.BatchNorm2d(7)
        self.l2 = nn.Conv2d(7, 5, 3, padding=1)
        self.n3 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.dwn = nn.BatchNorm2d(12)
        self.out = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x):
        s = self.stem(x)
        c1 = torch.cat([s, self.l1(s)], 1)
        c2 = torch.cat([c1, self.l2(F.relu(self.n2(c1)))], dim=1)
        h = F.relu6(self.dwn(self.dw(F.relu(self.n3(c2)))))
        h = F.max_pool2d(self.out(h), 2)
        h = F.adaptive_avg_pool2d(h, 2)
        return self.fc(h.view(h.size(0), -1))


class DenseBlock(nn.Module):
    """A DenseNet block without a depthwise conv: every part of the concatenations
    is a group, read by norms and convs at offsets, then flattened into a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.n1 = nn.BatchNorm2d(4)
        self.l1 = nn.Conv2d(4, 3, 3, padding=1)
        self.n2 = nn.BatchNorm2d(7)
        self.l2 = nn.Conv2d(7, 5, 3, padding=1)
        self.n3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4, 3)

    def forward(self, x):
        s = self.stem(x)
        c1 = torch.cat([s, self.l1(F.relu(self.n1(s)))], 1)
        c2 = torch.cat([c1, self.l2(F.relu(self.n2(c1)))], dim=1)
        h = F.adaptive_avg_pool2d(F.relu(self.n3(c2)), 2)
        return self.fc(torch.flatten(h, 1))


class Grouped(nn.Module):
    """Grouped convs (not depthwise): a ResNeXt/RegNet bottleneck (1x1, 3x3 of 3 groups,
    1x1, residual add), a grouped conv of 4 groups on the residual stream, and one of
    2 groups reading a concatenation (its conv groups cut across the parts)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.c1 = nn.Conv2d(12, 9, 1, bias=False)
        self.n1 = nn.BatchNorm2d(9)
        self.c2 = nn.Conv2d(9, 9, 3, padding=1, groups=3, bias=False)
        self.n2 = nn.BatchNorm2d(9)
        self.c3 = nn.Conv2d(9, 12, 1, bias=False)
        self.n3 = nn.BatchNorm2d(12)
        self.g4 = nn.Conv2d(12, 8, 3, stride=2, padding=1, groups=4)
        self.side = nn.Conv2d(12, 4, 3, stride=2, padding=1)
        self.cat_conv = nn.Conv2d(12, 10, 1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(40, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x))))))
        x = F.relu(x + self.n3(self.c3(y)))
        w = self.cat_conv(torch.cat([self.g4(x), self.side(x)], 1))
        return self.fc(torch.flatten(self.pool(F.relu(w)), 1))


class GroupNormed(nn.Module):
    """GroupNorms after convs (3 groups; 1 group: a norm over C, H and W) and one over
    a concatenation (its groups cut across the parts)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.g1 = nn.GroupNorm(3, 12)
        self.c2 = nn.Conv2d(12, 8, 3, padding=1)
        self.g2 = nn.GroupNorm(1, 8)
        self.c3 = nn.Conv2d(8, 5, 1)
        self.c4 = nn.Conv2d(8, 5, 3, padding=1)
        self.gcat = nn.GroupNorm(2, 10)
        self.head = nn.Conv2d(10, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        x = F.relu(self.g1(self.c1(x)))
        a = F.relu(self.g2(self.c2(x)))
        b = self.gcat(torch.cat([self.c3(a), self.c4(a)], 1))
        return self.fc(torch.flatten(self.pool(F.relu(self.head(b))), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1, depthwise 3x3, project 1x1, residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 5, 3, padding=1)
        self.n0 = nn.BatchNorm2d(5)
        self.expand = nn.Conv2d(5, 11, 1)
        self.n1 = nn.BatchNorm2d(11)
        self.dw = nn.Conv2d(11, 11, 3, padding=1, groups=11)
        self.n2 = nn.BatchNorm2d(11)
        self.project = nn.Conv2d(11, 5, 1)
        self.n3 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        s = F.relu(self.n0(self.stem(x)))
        h = F.relu6(self.n2(self.dw(F.relu6(self.n1(self.expand(s))))))
        y = s + self.n3(self.project(h))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


# -- what the analysis finds ---------------------------------------------------------------

def test_residual_adds_tie_their_producers():
    model = convert(Residual())
    plan = plan_for(model)
    by_name = {g.name: g for g in plan.groups}
    assert set(by_name) == {"stem", "a1", "b1", "b2"}
    # The identity block: its stem output and a2's output are summed: one group.
    assert by_name["stem"].tied == [model.a2]
    assert set(by_name["stem"].norms) == {model.bn, model.a2n}
    assert set(by_name["stem"].consumers) == {model.a1, model.b1, model.proj}
    # The projection block: b2 and proj are summed, then flattened into fc.
    assert by_name["b2"].tied == [model.proj]
    assert by_name["b2"].linears == [model.fc]
    assert by_name["a1"].consumers == [model.a2]
    assert isinstance(model.a1n, ChannelSparseBatchNorm2d)
    assert conversion_notes(model) == {}

    plan.apply(random_selection(plan.num_channels, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(model.stem.out_idx, model.a2.out_idx)
    assert torch.equal(model.b2.out_idx, model.proj.out_idx)
    assert torch.equal(model.a1.in_idx, model.stem.out_idx)


def test_concatenation_offsets_and_depthwise_follow_their_groups():
    model = convert(Dense())
    plan = plan_for(model)
    g = {grp.name: grp for grp in plan.groups}
    assert set(g) == {"stem", "l1", "l2", "out"}
    assert g["l2"].offsets[model.n3] == 7 and g["l2"].offsets[model.dw] == 7
    assert g["l1"].offsets[model.l2] == 4 and g["stem"].offset(model.l2) == 0
    assert g["out"].total_channels(model.fc) == 6 and g["out"].linears == [model.fc]
    assert all(model.dw in grp.depthwise for grp in plan.groups if grp.name != "out")

    sel = [torch.tensor([0, 3]), torch.tensor([1]), torch.tensor([0, 2, 4]),
           torch.tensor([2, 5])]
    order = [grp.name for grp in plan.groups]
    plan.apply([sel[order.index(n)] for n in ("stem", "l1", "l2", "out")])
    assert model.l2.in_idx.tolist() == [0, 3, 5]            # stem [0,3] + l1 [1] at 4
    assert model.n3.active_idx.tolist() == [0, 3, 5, 7, 9, 11]
    assert model.dw.in_idx.tolist() == model.dw.out_idx.tolist() == [0, 3, 5, 7, 9, 11]
    assert model.out.in_idx.tolist() == [0, 3, 5, 7, 9, 11]
    cols = dict((id(lin), c) for lin, c in plan.linear_columns())[id(model.fc)]
    assert cols.tolist() == [8, 9, 10, 11, 20, 21, 22, 23]  # channels 2 and 5, 4 features each


def test_groups_read_together_after_a_concatenation_pack_together():
    torch.manual_seed(4)
    model = convert(DenseBlock().double())
    randomize_norms(model)
    plan = plan_for(model)
    assert plan.packable_groups() == set(range(len(plan.groups)))
    assert not any(g.can_pack for g in plan.groups if g.offsets)  # alone, they could not
    assert model.stem.packed_output and model.l1.packed_output and model.l2.packed_output
    assert model.n2.packed and model.n3.packed and model.l2.packed_input and model.fc.packed_input
    _packed_equals_unpacked(model, plan, ("stem", "l1", "l2"))
    # A part no group covers (an excluded conv stays full) makes the readers unpackable.
    partly = plan_for(convert(DenseBlock().double(), exclude=["l1"]))
    assert partly.packable_groups() == set()


def test_depthwise_convs_pack_with_their_group():
    torch.manual_seed(6)
    model = convert(InvertedResidual().double())
    randomize_norms(model)
    plan = plan_for(model)
    expand = next(i for i, g in enumerate(plan.groups) if g.producer is model.expand)
    assert plan.groups[expand].depthwise == [model.dw]
    assert expand in plan.packable_groups()
    assert model.expand.packed_output and model.dw.packed_input and model.dw.packed_output
    assert model.n1.packed and model.n2.packed and model.project.packed_input
    plan.apply(random_selection(plan.num_channels, generator=torch.Generator().manual_seed(1)))
    assert model.dw.in_idx is model.dw.out_idx  # one list: the op needs no device read
    _packed_equals_unpacked(model, plan, ("stem", "expand", "dw"))


def _packed_equals_unpacked(model, plan, convs):
    """Random selections: the packed model equals a full-width copy (outputs,
    gradients of the input and every parameter, the convs' saliency)."""
    unpacked = copy.deepcopy(model)
    other = ChannelPlan(unpacked, plan_for(unpacked).groups, pack=False)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        selection = random_selection(plan.num_channels, generator=gen)
        plan.apply(selection)
        other.apply(selection)
        x = torch.randn(3, 2, 7, 9, dtype=torch.float64, generator=gen)
        xs, xu = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yu = model(xs), unpacked(xu)
        torch.testing.assert_close(ys, yu, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(ys)
        ys.backward(grad)
        yu.backward(grad)
        torch.testing.assert_close(xs.grad, xu.grad, rtol=1e-12, atol=1e-12)
        for (name, a), b in zip(model.named_parameters(), unpacked.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=name)
            a.grad = b.grad = None
        for conv in convs:
            torch.testing.assert_close(getattr(model, conv).saliency,
                                       getattr(unpacked, conv).saliency, rtol=1e-12, atol=1e-12)


def test_grouped_convs_select_equally_many_channels_of_every_conv_group():
    torch.manual_seed(0)
    model = convert(Grouped().double())
    plan = plan_for(model)
    by_name = {g.name: g for g in plan.groups}
    # The residual stream (stem, tied with c3) is read by g4 (4 groups); the
    # bottleneck's inner groups by c2 (3); cat_conv writes 2. g4 and side feed a
    # concatenation cat_conv's conv groups cut across: they stay full.
    assert {name: g.blocks for name, g in by_name.items()} == {
        "stem": 4, "c1": 3, "c2": 3, "cat_conv": 2}
    assert by_name["stem"].tied == [model.c3]
    assert model.c2 in by_name["c1"].consumers and model.g4 in by_name["stem"].consumers
    notes = conversion_notes(model)
    assert set(notes) == {"g4", "side"}
    assert "cat_conv: grouped conv (groups=2) reads a concatenation" in notes["g4"]
    assert all(isinstance(getattr(model, n), ChannelSparseConv2d)
               for n in ("c2", "g4", "cat_conv"))

    # A selection must fill every run equally; the plan says so.
    bad = [torch.arange(c // 2) for c in plan.num_channels]  # the first half: unbalanced
    with pytest.raises(ValueError, match=r"group 'stem'.* 4 blocks .* equally many"):
        plan.apply(bad)
    plan.apply(plan.leading_channels([4, 3, 6, 2]))
    assert model.c2.in_idx.tolist() == [0, 3, 6] and model.c2.out_idx.tolist() == [0, 1, 3, 4,
                                                                                  6, 7]
    assert model.g4.in_idx.tolist() == [0, 3, 6, 9]
    # Grouped convs take packed layouts (their lists are balanced): every group but the
    # tied residual stream passes K-channel activations.
    assert {plan.groups[i].name for i in plan.packable_groups()} == {"c1", "c2", "cat_conv"}
    assert model.c2.packed_input and model.c2.packed_output and model.n2.packed

    # CUCB steps (a selector with the plan's blocks) leave inactive weights, including
    # a grouped conv's weights from inactive inputs of an active output, untouched.
    selector = cucb_steps_touch_only_active_blocks(
        model, plan, 2, lambda gen: (torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=gen),
                                     torch.randint(0, 3, (4,), generator=gen)))
    assert selector.blocks == plan.blocks

    # DynamicChannels hands the blocks to a factory and refuses a selector without them.
    with pytest.raises(ValueError, match="build the selector with blocks=plan.blocks"):
        DynamicChannels(model, selector=CUCBSelector(plan.num_channels))
    given = {}

    def factory(num_channels, **extra):
        given.update(extra)
        return RandomSelector(num_channels, 0.5, **extra)

    dce = DynamicChannels(model, selector=factory)
    assert given == {"blocks": plan.blocks} and dce.selector.blocks == plan.blocks


def test_group_norms_follow_their_groups_with_blocks():
    model = convert(GroupNormed().double())
    plan = plan_for(model)
    by_name = {g.name: g for g in plan.groups}
    assert {name: g.blocks for name, g in by_name.items()} == {"c1": 3, "c2": 1, "head": 1}
    assert [type(n).__name__ for n in by_name["c1"].norms] == ["ChannelSparseGroupNorm"]
    notes = conversion_notes(model)
    assert set(notes) == {"c3", "c4"}
    assert "gcat: GroupNorm over a concatenation" in notes["c3"]
    with pytest.raises(ValueError, match=r"group 'c1'.* 3 blocks"):
        plan.apply([torch.arange(6), torch.arange(8), torch.arange(6)])


def test_flops_cost_of_a_model_with_grouped_convs_is_exact():
    """The fitted quadratic reproduces count_flops of the compact model at balanced
    counts it was not fitted at (grouped convs' FLOPs are bilinear in their widths)."""
    torch.manual_seed(1)
    model = convert(Grouped())
    plan = plan_for(model)
    x = torch.randn(1, 3, 8, 8)
    cost = FlopsCost.fit(model, plan, x)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        counts = [b * int(torch.randint(1, c // b + 1, (1,), generator=gen))
                  for c, b in zip(plan.num_channels, plan.blocks)]
        plan.apply(plan.leading_channels(counts))
        assert cost(counts) == pytest.approx(count_flops(compact_model(model, plan), x),
                                             rel=1e-9)


@pytest.mark.parametrize("make", ["Residual", "Dense", "DenseBlock", "Opaque", "Shared",
                                  "Activations", "ConvNeXtLike", "Grouped", "GroupNormed"])
def test_random_selection_matches_masked_reference_and_exports(make):
    make = globals()[make]
    torch.manual_seed(3)
    model = make().double()
    randomize_norms(model)
    ref = capture_original(model)
    original = copy.deepcopy(model)
    convert(model)
    in_channels = next(p for p in model.parameters() if p.dim() == 4).shape[1]
    x = torch.randn(3, in_channels, 9, 11, dtype=torch.float64)
    plan = plan_for(model)
    # All channels: the original model, outputs and gradients.
    assert check_against_reference(model, ref, plan, x) == []
    for a, b in zip(model(x), original(x)):
        assert torch.allclose(a, b, atol=1e-12)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        plan.apply(random_selection(plan.num_channels, generator=gen, blocks=plan.blocks))
        assert check_against_reference(model, ref, plan, torch.randn_like(x)) == []
    model.eval()
    compact = compact_model(model, plan).eval()
    assert sum(p.numel() for p in compact.parameters()) == active_parameter_count(
        model, plan) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        x = torch.randn_like(x)
        assert torch.allclose(compact(x), model(x), atol=1e-12)


class Opaque(nn.Module):
    """Ops that keep channels full: a slice that cuts a group (the compact model
    cuts at the same position), a sigmoid gate read by a conv; the model's own
    output is a conv's."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(4, 6, 3, padding=1)
        self.c4 = nn.Conv2d(6, 5, 1)
        self.c5 = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        h = self.c2(F.relu(self.c1(x)))
        h = self.c3(h[:, :4])                   # cuts c2's 8 channels: they stay
        h = self.c4(torch.sigmoid(h) + 1)       # sigmoid: c3's channels stay
        return self.c5(F.relu(h))               # c4 is selectable; c5 is the output


def test_ops_it_cannot_see_through_keep_channels_full():
    model = convert(Opaque())
    plan = plan_for(model)
    assert [g.name for g in plan.groups] == ["c1", "c4"]
    notes = conversion_notes(model)
    assert set(notes) == {"c2", "c3", "c5"}
    assert "output" in notes["c5"] and "x[:, :4] of 8 channels cuts" in notes["c2"]
    assert type(model.c2) is ChannelSparseConv2d  # reads c1's group
    assert type(model.c3) is nn.Conv2d            # nothing to select around it


class Shared(nn.Module):
    """Modules called on several tensors: a conv reading two different groups, a
    BatchNorm that also normalizes a tensor of unknown channels."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2, self.c3 = (nn.Conv2d(3, 4, 3, padding=1) for _ in range(4))
        self.shared = nn.Conv2d(4, 5, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.c4 = nn.Conv2d(4, 5, 1)
        self.c5 = nn.Conv2d(4, 5, 1)
        self.head = nn.Conv2d(5, 5, 1)

    def forward(self, x):
        a = self.shared(F.relu(self.c0(x)))
        b = self.shared(F.relu(self.c1(x)))
        g = self.c4(self.norm(self.c2(x)))
        h = self.c5(self.norm(torch.sigmoid(self.c3(x))))
        return self.head(F.relu(a + b)) + g + h


def test_modules_called_on_several_tensors_keep_what_they_cannot_follow_full():
    model = convert(Shared())
    assert [g.name for g in plan_for(model).groups] == ["shared"]
    notes = conversion_notes(model)
    assert "shared (consumer) cannot follow" in notes["c0"] and "c1" in notes
    assert "norm (norm) cannot follow" in notes["c2"]
    assert type(model.norm) is nn.BatchNorm2d


class Activations(nn.Sequential):
    """A sequential model through channel-wise modules that both linkers must know."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Mish(),
                         nn.Conv2d(6, 5, 3, padding=1), nn.SELU(), nn.Upsample(scale_factor=2),
                         nn.Conv2d(5, 4, 3, padding=1), nn.Hardswish(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_sequential_groups_and_convert_link_a_sequential_model_alike():
    """One table of channel-wise ops: Mish, SELU, Hardswish and Upsample pass
    channels through for sequential_groups as they do for convert."""
    model = convert(Activations())
    assert conversion_notes(model) == {}
    converted = plan_for(model).groups
    linked = sequential_groups(model)
    assert [g.producer for g in linked] == [g.producer for g in converted] == [
        model[0], model[3], model[6]]
    for a, b in zip(linked, converted):
        assert (a.norms, a.consumers, a.linears) == (b.norms, b.consumers, b.linears)
        assert a.can_pack == b.can_pack
    assert linked[0].norms == [model[1]] and linked[0].consumers == [model[3]]
    assert linked[1].consumers == [model[6]] and linked[2].linears == [model[10]]


def test_layers_that_run_only_in_training_are_linked_too():
    class AuxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
            self.c2, self.aux = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            h = F.relu(self.n1(self.c1(x)))
            out = self.c2(h).mean((2, 3))
            if self.training:
                return out, self.aux(h).mean((2, 3))
            return out

    model = convert(AuxHead().eval())
    assert not model.training
    (group,) = plan_for(model).groups
    assert set(group.consumers) == {model.c2, model.aux}


def test_exclude_keeps_a_submodule_full_and_copy_leaves_the_original():
    original = Residual()
    model = convert(original, exclude=["b1"], copy=True)
    assert type(original.stem) is nn.Conv2d and model is not original
    names = [g.name for g in plan_for(model).groups]
    assert "b1" not in names and "excluded" in conversion_notes(model)["b1"]
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        convert(Residual(), exclude="nope")


def test_parameters_are_shared_and_state_dict_keys_kept():
    model = Residual()
    params = dict(model.named_parameters())
    keys = set(model.state_dict())
    convert(model)
    assert set(model.state_dict()) == keys
    for name, p in model.named_parameters():
        assert p is params[name]
    # The groups are recorded by name: a deep copy's plan drives the copy's layers.
    twin = copy.deepcopy(model)
    groups = plan_for(twin).groups
    assert groups[0].producer is twin.stem and groups[0].producer is not model.stem


@pytest.mark.parametrize("make", [Residual, Dense])
def test_recorded_groups_are_plain_data_that_pickles_resolve(make):
    model = convert(make())
    spec = recorded_spec(model)
    assert all(isinstance(g, GroupSpec) for g in spec.groups)
    groups = plan_for(model).groups
    assert tuple(GroupSpec.from_group(g, model) for g in groups) == spec.groups
    twin = pickle.loads(pickle.dumps(model))
    for g, t in zip(groups, plan_for(twin).groups):
        assert GroupSpec.from_group(t, twin) == GroupSpec.from_group(g, model)
        assert t.producer is twin.get_submodule(g.name) and t.producer is not g.producer


def test_inplace_activation_after_a_conv_is_made_out_of_place_or_warned():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU(inplace=True)
            self.c2 = nn.Conv2d(4, 5, 3)
            self.c3 = nn.Conv2d(5, 3, 1)

        def forward(self, x):
            x = F.relu(self.c2(self.act(self.c1(x))), inplace=True)
            return self.c3(x)

    with pytest.warns(UserWarning, match="modifies the output of c2 in place"):
        model = convert(Net())
    assert model.act.inplace is False
    assert model.c1.track_saliency and not model.c2.track_saliency
    plan = plan_for(model)
    plan.apply([torch.tensor([0, 2]), torch.tensor([1, 3, 4])])
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # would raise with in-place ops
    assert model.c1.saliency[[0, 2]].gt(0).all()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.act(self.bn(self.c1(x)))
        if h.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 2
        return self.fc(self.c2(h).mean((2, 3)))


def test_untraceable_model_converts_with_a_warning_and_reads_all_inputs():
    torch.manual_seed(0)
    original = Untraceable()
    randomize_norms(original)
    with pytest.warns(UserWarning, match="cannot trace Untraceable.*reading all its input"):
        model = convert(original, copy=True)
    assert type(model.c1) is ChannelSparseConv2d and type(model.bn) is nn.BatchNorm2d
    x = torch.randn(4, 3, 6, 6)
    assert torch.allclose(model(x), original(x), atol=1e-6)
    plan = plan_for(model)
    assert [g.readers_known for g in plan.groups] == [False, False]
    plan.apply([torch.tensor([1, 2, 5]), torch.tensor([0, 3])])
    assert model.c2.in_idx.numel() == 6  # reads every input channel
    # Reference: the original with conv outputs masked (and nothing else).
    handles = [original.c1.register_forward_hook(
        lambda m, a, y: y * torch.isin(torch.arange(6), torch.tensor([1, 2, 5])).view(1, -1, 1, 1)),
        original.c2.register_forward_hook(
        lambda m, a, y: y * torch.isin(torch.arange(4), torch.tensor([0, 3])).view(1, -1, 1, 1))]
    assert torch.allclose(model(x), original(x), atol=1e-6)
    for h in handles:
        h.remove()
    model(x).sum().backward()  # in-place ReLU was made out-of-place: saliency works
    assert model.c1.saliency.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot be removed"):
        compact_model(model, plan)


def test_bad_input_gets_clear_errors():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        convert(torch.randn(3))
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        convert(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="was not converted"):
        conversion_notes(Residual())
    model = convert(Residual())
    plan = plan_for(model)
    sel = [torch.arange(c) for c in plan.num_channels]
    sel[0] = torch.tensor([0, 6])  # stem has 6 channels
    with pytest.raises(ValueError, match="selection of group 'stem'.*outside"):
        plan.apply(sel)
    model.a1 = nn.Conv2d(6, 5, 3, padding=1)  # changed after conversion
    with pytest.raises(ValueError, match="'a1' is a Conv2d"):
        plan_for(model)


# -- ConvNeXt: LayerNorms over channels and layer scale --------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over the channels of (N, C, H, W) tensors, as timm writes it."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


def _uniform(*shape):
    return torch.empty(*shape).uniform_(0.5, 1.5)


class ConvNeXtLike(nn.Module):
    """ConvNeXt's shape: a patchify stem with a LayerNorm over channels; blocks of
    depthwise conv -> LayerNorm over channels -> 1x1 conv MLP (GELU) -> layer scale
    -> residual add; a downsample (LayerNorm, 2x2 conv) and a head (pool,
    LayerNorm, flatten, Linear). The blocks write the norm and the scale in the
    ways timm and others do: LayerNorm2d, 1x1 convs and ``x.mul(gamma.reshape(1, -1,
    1, 1))``; permute + nn.LayerNorm + an MLP of nn.Linear on the channels-last
    tensor (timm's ``conv_mlp=False``), a [C] scale there, permute back and a
    division by a [C, 1, 1] buffer; ``gamma[:, None, None] * x``. Norms and
    scales are random (a default LayerNorm or a scale of 1e-6 would hide mistakes)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 2, stride=2)
        self.stem_norm = LayerNorm2d(6)
        self.dw1 = nn.Conv2d(6, 6, 5, padding=2, groups=6)
        self.norm1 = LayerNorm2d(6)
        self.fc1a, self.fc1b = nn.Conv2d(6, 13, 1), nn.Conv2d(13, 6, 1)
        self.gamma1 = nn.Parameter(_uniform(6))
        self.dw2 = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.norm2 = nn.LayerNorm(6, eps=1e-6)
        self.fc2a, self.fc2b = nn.Linear(6, 11), nn.Linear(11, 6)
        self.gamma2 = nn.Parameter(_uniform(6))
        self.register_buffer("scale2", _uniform(6, 1, 1))
        self.down_norm = LayerNorm2d(6)
        self.down = nn.Conv2d(6, 9, 2, stride=2)
        self.dw3 = nn.Conv2d(9, 9, 3, padding=1, groups=9)
        self.norm3 = LayerNorm2d(9)
        self.fc3a, self.fc3b = nn.Conv2d(9, 7, 1), nn.Conv2d(7, 9, 1)
        self.gamma3 = nn.Parameter(_uniform(9))
        self.head_norm = LayerNorm2d(9)
        self.fc = nn.Linear(9, 4)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        h = self.fc1b(F.gelu(self.fc1a(self.norm1(self.dw1(x)))))
        x = x + h.mul(self.gamma1.reshape(1, -1, 1, 1))
        h = self.fc2b(F.gelu(self.fc2a(self.norm2(self.dw2(x).permute(0, 2, 3, 1)))))
        h = (h * self.gamma2).permute(0, 3, 1, 2) / self.scale2
        x = h + x
        x = self.down(self.down_norm(x))
        h = self.fc3b(F.gelu(self.fc3a(self.norm3(self.dw3(x)))))
        x = x + self.gamma3[:, None, None] * h
        x = self.head_norm(F.adaptive_avg_pool2d(x, 1))
        return self.fc(torch.flatten(x, 1))


def test_convnext_norms_and_layer_scales_follow_their_groups():
    from dce_kernels import ChannelSparseLayerNorm

    model = convert(ConvNeXtLike())
    assert conversion_notes(model) == {}
    plan = plan_for(model)
    by_name = {g.name: g for g in plan.groups}
    assert set(by_name) == {"stem", "fc1a", "fc2a", "down", "fc3a"}
    stream = by_name["stem"]
    assert stream.tied == [model.fc1b, model.fc2b]
    assert stream.depthwise == [model.dw1, model.dw2]
    assert stream.norms == [model.stem_norm, model.norm1, model.norm2, model.down_norm]
    assert stream.scales == [(model, "gamma1"), (model, "gamma2"), (model, "scale2")]
    assert by_name["down"].scales == [(model, "gamma3")]
    assert by_name["down"].linears == [model.fc]
    # The channels-last MLP's Linears: the first reads the stream's channels, its
    # hidden units are a group read by the second, which is tied to the stream.
    assert stream.linears == [model.fc2a] and by_name["fc2a"].linears == [model.fc2b]
    assert isinstance(model.fc2b, ChannelSparseLinear)
    for name, dim in (("stem_norm", 1), ("norm1", 1), ("norm2", -1), ("head_norm", 1)):
        layer = getattr(model, name)
        assert isinstance(layer, ChannelSparseLayerNorm) and layer.channel_dim == dim
    assert model.norm1.dense_type is LayerNorm2d and model.norm2.dense_type is nn.LayerNorm
    # The model's own code multiplies by full-width scales: those groups stay full
    # width; so do a Linear's hidden units (as a classifier's).
    packable = {plan.groups[i].name for i in plan.packable_groups()}
    assert packable == {"fc1a", "fc3a"}
    # A converted model converts to the same groups (its sparse LayerNorms are leaves).
    assert recorded_spec(convert(copy.deepcopy(model))) == recorded_spec(model)
    # The scales are recorded by name: a pickled copy's plan holds the copy's own.
    clone = pickle.loads(pickle.dumps(model))
    scales = {g.name: g.scales for g in plan_for(clone).groups}["stem"]
    assert scales == [(clone, "gamma1"), (clone, "gamma2"), (clone, "scale2")]
    assert scales[0][0] is clone and clone.gamma1 is not model.gamma1


def test_layer_scale_trains_and_exports_only_its_active_entries():
    from dce_kernels import MaskedOptimizer

    torch.manual_seed(4)
    model = convert(ConvNeXtLike().double())
    plan = plan_for(model)
    selection = random_selection(plan.num_channels, generator=torch.Generator().manual_seed(1))
    plan.apply(selection)
    active = selection[[g.name for g in plan.groups].index("stem")].sort().values
    inactive = torch.tensor([i for i in range(6) if i not in active.tolist()])
    before = model.gamma1.detach().clone()
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                          weight_decay=0.1), plan.active_blocks)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 9, 11, dtype=torch.float64)).square().sum().backward()
        assert model.gamma1.grad[inactive].eq(0).all()
        opt.step()
    # Weight decay and momentum would move every entry of a plain step.
    assert torch.equal(model.gamma1.detach()[inactive], before[inactive])
    assert not torch.equal(model.gamma1.detach()[active], before[active])
    model.eval()
    compact = compact_model(model, plan).eval()
    assert compact.gamma1.shape == (active.numel(),) and compact.scale2.shape == (
        active.numel(), 1, 1)
    assert torch.equal(compact.gamma1.detach(), model.gamma1.detach()[active])
    assert isinstance(compact.gamma1, nn.Parameter) and not isinstance(compact.scale2,
                                                                       nn.Parameter)
    assert type(compact.norm1) is LayerNorm2d and type(compact.norm2) is nn.LayerNorm
    assert compact.norm1.normalized_shape == (active.numel(),)
    with torch.no_grad():
        x = torch.randn(3, 3, 9, 11, dtype=torch.float64)
        torch.testing.assert_close(compact(x), model(x), rtol=1e-12, atol=1e-12)


class NotChannelWise(nn.Module):
    """Near misses of a LayerNorm over channels and of a per-channel scale: each
    conv's channels must stay full."""

    def __init__(self):
        super().__init__()
        self.c = nn.ModuleList(nn.Conv2d(3, 5, 1) for _ in range(6))
        self.over_w = nn.LayerNorm(5)                     # over W of a (N, C, H, W) tensor
        self.along_w = nn.Parameter(_uniform(5))          # broadcasts along W
        self.not_a_norm = nn.Parameter(_uniform(5))       # F.layer_norm on a bare weight
        self.mlp = nn.Linear(5, 5)                        # its features read by a conv
        self.after = nn.Conv2d(5, 5, 1)

    def forward(self, x):  # x: (N, 3, 5, 5)
        c = self.c
        a = self.over_w(c[0](x))
        b = c[1](x) * self.along_w
        d = F.layer_norm(c[2](x).permute(0, 2, 3, 1), (5,), self.not_a_norm)
        e = c[3](x).permute(0, 1, 3, 2)
        f = self.after(self.mlp(c[4](x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return a + b + d.permute(0, 3, 1, 2) + e + f + c[5](x)


def test_near_misses_of_norms_and_scales_keep_channels_full():
    model = convert(NotChannelWise())
    notes = conversion_notes(model)
    assert set(notes) == {"c.0", "c.1", "c.2", "c.3", "c.5", "mlp", "after"}
    assert "LayerNorm is not known" in notes["c.0"]
    assert "multiplies by a tensor of unknown channels" in notes["c.1"]
    assert "layer_norm on tensors that are not a LayerNorm's own" in notes["c.2"]
    assert "permute(0, 1, 3, 2)" in notes["c.3"]
    # c.4 is selectable (the Linear over its channels follows them); the Linear's own
    # output features, read by a conv, stay full.
    assert "mlp: a Linear's output features are read by convs" in notes["mlp"]
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert model(x).shape == (2, 5, 5, 5)
