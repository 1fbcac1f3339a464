"""CUCB and random selectors: hand-worked bandit math, randomness, budgets, resume."""
import io
import math

import pytest
import torch

from dce_kernels import CUCBSelector, RandomSelector
from dce_kernels.selectors import ShrinkSelector, TaylorPruneSelector
from dce_kernels.selectors import normalize_rewards


def _set_stats(sel, counts, means, steps):
    sel.counts = [torch.tensor(c, dtype=torch.float64) for c in counts]
    sel.means = [torch.tensor(m, dtype=torch.float64) for m in means]
    sel.steps = steps


def test_ucb_hand_worked():
    # t = steps + 1 = 10; bonus = sqrt(3 ln 10 / (2 T)):
    #   T=4: 0.5 + 0.92923 = 1.42923; T=1: 0.2 + 1.85846 = 2.05846; T=2: 0.9 + 1.31413 = 2.21413
    sel = CUCBSelector([3], fraction=1 / 3, tau=5)
    _set_stats(sel, [[4.0, 1.0, 2.0]], [[0.5, 0.2, 0.9]], steps=9)
    bounds = sel.ucb(10)[0]
    assert torch.allclose(bounds, torch.tensor([1.42923, 2.05846, 2.21413], dtype=torch.float64),
                          atol=1e-5)
    assert sel.select()[0].tolist() == [2]

    sel2 = CUCBSelector([3], fraction=2 / 3, tau=5)
    _set_stats(sel2, [[4.0, 1.0, 2.0]], [[0.5, 0.2, 0.9]], steps=9)
    assert sel2.select()[0].tolist() == [1, 2]


def test_update_hand_worked():
    sel = CUCBSelector([3], fraction=2 / 3, tau=0)
    _set_stats(sel, [[4.0, 1.0, 2.0]], [[0.5, 0.2, 0.9]], steps=9)
    assert sel.select()[0].tolist() == [1, 2]
    # Rewards are saliency / layer max over the active channels: [0.5, 1.0].
    sel.update([torch.tensor([7.0, 3.0, 6.0])])  # channel 0 inactive: its value is ignored
    assert sel.counts[0].tolist() == [4.0, 2.0, 3.0]
    expected = [0.5, 0.2 + (0.5 - 0.2) / 2, 0.9 + (1.0 - 0.9) / 3]
    assert torch.allclose(sel.means[0], torch.tensor(expected, dtype=torch.float64))


def test_first_ucb_step_uses_t_tau_plus_one():
    # After tau = 5 warm-up steps, t = 6: T=1 -> 0.0 + sqrt(1.5 ln 6) = 1.63940,
    # T=3 -> 0.6 + sqrt(0.5 ln 6) = 1.54651. Channel 0 wins by its bonus.
    sel = CUCBSelector([2], fraction=0.5, tau=5)
    _set_stats(sel, [[1.0, 3.0]], [[0.0, 0.6]], steps=5)
    assert sel.select()[0].tolist() == [0]
    assert math.isclose(float(sel.ucb(6)[0][0]), math.sqrt(1.5 * math.log(6)), rel_tol=1e-12)


def test_untried_channels_explored_first_even_at_t_one():
    sel = CUCBSelector([4], fraction=0.5, tau=0)
    _set_stats(sel, [[5.0, 5.0, 0.0, 0.0]], [[1.0, 1.0, 0.0, 0.0]], steps=0)
    bounds = sel.ucb(1)[0]
    assert not torch.isnan(bounds).any()
    assert sel.select()[0].tolist() == [2, 3]


def test_reward_normalization_is_scale_free():
    s = torch.rand(6) + 0.1
    active = torch.tensor([0, 2, 3, 5])
    r = normalize_rewards(s, active)
    assert r.max().item() == 1.0 and (r >= 0).all()
    assert torch.allclose(normalize_rewards(s * 1e4, active), r)
    assert normalize_rewards(torch.zeros(6), active).eq(0).all()

    a, b = CUCBSelector([6], 0.5, tau=3, seed=7), CUCBSelector([6], 0.5, tau=3, seed=7)
    for _ in range(10):
        sal = torch.rand(6)
        a.select(), b.select()
        a.update([sal]), b.update([sal * 1e-6])
    assert torch.allclose(a.means[0], b.means[0])


def test_warmup_is_random_uniform_and_seeded():
    tau, n, k = 400, 8, 2
    sel = CUCBSelector([n], fraction=k / n, tau=tau, seed=3)
    hits = torch.zeros(n)
    seen = set()
    for _ in range(tau):
        chosen = sel.select()[0]
        assert chosen.numel() == k
        hits[chosen] += 1
        seen.add(tuple(chosen.tolist()))
        # Salience that would strongly favour channel 0 if warm-up were greedy.
        sel.update([torch.tensor([1.0] + [0.01] * (n - 1))])
    expected = tau * k / n  # 100 per channel
    assert (hits - expected).abs().max() < 0.4 * expected
    assert len(seen) > 20  # many different subsets
    # Same seed, same draws; another seed, other draws.
    again = CUCBSelector([n], fraction=k / n, tau=tau, seed=3)
    other = CUCBSelector([n], fraction=k / n, tau=tau, seed=4)
    first = [again.select()[0].tolist() for _ in range(20)]
    fresh = CUCBSelector([n], fraction=k / n, tau=tau, seed=3)
    assert [fresh.select()[0].tolist() for _ in range(20)] == first
    assert [other.select()[0].tolist() for _ in range(20)] != first


