"""dce_kernels.convert on channel slicing, narrow, split and chunk (channels/windows.py):
which groups stay full, a GhostNet-like block (a conv concatenated with its depthwise
copy, sliced, added to a shortcut, gated), and every case against the masked
reference graph and its compact export, in float64. The rule for the compact model
is checked on its own against Python's and torch's slicing."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dce_kernels import ChannelSparseConv2d, convert
from dce_kernels.channels import conversion_notes, plan_for
from dce_kernels.channels.windows import chunk_cut, narrow_cut, slice_cut, split_cut
from dce_kernels.compact import compact_model
from toolkit import (active_parameter_count, capture_original, check_against_reference,
                     random_selection, randomize_norms)


def _equals_reference_and_exports(model, x, draws=3):
    """All channels: the original model. Random selections: the masked reference
    (outputs, input and parameter gradients). Eval: the compact model equals the
    sparse one and holds exactly the active parameters."""
    randomize_norms(model)
    ref = capture_original(model)
    original = copy.deepcopy(model)
    convert(model)
    plan = plan_for(model)
    assert check_against_reference(model, ref, plan, x) == []
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)
    gen = torch.Generator().manual_seed(5)
    for _ in range(draws):
        plan.apply(random_selection(plan.num_channels, generator=gen))
        assert check_against_reference(model, ref, plan, torch.randn_like(x)) == []
        model.eval()
        compact = compact_model(model, plan).eval()
        assert sum(p.numel() for p in compact.parameters()) == active_parameter_count(
            model, plan)
        with torch.no_grad():
            xe = torch.randn_like(x)
            torch.testing.assert_close(compact(xe), model(xe), rtol=1e-12, atol=1e-12)
        model.train()
    return model, plan


# -- parts of a concatenation of odd widths ----------------------------------------------

class Parts(nn.Module):
    """Three producers of odd widths concatenated (a: 5, b: 7, c: 6 channels, 18 in all),
    normalized; ``cut`` picks parts of the 18 channels and one conv reads each part
    (``widths``: their channels). The readers' sum feeds the head."""

    def __init__(self, cut, widths):
        super().__init__()
        self.cut, self.n = cut, len(widths)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 5, 3, padding=1)
        self.b = nn.Conv2d(4, 7, 1)
        self.c = nn.Conv2d(4, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(18)
        self.readers = nn.ModuleList(nn.Conv2d(w, 3, 1) for w in widths)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        h = F.relu(self.norm(torch.cat([self.a(s), self.b(s), self.c(s)], 1)))
        parts = self.cut(h)
        parts = [parts] if self.n == 1 else [parts[i] for i in range(self.n)]
        y = self.readers[0](parts[0])
        for reader, part in zip(self.readers[1:], parts[1:]):
            y = y + reader(part)
        return self.head(F.relu(y))


# (cut, channels of each part read, producers that stay full)
CUTS = {
    "x[:, :18] whole": (lambda h: h[:, :18], [18], set()),
    "x[:, :40, ...] clamps": (lambda h: h[:, :40, ...], [18], set()),
    "x[:, 5:] at a group's start": (lambda h: h[:, 5:], [13], {"a"}),
    "x[:, 3:] mid-group": (lambda h: h[:, 3:], [15], {"a"}),
    "x[:, 3:10, :, :] mid to mid": (lambda h: h[:, 3:10, :, :], [7], {"a", "b"}),
    "x[:, -6:]": (lambda h: h[:, -6:], [6], {"c"}),
    "x[:, :-4]": (lambda h: h[:, :-4], [14], {"c"}),
    "narrow(1, 5, 7)": (lambda h: h.narrow(1, 5, 7), [7], {"a", "b"}),
    "torch.narrow(-6)": (lambda h: torch.narrow(h, 1, -6, 6), [6], {"c"}),
    "split(12)": (lambda h: h.split(12, 1), [12, 6], {"a", "b"}),
    "torch.split(5)": (lambda h: torch.split(h, 5, dim=1), [5, 5, 5, 3], {"a", "b", "c"}),
    "split(18)": (lambda h: h.split(18, dim=1)[0], [18], set()),
    "split([5, 13])": (lambda h: torch.split(h, [5, 13], dim=1), [5, 13], {"a", "b", "c"}),
    "chunk(2)": (lambda h: h.chunk(2, 1), [9, 9], {"a", "b", "c"}),
    "torch.chunk(1)": (lambda h: torch.chunk(h, 1, dim=1)[-1], [18], set()),
}
# Not along the channels with constant bounds and step 1: unknown, every group full.
UNKNOWN = {
    "x[:, ::2]": (lambda h: h[:, ::2], [9]),
    "x[:, 1:17:3]": (lambda h: h[:, 1:17:3], [6]),
    "x[:, :, 1:]": (lambda h: h[:, :, 1:], [18]),
    "x[..., :5]": (lambda h: h[..., :5], [18]),
    "x[1:]": (lambda h: h[1:], [18]),
    "split(4, dim=2)": (lambda h: h.split(4, dim=2)[0], [18]),
    "narrow(3, 0, 5)": (lambda h: h.narrow(3, 0, 5), [18]),
    "chunk(2, dim=0)": (lambda h: h.chunk(2)[0], [18]),
}
X = torch.randn(3, 3, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("case", list(CUTS))
def test_parts_read_their_groups_and_export_exactly(case):
    cut, widths, full = CUTS[case]
    torch.manual_seed(1)
    model, plan = _equals_reference_and_exports(Parts(cut, widths).double(), X)
    notes = conversion_notes(model)
    assert {n for n in notes if n in "abc"} == full
    assert all("cuts at fixed positions" in notes[n] for n in full)
    assert set(notes) - set("abc") == {"head"}  # the model's output
    groups = {g.name: g for g in plan.groups}
    for name in set("abc") - full:
        assert type(getattr(model, name)) is ChannelSparseConv2d and name in groups
    # Each reader sees the groups inside its part, at their offsets there.
    off_in_cat = {"a": 0, "b": 5, "c": 12}
    for reader, (lo, hi) in zip(model.readers, _parts(cut)):
        for name in set("abc") - full:
            g, first = groups[name], off_in_cat[name]
            inside = lo <= first and first + g.num_channels <= hi
            assert (reader in g.consumers) == inside
            if inside:
                assert g.offset(reader) == first - lo


def _parts(cut):
    """The channel span of each part, read off a tensor whose channels are numbered."""
    numbered = torch.arange(18.).reshape(1, 18, 1, 1).expand(3, 18, 9, 11)
    parts = cut(numbered)
    parts = parts if isinstance(parts, (tuple, list)) else (parts,)
    return [(int(p[0, 0, 0, 0]), int(p[0, -1, 0, 0]) + 1) for p in parts]


@pytest.mark.parametrize("case", list(UNKNOWN))
def test_cuts_it_cannot_follow_keep_every_group_full(case):
    cut, widths = UNKNOWN[case]
    torch.manual_seed(1)
    model = convert(Parts(cut, widths).double())
    notes = conversion_notes(model)
    assert set("abc") <= set(notes)
    assert all("is not" in notes[n] or "not along" in notes[n] for n in "abc")
    assert {g.name for g in plan_for(model).groups} == {"stem", "readers.0"}
    torch.manual_seed(1)
    _equals_reference_and_exports(Parts(cut, widths).double(), X)


# -- a GhostNet-like block ------------------------------------------------------------------

class Ghost(nn.Module):
    """GhostNet's ghost module: a conv, a depthwise conv of its output, both
    concatenated, cut to ``out_chs`` channels."""

    def __init__(self, cin, out_chs):
        super().__init__()
        init = math.ceil(out_chs / 2)
        self.out_chs = out_chs
        self.primary = nn.Conv2d(cin, init, 1, bias=False)
        self.pn = nn.BatchNorm2d(init)
        self.cheap = nn.Conv2d(init, init, 3, padding=1, groups=init, bias=False)
        self.cn = nn.BatchNorm2d(init)

    def forward(self, x):
        x1 = F.relu(self.pn(self.primary(x)))
        x2 = F.relu(self.cn(self.cheap(x1)))
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.out_chs, ...]


class GhostBlock(nn.Module):
    """A ghost module (5 + 5 channels, sliced to all 10) gated by squeeze-and-
    excitation, a strided depthwise conv, a second ghost module added to a
    projection shortcut, and a third (5 + 5 sliced to 9: a cut) before the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 7, 3, padding=1)
        self.sn = nn.BatchNorm2d(7)
        self.g1 = Ghost(7, 10)
        self.reduce = nn.Conv2d(10, 3, 1)
        self.expand = nn.Conv2d(3, 10, 1)
        self.dw = nn.Conv2d(10, 10, 3, stride=2, padding=1, groups=10, bias=False)
        self.dwn = nn.BatchNorm2d(10)
        self.g2 = Ghost(10, 10)
        self.shortcut = nn.Conv2d(7, 10, 1, stride=2, bias=False)
        self.shn = nn.BatchNorm2d(10)
        self.g3 = Ghost(10, 9)
        self.head = nn.Conv2d(9, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        s = F.relu(self.sn(self.stem(x)))
        h = self.g1(s)
        h = h * torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(h, 1)))))
        h = self.dwn(self.dw(h))
        y = self.g2(h) + self.shn(self.shortcut(s))
        z = F.relu(self.head(self.g3(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def test_ghost_module_groups_follow_the_concatenation_twice():
    torch.manual_seed(4)
    model = convert(GhostBlock().double())
    plan = plan_for(model)
    g = {grp.name: grp for grp in plan.groups}
    assert set(g) == {"stem", "g1.primary", "reduce", "g2.primary", "head"}
    ghost1 = g["g1.primary"]
    # x1 and its depthwise copy: every later layer sees the group at 0 and at 5.
    assert ghost1.depthwise == [model.g1.cheap, model.dw]
    assert ghost1.offsets_of(model.dw) == (0, 5) and ghost1.offsets_of(model.reduce) == (0, 5)
    assert ghost1.offsets_of(model.dwn) == (0, 5) and ghost1.consumers == [
        model.reduce, model.g2.primary]
    # The gate's conv multiplies the concatenation: its outputs are the group twice.
    assert ghost1.tied == [model.expand] and ghost1.output_offsets(model.expand) == (0, 5)
    ghost2 = g["g2.primary"]
    assert ghost2.tied == [model.shortcut] and ghost2.output_offsets(model.shortcut) == (0, 5)
    assert ghost2.offsets_of(model.g3.primary) == (0, 5)
    # 5 + 5 sliced to 9 cuts the copy: that group stays full, with the reason.
    notes = conversion_notes(model)
    assert set(notes) == {"g3.primary"} and "x[:, :9]" in notes["g3.primary"]

    sel = {"stem": [1, 4, 6], "g1.primary": [0, 3], "reduce": [2], "g2.primary": [1, 2, 4],
           "head": [0, 5]}
    plan.apply([torch.tensor(sel[grp.name]) for grp in plan.groups])
    assert model.dw.in_idx.tolist() == model.dw.out_idx.tolist() == [0, 3, 5, 8]
    assert model.expand.out_idx.tolist() == [0, 3, 5, 8]
    assert model.shortcut.out_idx.tolist() == [1, 2, 4, 6, 7, 9]
    assert model.g3.primary.in_idx.tolist() == [1, 2, 4, 6, 7, 9]
    assert model.head.in_idx.tolist() == list(range(9))
    # Each copy of a channel adds its own Taylor term to the group's saliency.
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    want = model.g1.primary.saliency.clone()
    for conv in (model.g1.cheap, model.dw, model.expand):
        want += conv.saliency[:5] + (conv.saliency[5:10] if conv.out_channels == 10 else 0)
    torch.testing.assert_close(plan.saliency()[plan.groups.index(ghost1)], want)


def test_ghost_block_equals_the_masked_reference_and_exports():
    torch.manual_seed(3)
    _equals_reference_and_exports(GhostBlock().double(),
                                  torch.randn(3, 3, 9, 11, dtype=torch.float64))


# -- the compact model's rule, against Python's and torch's own slicing ---------------------

def _compact_cut_equals_sparse(channels, cut, op, active):
    """With ``active`` channels (the pinned ones forced on), ``op`` on the compact
    tensor (only the active channels) gives exactly the active channels of each part
    of ``op`` on the whole tensor, and those parts are ``cut.parts``."""
    whole = torch.arange(channels)
    for lo in range(channels):
        if cut.pinned(lo, lo + 1):
            active[lo] = True
    sparse = op(whole)
    sparse = list(sparse) if isinstance(sparse, (tuple, list)) else [sparse]
    assert [(int(p[0]), int(p[-1]) + 1) if p.numel() else None for p in sparse] == [
        (lo, hi) if hi > lo else None for lo, hi in cut.parts]
    if sparse[-1].numel() and not active[sparse[-1]].any():
        active[int(sparse[-1][0])] = True  # no group is empty: each part keeps a channel
    compact = op(whole[active])
    compact = list(compact) if isinstance(compact, (tuple, list)) else [compact]
    assert len(compact) == len(sparse)
    for got, part in zip(compact, sparse):
        assert got.tolist() == part[active[part]].tolist()


bounds = st.one_of(st.none(), st.integers(-25, 25))


@settings(max_examples=300, deadline=None)
@given(channels=st.integers(1, 20), start=bounds, stop=bounds, seed=st.integers(0, 2**16))
def test_slice_rule_matches_python_slicing(channels, start, stop, seed):
    cut = slice_cut(channels, start, stop, None)
    active = torch.rand(channels, generator=torch.Generator().manual_seed(seed)) < 0.5
    _compact_cut_equals_sparse(channels, cut, lambda t: t[start:stop], active)


@settings(max_examples=300, deadline=None)
@given(channels=st.integers(1, 20), start=st.integers(-20, 20), length=st.integers(0, 20),
       seed=st.integers(0, 2**16))
def test_narrow_rule_matches_torch_narrow(channels, start, length, seed):
    cut = narrow_cut(channels, start, length)
    lo = start if start >= 0 else channels + start
    if lo < 0 or lo + length > channels:
        assert cut is None  # torch.narrow would raise
        return
    active = torch.rand(channels, generator=torch.Generator().manual_seed(seed)) < 0.5
    _compact_cut_equals_sparse(channels, cut, lambda t: t.narrow(0, start, length), active)


@settings(max_examples=300, deadline=None)
@given(channels=st.integers(1, 20), size=st.integers(1, 25), chunks=st.integers(1, 6),
       sizes=st.lists(st.integers(0, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_split_and_chunk_rules_match_torch(channels, size, chunks, sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    _compact_cut_equals_sparse(channels, split_cut(channels, size),
                               lambda t: t.split(size), torch.rand(channels, generator=gen) < .5)
    _compact_cut_equals_sparse(channels, chunk_cut(channels, chunks),
                               lambda t: t.chunk(chunks), torch.rand(channels, generator=gen) < .5)
    if sum(sizes) == channels:
        _compact_cut_equals_sparse(channels, split_cut(channels, sizes),
                                   lambda t: t.split(sizes), torch.rand(channels, generator=gen) < .5)
        assert split_cut(channels, sizes).prefix == channels
    else:
        assert split_cut(channels, sizes) is None


def test_cuts_of_unknown_form_are_refused():
    assert slice_cut(10, None, None, 2) is None
    assert slice_cut(10, 1.5, None, None) is None
    assert slice_cut(10, True, None, None) is None
    assert split_cut(10, 0) is None and chunk_cut(10, 0) is None
    assert narrow_cut(10, 0, -1) is None


def test_groups_seen_twice_survive_a_pickle_and_bad_offsets_are_refused():
    import pickle

    from dce_kernels.channels import ChannelGroup
    from dce_kernels.channels.group import recorded_spec

    model = convert(GhostBlock().double())
    copied = pickle.loads(pickle.dumps(model))
    for a, b in zip(plan_for(model).groups, plan_for(copied).groups):
        for layer_a, layer_b in zip(a.tied + a.depthwise + a.norms + a.consumers,
                                    b.tied + b.depthwise + b.norms + b.consumers):
            assert a.offsets_of(layer_a) == b.offsets_of(layer_b)
            assert a.output_offsets(layer_a) == b.output_offsets(layer_b)
    assert recorded_spec(copied) == recorded_spec(model)
    g = next(grp for grp in plan_for(model).groups if grp.name == "g1.primary")
    with pytest.raises(ValueError, match="overlap"):
        ChannelGroup(g.producer, depthwise=[model.dw], offsets={model.dw: (0, 3)}).validate()
    with pytest.raises(ValueError, match="tied ChannelSparseConv2d has 10 output channels"):
        ChannelGroup(g.producer, tied=[model.expand]).validate()


class ReadsHereWritesThere(nn.Module):
    """A conv that reads group b at offset 3 (after a concatenation) and is tied to b
    at its own output's offset 0 (added to b)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.a = nn.Conv2d(5, 3, 1)
        self.b = nn.Conv2d(5, 4, 3, padding=1)
        self.mix = nn.Conv2d(7, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        b = self.b(s)
        y = b + self.mix(F.relu(torch.cat([self.a(s), b], 1)))
        return self.head(F.relu(y))


def test_a_conv_may_read_a_group_at_one_offset_and_write_it_at_another():
    torch.manual_seed(2)
    model, plan = _equals_reference_and_exports(ReadsHereWritesThere().double(), X)
    g = {grp.name: grp for grp in plan.groups}["b"]
    assert g.tied == [model.mix] and g.offsets_of(model.mix) == (3,)
    assert g.output_offsets(model.mix) == (0,)
