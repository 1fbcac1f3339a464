"""The FLOPs cost of a compact network and the FLOPs budget of the selectors:
the fitted quadratic form against fresh counts of exported models, and the greedy
against hand-worked numbers."""
import io

import pytest
import torch

from dce_kernels import FlopsCost, compact_model, count_flops, plan_for
from dce_kernels.experiments.models import build_model
from dce_kernels.selectors import (CUCBSelector, RandomSelector, ShrinkSelector,
                                   TaylorPruneSelector)
from toolkit import small_sparse_net

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_counts_selection(sizes, g):
    counts = [int(torch.randint(1, c + 1, (1,), generator=g)) for c in sizes]
    selection = [torch.sort(torch.randperm(c, generator=g)[:k]).values
                 for c, k in zip(sizes, counts)]
    return counts, selection


@pytest.mark.parametrize("build,in_ch,size", [
    (lambda: build_model("vgg11", 1, 10, width=0.125, image_size=20), 1, 20),
    (lambda: build_model("resnet20", 3, 7, width=0.25, image_size=13), 3, 13),  # residual adds
    (lambda: small_sparse_net(in_ch=3, widths=(6, 8, 5), classes=4), 3, 11),  # Linear reads
])
def test_fitted_cost_equals_the_flops_of_the_exported_model(build, in_ch, size):
    torch.manual_seed(0)
    model = build()
    plan = plan_for(model)
    x = torch.randn(1, in_ch, size, size)
    cost = FlopsCost.fit(model, plan, x)
    assert plan.selection is None  # the fit restores what was applied
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        counts, selection = _random_counts_selection(plan.num_channels, g)
        plan.apply(selection)
        want = count_flops(compact_model(model, plan), x)
        assert cost(counts) == pytest.approx(want, rel=1e-12, abs=1e-6)
        # What one channel less saves, against a fresh count with it dropped.
        layer = max(range(len(counts)), key=lambda i: counts[i])
        if counts[layer] > 1:
            fewer = [s.clone() for s in selection]
            fewer[layer] = fewer[layer][:-1]
            plan.apply(fewer)
            saved = want - count_flops(compact_model(model, plan), x)
            assert float(cost.saving(counts)[layer]) == pytest.approx(saved, rel=1e-12, abs=1e-6)


def test_cost_and_saving_hand_worked():
    # F = 5 + n0 + 2 n1 + 4 n0 n1.
    cost = FlopsCost([3, 2], 5.0, [1.0, 2.0], [[0.0, 4.0], [0.0, 0.0]])
    assert cost([3, 2]) == 5 + 3 + 4 + 24
    assert cost.full == 36
    # F(3,2) - F(2,2) = 36 - 27; F(3,2) - F(3,1) = 36 - 22.
    assert cost.saving([3, 2]).tolist() == [9.0, 14.0]
    with pytest.raises(ValueError, match="3 channel counts for 2 groups"):
        cost([1, 1, 1])
    with pytest.raises(ValueError, match="2 linear and 2x2 quadratic"):
        FlopsCost([3, 2], 0.0, [1.0], [[0.0, 0.0], [0.0, 0.0]])