def test_after_warmup_cucb_exploits_salient_channels():
    n = 10
    sel = CUCBSelector([n], fraction=0.3, tau=20, seed=0)
    truth = torch.linspace(0.1, 1.0, n)  # channel 9 most salient
    for _ in range(600):
        sel.select()
        sel.update([truth * (0.8 + 0.4 * torch.rand(n))])
    assert sel.best()[0].tolist() == [7, 8, 9]
    late = torch.zeros(n)
    for _ in range(100):
        late[sel.select()[0]] += 1
        sel.update([truth])
    assert late[7:].sum() > late[:7].sum()


def test_ties_broken_randomly_by_seeded_generator():
    sel = CUCBSelector([6], fraction=0.5, tau=0, seed=11)  # all means 0, all T equal
    _set_stats(sel, [[2.0] * 6], [[0.5] * 6], steps=10)
    picks = [tuple(sel.best()[0].tolist()) for _ in range(50)]
    assert len(set(picks)) > 5
    covered = set(c for p in picks for c in p)
    assert covered == set(range(6))
    sel2 = CUCBSelector([6], fraction=0.5, tau=0, seed=11)
    _set_stats(sel2, [[2.0] * 6], [[0.5] * 6], steps=10)
    assert [tuple(sel2.best()[0].tolist()) for _ in range(50)] == picks


def test_per_layer_budget_counts_and_fraction_list():
    sel = CUCBSelector([4, 10, 3], fraction=[0.5, 0.25, 0.1], tau=2)
    for _ in range(4):
        chosen = sel.select()
        assert [c.numel() for c in chosen] == [2, 2, 1]  # round, at least one
        for c, n in zip(chosen, [4, 10, 3]):
            assert torch.equal(c, torch.sort(c).values) and c.unique().numel() == c.numel()
            assert int(c.min()) >= 0 and int(c.max()) < n
        sel.update([torch.rand(4), torch.rand(10), torch.rand(3)])


def test_global_budget_hand_worked():
    sel = CUCBSelector([4, 4], fraction=0.5, tau=0, budget="global")
    _set_stats(sel, [[1.0] * 4, [1.0] * 4], [[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.05]],
               steps=3)
    # Budget 4; each layer's best (L0 ch0, L1 ch2) is forced; then L0 ch1, ch2 by rank.
    best = sel.best()
    assert [b.tolist() for b in best] == [[0, 1, 2], [2]]
    # Every layer keeps a channel even when another layer dominates the ranking.
    small = CUCBSelector([2, 6], fraction=0.25, tau=0, budget="global")
    _set_stats(small, [[1.0] * 2, [1.0] * 6], [[0.0, 0.0], [1.0] * 6], steps=3)
    assert [b.numel() for b in small.best()] == [1, 1]


def test_global_budget_random_phase_totals():
    sel = CUCBSelector([3, 5, 8], fraction=0.5, tau=50, budget="global", seed=1)
    sizes = set()
    for _ in range(50):
        chosen = sel.select()
        assert sum(c.numel() for c in chosen) == 8 and all(c.numel() >= 1 for c in chosen)
        sizes.add(tuple(c.numel() for c in chosen))
        sel.update([torch.rand(3), torch.rand(5), torch.rand(8)])
    assert len(sizes) > 1  # layers' shares vary under a global budget


@pytest.mark.parametrize("kind", ["cucb", "random"])
@pytest.mark.parametrize("budget", ["layer", "global"])
def test_resume_is_exact(kind, budget):
    def make():
        if kind == "cucb":
            return CUCBSelector([5, 7], fraction=0.4, tau=6, budget=budget, seed=5)
        return RandomSelector([5, 7], fraction=0.4, budget=budget, seed=5)

    data = torch.Generator().manual_seed(0)
    sal = [[torch.rand(5, generator=data), torch.rand(7, generator=data)] for _ in range(30)]

    straight = make()
    ref = []
    for s in sal:
        ref.append([c.tolist() for c in straight.select()])
        straight.update(s)
    ref_best = [b.tolist() for b in straight.best()]

    first = make()
    got = []
    for s in sal[:4]:  # stop inside the warm-up
        got.append([c.tolist() for c in first.select()])
        first.update(s)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf))
    for s in sal[4:]:
        got.append([c.tolist() for c in resumed.select()])
        resumed.update(s)
    assert got == ref
    assert [b.tolist() for b in resumed.best()] == ref_best


def test_random_selector_is_uniform_and_ignores_saliency():
    sel = RandomSelector([6], fraction=0.5, seed=2)
    hits = torch.zeros(6)
    for _ in range(300):
        c = sel.select()[0]
        hits[c] += 1
        sel.update([torch.tensor([10.0, 0, 0, 0, 0, 0])])
    assert (hits - 150).abs().max() < 45
    assert len({tuple(sel.best()[0].tolist()) for _ in range(30)}) > 3


