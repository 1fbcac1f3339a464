# The per-layer selectors as they were before the flat, on-device ones: a frozen copy of
# dce_kernels/selectors.py at 4e592b7, for tests and benchmarks only
# (python_tests/test_selectors.py checks the new selectors against it,
# bench/test_selector_speed.py times both). Not part of the package; it is the
# reference, so it does not follow changes of the package.
"""Channel selectors: which channels of each layer are active at a training step.

A selector sees layers only as channel counts. Each step: ``select()`` returns one
sorted index tensor per layer; after backward, ``update(saliencies)`` takes the
saliency every layer reported (one ``[C]`` tensor per layer). At the end,
``best()`` returns the channels to keep. Selectors know nothing of the layers
themselves: :mod:`dce_kernels.channels` applies a selection to a model.

Budgets. ``budget="layer"`` (default): each layer activates
``max(1, round(fraction * C))`` of its ``C`` channels (``fraction`` may be a
list, one per layer). ``budget="global"``: ``max(L, round(fraction * sum C))``
channels over all ``L`` layers, at least one per layer (a layer with no active
channel would cut the network), the rest by global rank. ``budget="flops"``: the inference FLOPs of
the uniformly narrow network at ``fraction`` (every layer at its layer-budget count),
spent where the scores say, under a :class:`~dce_kernels.cost.FlopsCost` of the
model (``cost=``): channels are dropped greedily by lowest ``score / saving **
flops_weight`` (``saving``: the FLOPs one channel less saves). ``flops_weight=0``
(default) drops by score alone, the global budget's ranking with its total counted in
FLOPs; ``1`` by score per FLOP, which empties the expensive layers first.
The compact network then costs what the uniform one costs per image, so the two
compare at equal inference cost.

Ties are broken uniformly at random by the selector's own seeded generator: in
CUCB every never-tried channel has an infinite bound, and breaking those ties by
index would always explore the low-numbered channels first. The generator's
state is part of ``state_dict()``, so a resumed run selects exactly what the
uninterrupted run would have.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = ["CUCBSelector", "RandomSelector", "ShrinkSelector", "TaylorPruneSelector", "BUDGETS",
           "DEFAULT_TAU",
           "REWARD_RULES", "normalize_rewards"]

# How a fraction becomes channel counts (see the module docstring).
BUDGETS = ("layer", "global", "flops")
# Random warm-up steps of CUCB before the bandit takes over (the poster's tau).
DEFAULT_TAU = 100

_Fraction = Union[float, Sequence[float]]


class _Selector:
    """Budget bookkeeping, tie-breaking, reward statistics and state shared by all
    selectors. ``reward`` and ``discount`` shape the per-channel means (see
    :class:`CUCBSelector`); the selectors that rank by them expose both."""

    def __init__(self, num_channels: Sequence[int], fraction: _Fraction = 0.5,
                 budget: str = "layer", seed: int = 0, reward: str = "max",
                 discount: float = 1.0, cost=None, flops_weight: float = 0.0) -> None:
        num_channels = [int(c) for c in num_channels]
        if not num_channels:
            raise ValueError("a selector needs at least one layer")
        if any(c < 1 for c in num_channels):
            raise ValueError(f"every layer needs at least one channel, got {num_channels}")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
        if isinstance(fraction, (int, float)):
            fractions = [float(fraction)] * len(num_channels)
        else:
            if budget != "layer":
                raise ValueError(f"budget={budget!r} takes one fraction, not a list")
            fractions = [float(f) for f in fraction]
            if len(fractions) != len(num_channels):
                raise ValueError(f"got {len(fractions)} fractions for {len(num_channels)} layers")
        if any(not (0.0 < f <= 1.0) for f in fractions):
            raise ValueError(f"fractions must lie in (0, 1], got {fractions}")
        check_reward_rule(reward)
        if budget == "flops":
            if cost is None:
                raise ValueError("budget='flops' needs cost= (a dce_kernels.cost.FlopsCost of "
                                 "the model); this selector takes none")
            if list(cost.num_channels) != num_channels:
                raise ValueError(f"cost is for groups of {list(cost.num_channels)} channels, "
                                 f"the selector's are {num_channels}")
        elif cost is not None:
            raise ValueError(f"cost= is used by budget='flops' only, got budget={budget!r}")
        if not (math.isfinite(flops_weight) and flops_weight >= 0):
            raise ValueError(f"flops_weight must be a finite number >= 0, got {flops_weight}")
        self.cost = cost
        self.flops_weight = float(flops_weight)
        if not 0.0 < float(discount) <= 1.0:
            raise ValueError(f"discount must lie in (0, 1], got {discount}")
        self.reward = reward
        self.discount = float(discount)
        self.num_channels = num_channels
        self.fractions = fractions
        self.budget = budget
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        # Statistics every selector keeps (CUCB needs them; for random selection
        # they are a record of how often each channel ran).
        self.counts = [torch.zeros(c, dtype=torch.float64) for c in num_channels]
        self.means = [torch.zeros(c, dtype=torch.float64) for c in num_channels]
        self.steps = 0  # completed select() calls
        self._pending: Optional[list[torch.Tensor]] = None

    # -- budgets ---------------------------------------------------------------

    def active_counts(self) -> list[int]:
        """Per-layer channel counts under ``budget='layer'``."""
        return [max(1, round(f * c)) for f, c in zip(self.fractions, self.num_channels)]

    def total_budget(self) -> int:
        total = sum(self.num_channels)
        return max(len(self.num_channels), round(self.fractions[0] * total))

    def flops_budget(self) -> float:
        """Under ``budget="flops"``: FLOPs per image of the uniformly narrow network."""
        return self.cost(self.active_counts())

    def _top(self, scores: list[torch.Tensor], layer_counts: Optional[list[int]] = None,
             total: Optional[int] = None, flops: Optional[float] = None) -> list[torch.Tensor]:
        """Highest-scoring channels within the budget (or within ``layer_counts`` /
        ``total`` channels, or ``flops``); random among equal scores."""
        if self.budget == "flops":
            return self._top_flops(scores, self.flops_budget() if flops is None else flops)
        if self.budget == "layer":
            counts = self.active_counts() if layer_counts is None else layer_counts
            return [_top_k(s, k, self.generator) for s, k in zip(scores, counts)]
        return self._top_global(scores, self.total_budget() if total is None else total)

    def _top_global(self, scores: list[torch.Tensor], total: int) -> list[torch.Tensor]:
        sizes = self.num_channels
        flat = torch.cat(scores)
        order = _rank(flat, self.generator)  # channel ids, best first
        layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        # Each layer's best channel is forced in; then the rest by global rank.
        rank_of = torch.empty_like(order)
        rank_of[order] = torch.arange(order.numel())
        forced = torch.zeros(flat.numel(), dtype=torch.bool)
        offsets = [0]
        for c in sizes:
            offsets.append(offsets[-1] + c)
        for layer in range(len(sizes)):
            lo, hi = offsets[layer], offsets[layer + 1]
            forced[lo + int(torch.argmin(rank_of[lo:hi]))] = True
        # Stable sort on "not forced" keeps the score order inside both groups.
        priority = (~forced[order]).to(torch.int8)
        chosen = order[torch.sort(priority, stable=True).indices[:total]]
        chosen_layer = layer_of[chosen]
        return [torch.sort(chosen[chosen_layer == layer] - offsets[layer]).values
                for layer in range(len(sizes))]

    def _uninformed_scores(self) -> list[torch.Tensor]:
        """Scores that say nothing (random choice): zeros, as the tie-breaking of the
        channel budgets is random already; under ``budget="flops"`` fresh uniform
        draws, since equal scores would make the greedy empty one layer after another
        (with them it drops at random, weighted by what a channel costs)."""
        if self.budget == "flops":
            return [torch.rand(c, generator=self.generator, dtype=torch.float64)
                    for c in self.num_channels]
        return [torch.zeros(c, dtype=torch.float64) for c in self.num_channels]

    def _top_flops(self, scores: list[torch.Tensor], target: float) -> list[torch.Tensor]:
        """Drops channels one at a time until the compact network costs at most
        ``target`` FLOPs: each time, of the worst channel of every layer, the one of
        lowest ``score / saving ** flops_weight``. Channels scored -inf go first,
        unconditionally; every layer keeps at least one channel."""
        worst_first = [_rank(s, self.generator).flip(0) for s in scores]
        dropped = [min(int(torch.isneginf(s).sum()), s.numel() - 1) for s in scores]
        counts = [c - d for c, d in zip(self.num_channels, dropped)]
        flops = self.cost(counts)
        while flops > target:
            saving = self.cost.saving(counts).tolist()
            choice, lowest = None, math.inf
            for g, order in enumerate(worst_first):
                if counts[g] <= 1 or saving[g] <= 0:
                    continue  # a layer keeps one channel; a free channel is never dropped
                value = float(scores[g][order[dropped[g]]]) / saving[g] ** self.flops_weight
                if choice is None or value < lowest:
                    choice, lowest = g, value
            if choice is None:
                break  # nothing left to drop: the budget is below one channel a layer
            flops -= saving[choice]
            dropped[choice] += 1
            counts[choice] -= 1
        return [torch.sort(order[d:]).values for order, d in zip(worst_first, dropped)]

    # -- the step protocol -----------------------------------------------------

    def select(self) -> list[torch.Tensor]:
        """Active channels for the next step: one sorted int64 tensor per layer."""
        selection = self._choose()
        self.steps += 1
        self._pending = selection
        return [s.clone() for s in selection]

    def update(self, saliencies: Sequence[torch.Tensor]) -> None:
        """Records the saliency each layer reported for the last selection."""
        if self._pending is None:
            raise RuntimeError("update() called without a preceding select()")
        checked = self._check_saliencies(saliencies)
        for active, s, counts, means in zip(self._pending, checked, self.counts, self.means):
            reward = self._reward(s, active)
            counts[active] += 1
            means[active] += (reward - means[active]) * self._step_size(counts[active])
        self._observe(checked)
        self._pending = None

    def _check_saliencies(self, saliencies: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(saliencies) != len(self.num_channels):
            raise ValueError(f"got saliency for {len(saliencies)} layers, expected "
                             f"{len(self.num_channels)}")
        checked = []
        for layer, (s, c) in enumerate(zip(saliencies, self.num_channels)):
            s = torch.as_tensor(s).detach().to("cpu", torch.float64)
            if s.shape != (c,):
                raise ValueError(f"saliency of layer {layer} has shape {tuple(s.shape)}, "
                                 f"expected ({c},)")
            if not torch.isfinite(s).all():
                raise ValueError(f"saliency of layer {layer} is not finite")
            checked.append(s)
        return checked

    def _reward(self, saliency: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return normalize_rewards(saliency, active, self.reward)

    def _step_size(self, counts: torch.Tensor) -> torch.Tensor:
        # 1/T, the incremental mean (exact, no history to store), until a discount
        # below 1 floors it: an exponential moving average.
        return torch.clamp(1.0 / counts, min=1.0 - self.discount)

    def _observe(self, saliencies: list[torch.Tensor]) -> None:
        """Hook for selectors that keep more than the per-channel reward means."""

    def best(self, fraction: Optional[_Fraction] = None) -> list[torch.Tensor]:
        """The channels to keep at the end (by default at the selector's fraction)."""
        raise NotImplementedError

    def _choose(self) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- state -----------------------------------------------------------------

    def _config(self) -> dict:
        config = {"kind": type(self).__name__, "num_channels": list(self.num_channels),
                  "fractions": list(self.fractions), "budget": self.budget}
        if self.cost is not None:
            config["cost"] = list(self.cost.fingerprint())
            config["flops_weight"] = self.flops_weight
        return config

    def state_dict(self) -> dict:
        return {
            "config": self._config(),
            "seed": self.seed,
            "steps": self.steps,
            "counts": [c.clone() for c in self.counts],
            "means": [m.clone() for m in self.means],
            "generator": self.generator.get_state(),
            "pending": None if self._pending is None else [p.clone() for p in self._pending],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self._config():
            raise ValueError(f"selector state was saved for {state['config']}, "
                             f"this selector is {self._config()}")
        self.seed = int(state["seed"])
        self.steps = int(state["steps"])
        self.counts = [c.clone().to(torch.float64) for c in state["counts"]]
        self.means = [m.clone().to(torch.float64) for m in state["means"]]
        self.generator.set_state(state["generator"])
        pending = state.get("pending")
        self._pending = None if pending is None else [p.clone() for p in pending]

    def _with_fraction(self, fraction: Optional[_Fraction]) -> "_Selector":
        """A budget-only view at another fraction, sharing this generator."""
        if fraction is None:
            return self
        view = _Selector(self.num_channels, fraction, self.budget, self.seed, cost=self.cost,
                         flops_weight=self.flops_weight)
        view.generator = self.generator
        return view


def normalize_rewards(saliency: torch.Tensor, active: torch.Tensor,
                      rule: str = "max") -> torch.Tensor:
    """Rewards in [0, 1] for the active channels of one layer at one step.

    Why normalize at all: raw Taylor saliency differs by orders of magnitude between
    layers and shrinks as the loss falls, so raw means would be dominated by early
    steps and by some layers; CUCB's confidence term assumes rewards in [0, 1].

    ``rule``:

    - ``"max"`` (the poster): divided by the largest active saliency of the layer at
      that step: "how close to the best channel of its layer right now".
    - ``"l2"``: divided by the L2 norm of the layer's active saliencies (Molchanov et
      al. 2017's per-layer normalization), so a channel's reward also says how
      concentrated its layer's saliency is.
    - ``"rank"``: the channel's rank among the layer's active channels, 0 for the
      lowest and 1 for the highest (equal saliencies share their mean rank): immune
      to the heavy tails of saliency, where one outlier step would dominate a mean.

    If all active channels report zero (e.g. a dead layer), all rewards are zero.
    """
    check_reward_rule(rule)
    values = saliency[active]
    if rule == "rank":
        n = values.numel()
        if n == 1:
            return torch.ones_like(values) if values[0] > 0 else torch.zeros_like(values)
        # Mean rank of ties: count of smaller values plus half the count of equal ones.
        smaller = (values.unsqueeze(0) < values.unsqueeze(1)).sum(1).to(values.dtype)
        equal = (values.unsqueeze(0) == values.unsqueeze(1)).sum(1).to(values.dtype) - 1
        return (smaller + 0.5 * equal) / (n - 1)
    scale = values.max() if rule == "max" else values.norm()
    if scale <= 0:
        return torch.zeros_like(values)
    return values / scale


REWARD_RULES = ("max", "l2", "rank")


def check_reward_rule(rule: str) -> None:
    if rule not in REWARD_RULES:
        raise ValueError(f"reward must be one of {', '.join(REWARD_RULES)}, got {rule!r}")


def _rank(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``scores``, highest first, equal scores in random order."""
    perm = torch.randperm(scores.numel(), generator=generator)
    # A stable sort of a random permutation orders ties randomly.
    order = torch.sort(scores[perm], descending=True, stable=True).indices
    return perm[order]


def _top_k(scores: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.sort(_rank(scores, generator)[:k]).values


class CUCBSelector(_Selector):
    """Combinatorial UCB channel selection (Algorithm 1 of the poster, Chen et al. 2013).

    For ``tau`` steps channels are drawn uniformly at random (at the budget).
    From then on, at step ``t`` (``t = tau + 1, tau + 2, ...``) each channel's
    bound is ``mean + c_t * sqrt(3 ln t / (2 T))`` with ``T`` the number of times it
    was active and ``mean`` its mean reward (see :func:`normalize_rewards`);
    channels never tried (``T = 0``) have an infinite bound. The top channels by
    bound within the budget are activated. Statistics are updated after every step,
    the random ones included. ``best()`` keeps the channels of highest mean reward.

    The defaults are the poster's algorithm. Options that change it:

    - ``reward``: the per-step normalization, ``"max"`` | ``"l2"`` | ``"rank"``.
    - ``discount`` in (0, 1]: each new reward enters a channel's mean with weight
      ``max(1/T, 1 - discount)``, an exponential moving average once ``T`` exceeds
      ``1 / (1 - discount)``. Saliency drifts while the weights train; a plain mean
      never forgets the early, random-weight steps. 1 is the plain mean.
    - ``horizon``: the number of steps the exploration will run. If set, the
      confidence term is scaled by ``c_t = max(0, 1 - t / horizon)``: the bandit
      explores early and converges to the channels of highest mean by the end, so
      the kept channels train together before fine-tuning starts.
    """

    def __init__(self, num_channels: Sequence[int], fraction: _Fraction = 0.5,
                 tau: int = DEFAULT_TAU, budget: str = "layer", seed: int = 0,
                 reward: str = "max", discount: float = 1.0,
                 horizon: Optional[int] = None, cost=None, flops_weight: float = 0.0) -> None:
        super().__init__(num_channels, fraction, budget, seed, reward, discount, cost,
                         flops_weight)
        if int(tau) != tau or tau < 0:
            raise ValueError(f"tau must be a non-negative integer, got {tau}")
        if horizon is not None and (int(horizon) != horizon or horizon < 1):
            raise ValueError(f"horizon must be a positive number of steps, got {horizon}")
        self.tau = int(tau)
        self.horizon = None if horizon is None else int(horizon)

    def confidence_scale(self, t: int) -> float:
        """``c_t``: 1 without a horizon, else falling linearly to 0 at the horizon."""
        return 1.0 if self.horizon is None else max(0.0, 1.0 - t / self.horizon)

    def ucb(self, t: int) -> list[torch.Tensor]:
        """The upper confidence bounds at bandit time ``t``."""
        scale = self.confidence_scale(t)
        bounds = []
        for counts, means in zip(self.counts, self.means):
            bonus = scale * torch.sqrt(3.0 * math.log(t) / (2.0 * counts.clamp(min=1)))
            # Never-tried channels come first (and 0/0 at t = 1 must not be NaN).
            bounds.append(torch.where(counts > 0, means + bonus, math.inf))
        return bounds

    def _choose(self) -> list[torch.Tensor]:
        if self.steps < self.tau:
            return self._top(self._uninformed_scores())
        # The poster sets t <- tau after warm-up and increments before each step.
        t = self.steps + 1
        return self._top(self.ucb(t))

    def best(self, fraction: Optional[_Fraction] = None) -> list[torch.Tensor]:
        return self._with_fraction(fraction)._top([m.clone() for m in self.means])

    def _config(self) -> dict:
        config = {**super()._config(), "tau": self.tau}
        # Only non-default options, so that checkpoints of the poster's algorithm
        # made before these options existed still load.
        if self.reward != "max":
            config["reward"] = self.reward
        if self.discount != 1.0:
            config["discount"] = self.discount
        if self.horizon is not None:
            config["horizon"] = self.horizon
        return config


class RandomSelector(_Selector):
    """Uniformly random channels at every step and at the end: the paper's baseline.

    Keeps the same statistics as :class:`CUCBSelector` (for the record) but
    never uses them.
    """

    def _choose(self) -> list[torch.Tensor]:
        return self._top(self._uninformed_scores())

    def best(self, fraction: Optional[_Fraction] = None) -> list[torch.Tensor]:
        view = self._with_fraction(fraction)
        return view._top(view._uninformed_scores())


class TaylorPruneSelector(_Selector):
    """Post-training pruning by Taylor saliency (Molchanov et al. 2017), as a selector.

    Every step activates all channels (the network trains dense). Saliency is summed
    per channel over the steps after the first ``accumulate_from`` (the trainer
    passes the steps before the last epoch of training); ``best()`` divides each
    layer's sums by their L2 norm (the paper's per-layer normalization, which makes
    layers comparable under a global budget) and keeps the highest within the budget.
    """

    def __init__(self, num_channels: Sequence[int], fraction: _Fraction = 0.5,
                 budget: str = "layer", seed: int = 0, accumulate_from: int = 0,
                 cost=None, flops_weight: float = 0.0) -> None:
        super().__init__(num_channels, fraction, budget, seed, cost=cost,
                         flops_weight=flops_weight)
        if int(accumulate_from) != accumulate_from or accumulate_from < 0:
            raise ValueError(f"accumulate_from must be a non-negative number of steps, "
                             f"got {accumulate_from}")
        self.accumulate_from = int(accumulate_from)
        self.sums = [torch.zeros(c, dtype=torch.float64) for c in self.num_channels]

    def _choose(self) -> list[torch.Tensor]:
        return [torch.arange(c) for c in self.num_channels]

    def _observe(self, saliencies: list[torch.Tensor]) -> None:
        # self.steps already counts the select() of this step.
        if self.steps > self.accumulate_from:
            for total, s in zip(self.sums, saliencies):
                total += s

    def scores(self) -> list[torch.Tensor]:
        """Accumulated saliency, L2-normalized per layer."""
        return [s / s.norm() if s.norm() > 0 else s.clone() for s in self.sums]

    def best(self, fraction: Optional[_Fraction] = None) -> list[torch.Tensor]:
        return self._with_fraction(fraction)._top(self.scores())

    def _config(self) -> dict:
        return {**super()._config(), "accumulate_from": self.accumulate_from}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sums": [s.clone() for s in self.sums]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sums = [s.clone().to(torch.float64) for s in state["sums"]]


class ShrinkSelector(_Selector):
    """DCE without per-step rotation: every channel starts active, and the active set
    shrinks to the budget over ``horizon`` steps, dropping the channels of lowest mean
    reward; a dropped channel never returns.

    Why: changing the active channels at every step, as the poster's CUCB does early
    on, trains a different random sub-network each step, and a deep plain network
    barely learns that way (measured on VGG-11: no loss decrease at all at 25% or 50%
    random channels per step). Shrinking keeps the set stable, so the network trains
    at every step while the saliency of every active channel is observed (full
    feedback: no confidence term is needed).

    The active fraction follows Zhu & Gupta (2017)'s cubic schedule,
    ``f_t = p + (1 - p) (1 - t / horizon)^3``: it falls fast while the network is
    young and cheap to disturb, then slowly. Per-layer counts are
    ``max(budget count, round(f_t C))``; under a global budget the total is
    ``max(budget total, round(f_t sum C))`` shared by rank. Rewards as
    :func:`normalize_rewards` (``reward``); ``discount`` as in :class:`CUCBSelector`.
    ``best()`` is the final set (before the horizon: the best survivors at the budget).

    ``order="random"`` drops channels in random order instead (the same schedule and
    cost, no saliency): the control that says what the saliency ranking is worth.
    """

    def __init__(self, num_channels: Sequence[int], fraction: _Fraction = 0.5,
                 horizon: int = 1, budget: str = "layer", seed: int = 0,
                 reward: str = "l2", discount: float = 1.0, order: str = "saliency",
                 cost=None, flops_weight: float = 0.0) -> None:
        super().__init__(num_channels, fraction, budget, seed, reward, discount, cost,
                         flops_weight)
        if order not in ("saliency", "random"):
            raise ValueError(f"order must be 'saliency' or 'random', got {order!r}")
        self.order = order
        if int(horizon) != horizon or horizon < 1:
            raise ValueError(f"horizon must be a positive number of steps, got {horizon}")
        self.horizon = int(horizon)
        self.alive = [torch.ones(c, dtype=torch.bool) for c in self.num_channels]

    def active_fraction(self, t: int, fraction: Optional[float] = None) -> float:
        """``f_t`` of ``fraction`` (default: the budget's, the first layer's under a list)."""
        p = self.fractions[0] if fraction is None else fraction
        return p + (1.0 - p) * (1.0 - min(1.0, t / self.horizon)) ** 3

    def counts_at(self, t: int) -> tuple[list[int], int]:
        """Per-layer counts (layer budget) and the total (global budget) at step ``t``."""
        layer = [max(k, round(self.active_fraction(t, f) * c))
                 for k, f, c in zip(self.active_counts(), self.fractions, self.num_channels)]
        total = max(self.total_budget(), round(self.active_fraction(t) * sum(self.num_channels)))
        return layer, total

    def flops_at(self, t: int) -> float:
        """Under ``budget="flops"``: the FLOPs target at step ``t``, the same cubic
        from the full network's FLOPs down to the budget's."""
        full, budget = self.cost.full, self.flops_budget()
        return budget + (full - budget) * (1.0 - min(1.0, t / self.horizon)) ** 3

    def _alive_scores(self) -> list[torch.Tensor]:
        scores = self.means if self.order == "saliency" else self._uninformed_scores()
        return [torch.where(a, m, -math.inf) for a, m in zip(self.alive, scores)]

    def _choose(self) -> list[torch.Tensor]:
        if self.budget == "flops":
            selection = self._top(self._alive_scores(), flops=self.flops_at(self.steps))
        else:
            layer, total = self.counts_at(self.steps)
            selection = self._top(self._alive_scores(), layer, total)
        for a, chosen in zip(self.alive, selection):
            a.zero_()
            a[chosen] = True
        return selection

    def best(self, fraction: Optional[_Fraction] = None) -> list[torch.Tensor]:
        return self._with_fraction(fraction)._top(self._alive_scores())

    def _config(self) -> dict:
        return {**super()._config(), "horizon": self.horizon, "reward": self.reward,
                "discount": self.discount, "order": self.order}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "alive": [a.clone() for a in self.alive]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.alive = [a.clone() for a in state["alive"]]