def _linear_cost():
    # F = 10 n0 + n1: a channel of group 0 costs ten times one of group 1.
    return FlopsCost([3, 2], 0.0, [10.0, 1.0], [[0.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("weight,want", [(0.0, [[0, 2], [0]]), (1.0, [[0], [0, 1]])])
def test_flops_budget_greedy_hand_worked(weight, want):
    # Budget: the layer counts at 0.5 are [2, 1], F = 21. L2-normalized scores:
    # layer 0 [.9, .1, .5] / 1.034 = [.870, .097, .484]; layer 1 [.3, .02] / .301 = [.998, .066].
    sel = TaylorPruneSelector([3, 2], fraction=0.5, budget="flops", cost=_linear_cost(),
                              flops_weight=weight)
    assert sel.flops_budget() == 21.0
    sel.sums = [torch.tensor([0.9, 0.1, 0.5], dtype=torch.float64),
                torch.tensor([0.3, 0.02], dtype=torch.float64)]
    # weight 0, by score: layer 1's .066 (F 31), then layer 0's .097 (F 21): done.
    # weight 1, by score per FLOP: layer 0's .097 / 10 < .066 / 1 (F 22), then layer 0's
    # .484 / 10 < .066 (F 12): layer 1 keeps both of its cheap channels.
    kept = sel.best()
    assert [k.tolist() for k in kept] == want
    assert _linear_cost()([k.numel() for k in kept]) <= sel.flops_budget()


def test_flops_budget_keeps_a_channel_per_layer_and_never_drops_free_ones():
    # Group 1 costs nothing: never dropped. Group 0 keeps one channel even at p = 0.01.
    cost = FlopsCost([4, 3], 0.0, [5.0, 0.0], [[0.0, 0.0], [0.0, 0.0]])
    sel = TaylorPruneSelector([4, 3], fraction=0.01, budget="flops", cost=cost)
    sel.sums = [torch.rand(4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)]
    kept = sel.best()
    assert [k.numel() for k in kept] == [1, 3]


def test_shrink_under_a_flops_budget_follows_the_cubic_in_flops_and_ends_within_it():
    cost = FlopsCost([8, 6], 3.0, [4.0, 2.0], [[0.5, 1.5], [0.0, 0.25]])
    sel = ShrinkSelector([8, 6], fraction=0.4, horizon=6, budget="flops", cost=cost, seed=1)
    g = torch.Generator().manual_seed(0)
    alive = None
    for t in range(9):
        chosen = sel.select()
        counts = [c.numel() for c in chosen]
        assert cost(counts) <= sel.flops_at(t) + 1e-9
        if alive is not None:  # a dropped channel never returns
            assert all(set(c.tolist()) <= a for c, a in zip(chosen, alive))
        alive = [set(c.tolist()) for c in chosen]
        sel.update([torch.rand(c, generator=g, dtype=torch.float64) for c in (8, 6)])
    assert sel.flops_at(6) == sel.flops_budget() == cost([3, 2])  # round(0.4 * 8), (0.4 * 6)
    assert cost([k.numel() for k in sel.best()]) <= sel.flops_budget()


@pytest.mark.parametrize("kind", ["shrink", "shrink-random", "random", "cucb"])
def test_flops_budget_resume_is_exact_and_refuses_another_cost(kind):
    def make(cost):
        if kind.startswith("shrink"):
            return ShrinkSelector([6, 5], 0.4, horizon=5, budget="flops", cost=cost, seed=2,
                                  order="random" if kind == "shrink-random" else "saliency")
        if kind == "random":
            return RandomSelector([6, 5], 0.4, budget="flops", cost=cost, seed=2)
        return CUCBSelector([6, 5], 0.4, tau=2, budget="flops", cost=cost, seed=2)

    def drive(sel, steps, g):
        out = []
        for _ in range(steps):
            out.append([s.tolist() for s in sel.select()])
            sel.update([torch.rand(c, generator=g, dtype=torch.float64) for c in (6, 5)])
        return out

    cost = FlopsCost([6, 5], 1.0, [3.0, 1.0], [[0.0, 2.0], [0.0, 0.0]])
    full = drive(make(cost), 8, torch.Generator().manual_seed(0))
    b, gb = make(cost), torch.Generator().manual_seed(0)
    head = drive(b, 3, gb)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    c = make(cost)
    c.load_state_dict(state)
    assert head + drive(c, 5, gb) == full
    other = FlopsCost([6, 5], 1.0, [3.0, 1.0], [[0.0, 9.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="selector state was saved for"):
        make(other).load_state_dict(state)


def test_random_order_under_flops_spreads_its_drops_over_layers():
    # Equal-cost layers, no saliency: a random order must not empty one layer first.
    cost = FlopsCost([20, 20], 0.0, [1.0, 1.0], [[0.0, 0.0], [0.0, 0.0]])
    sel = ShrinkSelector([20, 20], fraction=0.5, horizon=1, budget="flops", cost=cost,
                         order="random", seed=3)
    sel.select()
    sel.update([torch.rand(20, dtype=torch.float64), torch.rand(20, dtype=torch.float64)])
    counts = [c.numel() for c in sel.select()]
    assert sum(counts) == 20 and min(counts) >= 5


@pytest.mark.parametrize("kw,message", [
    (dict(budget="flops"), "budget='flops' needs cost="),
    (dict(budget="layer", cost=_linear_cost()), "cost= is used by budget='flops' only"),
    (dict(budget="flops", cost=FlopsCost([2, 2], 0.0, [1.0, 1.0], [[0.0] * 2] * 2)),
     r"cost is for groups of \[2, 2\] channels"),
])
def test_bad_flops_budget_input_is_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        ShrinkSelector([3, 2], 0.5, **kw)
    with pytest.raises(ValueError, match="flops_weight must be a finite number"):
        ShrinkSelector([3, 2], 0.5, budget="flops", cost=_linear_cost(), flops_weight=-1.0)
    with pytest.raises(ValueError, match="takes one fraction"):
        ShrinkSelector([3, 2], [0.5, 0.5], budget="flops", cost=_linear_cost())


def test_dynamic_channels_under_a_flops_budget_exports_within_it():
    from dce_kernels import DynamicChannels

    torch.manual_seed(3)
    model = build_model("vgg11", 1, 5, width=0.125, image_size=16)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 5, (8,))
    with pytest.raises(ValueError, match="budget='flops' needs example_input="):
        DynamicChannels(model, 0.3, "shrink", steps=3, budget="flops")
    dce = DynamicChannels(model, 0.3, "shrink", steps=3, budget="flops", example_input=x[:1])
    opt = dce.optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    for _ in range(4):
        with dce.step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    dce.keep()
    exported = count_flops(dce.compact(), x[:1])
    assert exported <= dce.selector.flops_budget()
    assert exported == dce.cost([k.numel() for k in dce.plan.selection])