def test_best_at_other_fraction():
    sel = CUCBSelector([5], fraction=0.2, tau=0)
    _set_stats(sel, [[1.0] * 5], [[0.1, 0.5, 0.3, 0.9, 0.7]], steps=5)
    assert sel.best()[0].tolist() == [3]
    assert sel.best(0.6)[0].tolist() == [1, 3, 4]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="fraction"):
        CUCBSelector([4], fraction=0.0)
    with pytest.raises(ValueError, match="budget"):
        CUCBSelector([4], budget="both")
    with pytest.raises(ValueError, match="tau"):
        CUCBSelector([4], tau=-1)
    with pytest.raises(ValueError, match="fractions for"):
        CUCBSelector([4, 4], fraction=[0.5])
    with pytest.raises(ValueError, match="at least one channel"):
        RandomSelector([4, 0])
    sel = CUCBSelector([4, 3], tau=1)
    with pytest.raises(RuntimeError, match="without a preceding select"):
        sel.update([torch.rand(4), torch.rand(3)])
    sel.select()
    with pytest.raises(ValueError, match="shape"):
        sel.update([torch.rand(4), torch.rand(4)])
    # A non-finite saliency cannot raise inside update() without reading the device:
    # the step is left out of the statistics and the next check raises, naming it.
    before = [m.clone() for m in sel.means], [c.clone() for c in sel.counts]
    sel.update([torch.rand(4), torch.tensor([1.0, float("nan"), -float("inf")])])
    assert [m.tolist() for m in sel.means] == [m.tolist() for m in before[0]]
    assert [c.tolist() for c in sel.counts] == [c.tolist() for c in before[1]]
    sel.select()
    sel.update([torch.rand(4), torch.rand(3)])  # a later good step is recorded ...
    assert sum(float(c.sum()) for c in sel.counts) > sum(float(c.sum()) for c in before[1])
    # ... but the first bad one is reported, with its step and layer.
    for check in (sel.check_saliency, sel.best, sel.state_dict):
        with pytest.raises(ValueError, match=r"at step 1 is not finite in layer 1 "
                                             r"\(2 of 3 channels\)"):
            check()
    assert sel.nonfinite_saliency() == (1, [(1, 2)])
    with pytest.raises(ValueError, match="saved for"):
        CUCBSelector([4, 3], tau=2).load_state_dict(RandomSelector([4, 3]).state_dict())


# -- reward rules, discount, annealing (levers of the compact-networks work) ------------

def test_reward_rules_hand_worked():
    s = torch.tensor([3.0, 9.0, 4.0, 0.0, 4.0], dtype=torch.float64)
    active = torch.tensor([0, 2, 4])  # values 3, 4, 4
    assert normalize_rewards(s, active, "max").tolist() == pytest.approx([0.75, 1.0, 1.0])
    norm = math.sqrt(9 + 16 + 16)
    assert normalize_rewards(s, active, "l2").tolist() == pytest.approx(
        [3 / norm, 4 / norm, 4 / norm])
    # Ranks 0..1 over three channels; the two 4s share ranks 1 and 2 -> 1.5 / 2.
    assert normalize_rewards(s, active, "rank").tolist() == pytest.approx([0.0, 0.75, 0.75])
    assert normalize_rewards(s, torch.tensor([1]), "rank").tolist() == [1.0]
    assert normalize_rewards(s, torch.tensor([3]), "rank").tolist() == [0.0]
    assert normalize_rewards(torch.zeros(5, dtype=torch.float64), active, "l2").eq(0).all()
    with pytest.raises(ValueError, match="reward must be one of max, l2, rank"):
        normalize_rewards(s, active, "mean")


def test_discounted_means_hand_worked():
    # discount 0.75: a reward enters with weight max(1/T, 0.25). Both channels are active
    # (fraction 1), so channel 0's reward is s0 / max(s0, s1).
    sel = CUCBSelector([2], fraction=1.0, tau=10, discount=0.75)
    means = []
    for s0, s1 in [(1.0, 2.0), (2.0, 2.0), (2.0, 1.0), (1.0, 4.0), (4.0, 1.0)]:
        sel.select()
        sel.update([torch.tensor([s0, s1])])
        means.append(sel.means[0][0].item())
    # Channel 0's rewards: 0.5, 1, 1, 0.25, 1. T = 1..5, weights 1, 1/2, 1/3, 1/4, 1/4.
    m = 0.5
    m += (1 - m) / 2            # 0.75
    m += (1 - m) / 3            # 0.8333
    m += (0.25 - m) * 0.25      # 0.6875
    m += (1 - m) * 0.25         # 0.765625
    assert means[-1] == pytest.approx(m)
    plain = CUCBSelector([2], fraction=1.0, tau=10)
    for s0, s1 in [(1.0, 2.0), (2.0, 2.0), (2.0, 1.0), (1.0, 4.0), (4.0, 1.0)]:
        plain.select()
        plain.update([torch.tensor([s0, s1])])
    assert plain.means[0][0].item() == pytest.approx((0.5 + 1 + 1 + 0.25 + 1) / 5)
    with pytest.raises(ValueError, match="discount"):
        CUCBSelector([2], discount=0.0)


