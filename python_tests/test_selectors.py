"""CUCB and random selectors: hand-worked bandit math, randomness, budgets, resume."""
import io
import math

import pytest
import torch

from dce_kernels import CUCBSelector, RandomSelector
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
    with pytest.raises(ValueError, match="not finite"):
        sel.update([torch.rand(4), torch.tensor([1.0, float("nan"), 0.0])])
    with pytest.raises(ValueError, match="saved for"):
        CUCBSelector([4, 3], tau=2).load_state_dict(RandomSelector([4, 3]).state_dict())