def test_annealed_confidence_hand_worked():
    sel = CUCBSelector([3], fraction=1 / 3, tau=0, horizon=20)
    _set_stats(sel, [[4.0, 1.0, 2.0]], [[0.5, 0.2, 0.9]], steps=9)
    # t = 10 of 20: half the poster's bonus.
    bounds = sel.ucb(10)[0]
    half = torch.tensor([0.5 + 0.929228, 0.2 + 1.858456, 0.9 + 1.314130], dtype=torch.float64)
    assert torch.allclose(bounds, half - torch.tensor([0.929228, 1.858456, 1.314130],
                                                      dtype=torch.float64) / 2, atol=1e-5)
    # At the horizon and after it, the bandit only exploits: the highest mean wins.
    assert sel.confidence_scale(20) == 0.0 and sel.confidence_scale(30) == 0.0
    assert torch.allclose(sel.ucb(20)[0], torch.tensor([0.5, 0.2, 0.9], dtype=torch.float64))
    with pytest.raises(ValueError, match="horizon"):
        CUCBSelector([3], horizon=0)


def test_poster_state_still_loads_into_poster_cucb():
    # Options left at their defaults do not enter the state's config, so a checkpoint of
    # the poster's algorithm made before the options existed loads.
    old = CUCBSelector([4, 2], fraction=0.5, tau=3, seed=1)
    state = old.state_dict()
    assert set(state["config"]) == {"kind", "num_channels", "fractions", "budget", "tau"}
    CUCBSelector([4, 2], fraction=0.5, tau=3, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved for"):
        CUCBSelector([4, 2], fraction=0.5, tau=3, seed=1, reward="l2").load_state_dict(state)


# -- ShrinkSelector ---------------------------------------------------------------------

def test_shrink_schedule_hand_worked():
    sel = ShrinkSelector([10, 20], fraction=0.2, horizon=4)
    # f_t = 0.2 + 0.8 (1 - t/4)^3: t=0 -> 1, t=1 -> 0.5375, t=2 -> 0.3, t>=4 -> 0.2.
    assert sel.active_fraction(0) == 1.0
    assert sel.active_fraction(1) == pytest.approx(0.5375)
    assert sel.active_fraction(2) == pytest.approx(0.3)
    assert sel.active_fraction(4) == sel.active_fraction(9) == pytest.approx(0.2)
    assert sel.counts_at(0)[0] == [10, 20]
    assert sel.counts_at(1)[0] == [5, 11]       # round(5.375), round(10.75)
    assert sel.counts_at(2)[0] == [3, 6]
    assert sel.counts_at(4)[0] == sel.counts_at(7)[0] == [2, 4]
    glob = ShrinkSelector([10, 20], fraction=0.2, horizon=4, budget="global")
    assert [glob.counts_at(t)[1] for t in (0, 1, 2, 4)] == [30, 16, 9, 6]


def test_shrink_drops_lowest_mean_and_never_brings_a_channel_back():
    sel = ShrinkSelector([4], fraction=0.5, horizon=2, reward="max")
    first = sel.select()[0]
    assert first.tolist() == [0, 1, 2, 3]  # everything starts active
    sel.update([torch.tensor([1.0, 4.0, 2.0, 3.0])])  # rewards 0.25, 1, 0.5, 0.75
    # t = 1 of 2: f = 0.5 + 0.5 * 0.125 = 0.5625 -> round(2.25) = 2 channels: the top means.
    second = sel.select()[0]
    assert second.tolist() == [1, 3]
    # Channel 0 now reports a huge saliency, but it is inactive: ignored; dropped stays out.
    sel.update([torch.tensor([100.0, 1.0, 100.0, 4.0])])
    assert sel.select()[0].tolist() == [1, 3]
    assert sel.best()[0].tolist() == [1, 3]
    assert sel.alive[0].tolist() == [False, True, False, True]


def test_shrink_global_budget_shares_the_total_by_rank():
    sel = ShrinkSelector([3, 3], fraction=0.5, horizon=1, budget="global", reward="l2")
    sel.select()
    # l2 rewards: layer 0 [3,4,0]/5 = .6 .8 0; layer 1 [1,1,1]/sqrt(3) = .577 each.
    sel.update([torch.tensor([3.0, 4.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])])
    chosen = sel.select()
    # Total 3: each layer's best is forced in (ch 1 of layer 0, one of layer 1), then the
    # next best overall is channel 0 of layer 0 (0.6 > 0.577).
    assert chosen[0].tolist() == [0, 1] and chosen[1].numel() == 1


def test_shrink_resume_is_exact():
    def drive(sel, steps, g):
        out = []
        for _ in range(steps):
            out.append([s.tolist() for s in sel.select()])
            sel.update([torch.rand(c, generator=g, dtype=torch.float64)
                        for c in sel.num_channels])
        return out

    a = ShrinkSelector([6, 5], fraction=0.4, horizon=5, seed=2)
    ga = torch.Generator().manual_seed(0)
    full = drive(a, 8, ga)
    b = ShrinkSelector([6, 5], fraction=0.4, horizon=5, seed=2)
    gb = torch.Generator().manual_seed(0)
    head = drive(b, 3, gb)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    c = ShrinkSelector([6, 5], fraction=0.4, horizon=5, seed=2)
    c.load_state_dict(torch.load(buf, weights_only=False))
    assert head + drive(c, 5, gb) == full


# -- TaylorPruneSelector ----------------------------------------------------------------

def test_prune_keeps_highest_accumulated_saliency_of_the_last_steps():
    sel = TaylorPruneSelector([4, 2], fraction=0.5, accumulate_from=2)
    saliencies = [
        ([100.0, 0.0, 0.0, 0.0], [0.0, 100.0]),   # steps 1-2: not accumulated
        ([100.0, 0.0, 0.0, 0.0], [0.0, 100.0]),
        ([1.0, 3.0, 2.0, 0.5], [2.0, 1.0]),       # steps 3-4: accumulated
        ([1.0, 2.0, 3.0, 0.5], [2.0, 0.5]),
    ]
    for s0, s1 in saliencies:
        assert [s.tolist() for s in sel.select()] == [[0, 1, 2, 3], [0, 1]]  # trains dense
        sel.update([torch.tensor(s0), torch.tensor(s1)])
    assert sel.sums[0].tolist() == [2.0, 5.0, 5.0, 1.0]
    assert sel.sums[1].tolist() == [4.0, 1.5]
    norm0 = math.sqrt(4 + 25 + 25 + 1)
    assert torch.allclose(sel.scores()[0], torch.tensor([2, 5, 5, 1], dtype=torch.float64) / norm0)
    best = sel.best()
    assert best[0].tolist() == [1, 2] and best[1].tolist() == [0]


def test_prune_global_budget_ranks_l2_normalized_sums():
    sel = TaylorPruneSelector([2, 2], fraction=0.75, budget="global")
    sel.select()
    # Raw sums favour layer 1 by 100x; normalized: layer 0 [.6 .8], layer 1 [.995 .0995].
    sel.update([torch.tensor([3.0, 4.0]), torch.tensor([1000.0, 100.0])])
    best = sel.best()
    assert best[0].tolist() == [0, 1] and best[1].tolist() == [0]


def test_shrink_random_order_ignores_saliency_and_stays_monotone():
    picks = []
    for seed in range(6):
        sel = ShrinkSelector([8], fraction=0.25, horizon=3, order="random", seed=seed)
        alive = set(range(8))
        for _ in range(4):
            chosen = set(sel.select()[0].tolist())
            assert chosen <= alive  # a dropped channel never returns
            alive = chosen
            # Channel 0 always has by far the highest saliency; random order ignores it.
            sel.update([torch.tensor([100.0] + [1.0] * 7)])
        picks.append(0 in alive)
        assert len(alive) == 2
    assert not all(picks)
    with pytest.raises(ValueError, match="order"):
        ShrinkSelector([8], order="magnitude")


# -- the flat, on-device selectors against the per-layer reference ----------------------
#
# reference_selectors.py is the per-layer implementation these replaced. The new one draws
# its tie-breaking permutation once over all channels: under budget="global" that is the
# reference's draw exactly, so every choice matches, random phases included. Under
# budget="layer" (and "flops") the reference drew one permutation per layer, so the
# choices among equal scores differ by design; with distinct scores (every channel tried,
# continuous saliency) they match exactly, and the tie-breaking itself is checked above
# (uniform, seeded, resumable) and by hand below.

import reference_selectors as reference  # noqa: E402  (python_tests/ is on the path)
from dce_kernels.cost import FlopsCost  # noqa: E402
from dce_kernels.selectors import NonFiniteSaliencyError, _order_key  # noqa: E402
from toolkit import NoHostReads  # noqa: E402

SIZES = [5, 1, 12, 7, 3]


def _random_cost(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(sizes)
    quadratic = torch.triu(torch.rand(n, n, generator=g, dtype=torch.float64) * 100)
    return FlopsCost(sizes, 1000.0, torch.rand(n, generator=g, dtype=torch.float64) * 50,
                     quadratic)


def _tried(pair, seed):
    """Both selectors at the same UCB-phase state: every channel tried (random counts),
    distinct means, so no two bounds tie."""
    g = torch.Generator().manual_seed(seed)
    counts = [torch.randint(1, 9, (c,), generator=g).double() for c in SIZES]
    means = [torch.rand(c, generator=g, dtype=torch.float64) for c in SIZES]
    for sel in pair:
        sel.counts = [c.clone() for c in counts]
        sel.means = [m.clone() for m in means]
        sel.steps = 20


def _drive(pair, steps, seed, *, exact_means=True):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        got, want = (sel.select() for sel in pair)
        assert [c.tolist() for c in got] == [c.tolist() for c in want], f"step {step}"
        scale = 10.0 ** (step % 7 - 3)  # saliency spans orders of magnitude
        sal = [torch.rand(c, generator=g, dtype=torch.float64) * scale for c in SIZES]
        for sel in pair:
            sel.update([s.clone() for s in sal])
        new, old = pair
        assert [c.tolist() for c in new.counts] == [c.tolist() for c in old.counts]
        for a, b in zip(new.means, old.means):
            if exact_means:
                assert torch.equal(a, b)
            else:  # a sum of squares per layer instead of torch.norm: rounding differs
                assert torch.allclose(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("budget", ["layer", "global"])
@pytest.mark.parametrize("reward", ["max", "l2", "rank"])
@pytest.mark.parametrize("options", [{}, {"discount": 0.8, "horizon": 30}], ids=["plain", "ema"])
def test_cucb_bandit_phase_equals_the_reference(budget, reward, options):
    pair = [mod.CUCBSelector(SIZES, fraction=0.4, tau=20, budget=budget, seed=3,
                             reward=reward, **options) for mod in (dce_selectors, reference)]
    _tried(pair, seed=1)
    _drive(pair, 25, seed=2, exact_means=reward != "l2")
    for fraction in (None, 0.7):
        assert ([b.tolist() for b in pair[0].best(fraction)]
                == [b.tolist() for b in pair[1].best(fraction)])


@pytest.mark.parametrize("kind", ["cucb", "random"])
def test_global_budget_equals_the_reference_random_draws_included(kind):
    def make(mod):
        if kind == "cucb":  # warm-up (random, all scores tie), then untried channels tie at inf
            return mod.CUCBSelector(SIZES, fraction=0.3, tau=6, budget="global", seed=9)
        return mod.RandomSelector(SIZES, fraction=0.3, budget="global", seed=9)

    pair = [make(dce_selectors), make(reference)]
    _drive(pair, 30, seed=4)
    assert [b.tolist() for b in pair[0].best()] == [b.tolist() for b in pair[1].best()]


@pytest.mark.parametrize("budget", ["layer", "global", "flops"])
@pytest.mark.parametrize("reward", ["max", "l2"])
def test_shrink_equals_the_reference(budget, reward):
    cost = _random_cost(SIZES, 0) if budget == "flops" else None
    pair = [mod.ShrinkSelector(SIZES, fraction=0.3, horizon=12, budget=budget, seed=1,
                               reward=reward, cost=cost) for mod in (dce_selectors, reference)]
    # Step 0 selects everything (no ties matter); from then on the means are distinct.
    _drive(pair, 16, seed=5, exact_means=reward != "l2")
    assert [b.tolist() for b in pair[0].best()] == [b.tolist() for b in pair[1].best()]
    assert [a.tolist() for a in pair[0].alive] == [a.tolist() for a in pair[1].alive]


@pytest.mark.parametrize("flops_weight", [0.0, 1.0])
def test_cucb_flops_budget_equals_the_reference(flops_weight):
    cost = _random_cost(SIZES, 1)
    pair = [mod.CUCBSelector(SIZES, fraction=0.5, tau=20, budget="flops", seed=2, cost=cost,
                             flops_weight=flops_weight) for mod in (dce_selectors, reference)]
    _tried(pair, seed=6)
    _drive(pair, 10, seed=7)


@pytest.mark.parametrize("budget", ["layer", "global"])
def test_prune_equals_the_reference(budget):
    pair = [mod.TaylorPruneSelector(SIZES, fraction=0.4, budget=budget, accumulate_from=3)
            for mod in (dce_selectors, reference)]
    _drive(pair, 8, seed=8)
    for a, b in zip(pair[0].sums, pair[1].sums):
        assert torch.equal(a, b)
    assert [b.tolist() for b in pair[0].best()] == [b.tolist() for b in pair[1].best()]


def test_layer_budget_tie_breaking_hand_worked():
    # Scores [3, 1, 1, 1 | 2, 2, 5]: the top 2 of layer 0 are channel 0 and one of the
    # three tied at 1, uniformly; layer 1's top 2 are channel 2 and one of the two 2s.
    sel = CUCBSelector([4, 3], fraction=0.5, tau=0, seed=0)
    _set_stats(sel, [[1.0] * 4, [1.0] * 3], [[3.0, 1.0, 1.0, 1.0], [2.0, 2.0, 5.0]], steps=0)
    second = {0: torch.zeros(4), 1: torch.zeros(3)}
    for _ in range(600):
        b0, b1 = sel.best(fraction=[0.5, 2 / 3])
        assert b0[0] == 0 and b0.numel() == 2 and b1[-1] == 2 and b1.numel() == 2
        second[0][b0[1]] += 1
        second[1][b1[0]] += 1
    assert second[0][0] == 0 and (second[0][1:] - 200).abs().max() < 60
    assert (second[1][:2] - 300).abs().max() < 70 and second[1][2] == 0


def test_order_keys_sort_as_the_floats():
    values = torch.tensor([0.5, -0.0, 0.0, -math.inf, math.inf, -1e-300, 1e-300, -7.25, 3e300,
                           -3e300, 5e-324, -5e-324], dtype=torch.float64)
    values = torch.cat([values, torch.randn(200, dtype=torch.float64) * 1e3])
    keys = _order_key(values)
    i, j = torch.triu_indices(len(values), len(values), 1)
    assert torch.equal(keys[i] < keys[j], values[i] < values[j])
    assert torch.equal(keys[i] == keys[j], values[i] == values[j])  # -0.0 == 0.0 included


# -- no host synchronization in a step ---------------------------------------------------

def _selectors_of_every_kind(budget):
    return {
        "cucb": CUCBSelector(SIZES, fraction=0.4, tau=3, budget=budget, seed=1),
        "cucb-rank": CUCBSelector(SIZES, fraction=0.4, tau=0, budget=budget, reward="rank"),
        "random": RandomSelector(SIZES, fraction=0.4, budget=budget, seed=1),
        "shrink": ShrinkSelector(SIZES, fraction=0.4, horizon=4, budget=budget),
        "shrink-random": ShrinkSelector(SIZES, fraction=0.4, horizon=4, budget=budget,
                                        order="random"),
        "taylor": TaylorPruneSelector(SIZES, fraction=0.4, budget=budget, accumulate_from=1),
    }


def test_a_layer_budget_step_reads_nothing_to_the_host(monkeypatch):
    for name, sel in _selectors_of_every_kind("layer").items():
        sal = [[torch.rand(c, dtype=torch.float64) for c in SIZES] for _ in range(8)]
        with NoHostReads(monkeypatch) as mode:
            for s in sal:
                sel.update(s) if sel._pending is not None else None
                sel.select()
            sel.update([torch.full((c,), math.nan) for c in SIZES])  # recorded, not raised
        assert mode.reads == [], name
        with pytest.raises(NonFiniteSaliencyError, match="at step 8"):
            sel.check_saliency()


def test_a_global_budget_step_reads_only_the_layer_counts(monkeypatch):
    for name, sel in _selectors_of_every_kind("global").items():
        with NoHostReads(monkeypatch) as mode:
            reads = []
            for _ in range(8):
                before = len(mode.reads)
                sel.select()
                sel.update([torch.rand(c, dtype=torch.float64) for c in SIZES])
                reads.append(mode.reads[before:])
        # At most one read per step, of the L counts; none where the selection is fixed
        # (taylor: everything; shrink: after its horizon of 4 steps, the survivors).
        assert all(r in ([], [("tolist", len(SIZES))]) for r in reads), (name, reads)
        if name.startswith("shrink"):
            assert reads[5:] == [[]] * 3, name
        if name == "taylor":
            assert reads == [[]] * 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CPU tests above "
                    "check the same by the ops dispatched")
@pytest.mark.parametrize("budget", ["layer", "global"])
def test_cuda_step_never_synchronizes(budget):
    sal = [torch.rand(c, device="cuda") for c in SIZES]
    for name, sel in _selectors_of_every_kind(budget).items():
        sel.to("cuda")
        sel.select()  # the first selection builds cached index tensors
        sel.update(sal)
        torch.cuda.synchronize()
        for step in range(6):
            if budget == "global" and not name.startswith("taylor"):
                sel.select()  # reads the layer counts: a sync by design
                torch.cuda.set_sync_debug_mode("error")
            else:
                torch.cuda.set_sync_debug_mode("error")
                chosen = sel.select()
                assert all(c.device.type == "cuda" for c in chosen)
            try:
                sel.update(sal)
            finally:
                torch.cuda.set_sync_debug_mode("default")


# -- device, resume, state format --------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: CUCBSelector(SIZES, fraction=0.3, tau=4, reward="rank", seed=4),
    lambda: ShrinkSelector(SIZES, fraction=0.3, horizon=6, budget="global", order="random",
                           seed=4),
    lambda: ShrinkSelector(SIZES, fraction=0.3, horizon=6, budget="flops",
                           cost=_random_cost(SIZES, 2), seed=4),
    lambda: CUCBSelector(SIZES, fraction=0.3, tau=3, budget="flops", flops_weight=1.0,
                         cost=_random_cost(SIZES, 3), seed=4),
    lambda: TaylorPruneSelector(SIZES, fraction=0.3, budget="global", accumulate_from=2),
], ids=["cucb-rank", "shrink-random-global", "shrink-flops", "cucb-flops", "taylor"])
def test_resume_anywhere_equals_the_uninterrupted_run(make):
    data = torch.Generator().manual_seed(3)
    sal = [[torch.rand(c, generator=data, dtype=torch.float64) for c in SIZES]
           for _ in range(12)]

    def run(sel, saliencies):
        out = []
        for s in saliencies:
            out.append([c.tolist() for c in sel.select()])
            sel.update(s)
        return out

    straight = make()
    ref = run(straight, sal)
    ref_best = [b.tolist() for b in straight.best()]
    for cut in (2, 5, 9):
        first = make()
        head = run(first, sal[:cut])
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        resumed = make()
        resumed.load_state_dict(torch.load(buf))
        assert head + run(resumed, sal[cut:]) == ref, cut
        assert [b.tolist() for b in resumed.best()] == ref_best


def test_state_format_device_and_shapes_are_checked():
    sel = CUCBSelector([4, 3], tau=2, seed=1)
    sel.select()
    state = sel.state_dict()
    assert state["counts"].shape == (7,) and state["generator_device"] == "cpu"
    old = reference.CUCBSelector([4, 3], tau=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="format 1.*older dce_kernels"):
        CUCBSelector([4, 3], tau=2, seed=1).load_state_dict(old)
    with pytest.raises(ValueError, match="saved with a cuda generator"):
        CUCBSelector([4, 3], tau=2, seed=1).load_state_dict({**state, "generator_device": "cuda"})
    with pytest.raises(ValueError, match=r"'means' must be a tensor of shape \(7,\)"):
        CUCBSelector([4, 3], tau=2, seed=1).load_state_dict({**state, "means": torch.zeros(6)})
    with pytest.raises(ValueError, match="counts of layer 1 has shape"):
        sel.counts = [torch.zeros(4), torch.zeros(4)]
    with pytest.raises(RuntimeError, match="before the first select"):
        sel.to("meta")
    fresh = CUCBSelector([4, 3], tau=2, seed=1)
    assert fresh.to("cpu") is fresh


import dce_kernels.selectors as dce_selectors  # noqa: E402


# -- blocks: equal counts in every run of a layer (grouped convs) -----------------------

BLOCKED_SIZES, BLOCKS = [12, 9, 8], [3, 1, 4]


def _balanced(selection, sizes, blocks):
    for idx, c, b in zip(selection, sizes, blocks):
        per_run = torch.bincount(idx // (c // b), minlength=b)
        if not (per_run == per_run[0]).all():
            return False
    return True


@pytest.mark.parametrize("budget", ["layer", "global", "flops"])
@pytest.mark.parametrize("kind", ["cucb", "random", "shrink", "prune"])
def test_blocked_layers_activate_equally_many_channels_in_every_run(kind, budget):
    make = {"cucb": lambda **k: CUCBSelector(tau=3, **k),
            "random": RandomSelector,
            "shrink": lambda **k: ShrinkSelector(horizon=6, **k),
            "prune": TaylorPruneSelector}[kind]
    cost = _random_cost(BLOCKED_SIZES, seed=1) if budget == "flops" else None
    sel = make(num_channels=BLOCKED_SIZES, fraction=0.4, budget=budget, seed=5,
               blocks=BLOCKS, cost=cost)
    g = torch.Generator().manual_seed(0)
    for _ in range(9):
        chosen = sel.select()
        assert _balanced(chosen, BLOCKED_SIZES, BLOCKS)
        assert all(torch.equal(i, i.unique()) for i in chosen)  # sorted and unique
        sel.update([torch.rand(c, generator=g, dtype=torch.float64) for c in BLOCKED_SIZES])
    for fraction in (None, 0.25, 0.7):
        best = sel.best(fraction)
        assert _balanced(best, BLOCKED_SIZES, BLOCKS)
        assert all(i.numel() % b == 0 for i, b in zip(best, BLOCKS))


def test_blocked_best_takes_the_top_of_each_run_hand_worked():
    sel = CUCBSelector([8], 0.5, tau=0, blocks=[2])
    sel.means = [torch.tensor([8., 7, 6, 5, 1, 2, 3, 4], dtype=torch.float64)]
    # Without blocks the top half is [0, 1, 2, 3]; with two runs, the top two of each.
    assert sel.best()[0].tolist() == [0, 1, 6, 7]
    unblocked = CUCBSelector([8], 0.5, tau=0)
    unblocked.means = sel.means
    assert unblocked.best()[0].tolist() == [0, 1, 2, 3]


def test_blocked_counts_round_to_the_nearest_multiple_hand_worked():
    # 0.3 * 12 = 3.6 channels -> 1 of each of 3 runs; 0.45 * 12 = 5.4 -> 2 of each (6);
    # 0.05 * 8 = 0.4 -> still one of each of 4 runs.
    assert RandomSelector([12], 0.3, blocks=[3]).active_counts() == [3]
    assert RandomSelector([12], 0.45, blocks=[3]).active_counts() == [6]
    assert RandomSelector([8], 0.05, blocks=[4]).active_counts() == [4]
    assert RandomSelector([12, 8], 0.3, blocks=[1, 1]).active_counts() == \
        RandomSelector([12, 8], 0.3).active_counts() == [4, 2]


@pytest.mark.parametrize("budget", ["layer", "global"])
def test_one_block_per_layer_selects_what_no_blocks_does(budget):
    a = CUCBSelector([7, 5, 9], 0.5, tau=2, budget=budget, seed=4, blocks=[1, 1, 1])
    b = CUCBSelector([7, 5, 9], 0.5, tau=2, budget=budget, seed=4)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        sa, sb = a.select(), b.select()
        assert all(torch.equal(x, y) for x, y in zip(sa, sb))
        sal = [torch.rand(c, generator=g, dtype=torch.float64) for c in (7, 5, 9)]
        a.update(sal)
        b.update(sal)
    assert a.state_dict()["config"] == b.state_dict()["config"]


def test_blocks_bad_input_and_checkpoint_mismatch():
    with pytest.raises(ValueError, match="blocks must give each layer"):
        CUCBSelector([12, 9], blocks=[5, 1])  # 5 does not divide 12
    with pytest.raises(ValueError, match="blocks must give each layer"):
        CUCBSelector([12, 9], blocks=[3])
    with pytest.raises(ValueError, match="blocks must give each layer"):
        CUCBSelector([12, 9], blocks=[0, 1])
    state = CUCBSelector([12, 9], blocks=[3, 1]).state_dict()
    with pytest.raises(ValueError, match="saved for"):
        CUCBSelector([12, 9]).load_state_dict(state)
    resumed = CUCBSelector([12, 9], blocks=[3, 1])
    resumed.load_state_dict(state)
