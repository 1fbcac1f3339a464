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
channel would cut the network), the rest by global rank.

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

__all__ = ["CUCBSelector", "RandomSelector", "BUDGETS", "DEFAULT_TAU"]

# How a fraction becomes channel counts (see the module docstring).
BUDGETS = ("layer", "global")
# Random warm-up steps of CUCB before the bandit takes over (the poster's tau).
DEFAULT_TAU = 100

_Fraction = Union[float, Sequence[float]]


class _Selector:
    """Budget bookkeeping, tie-breaking and state shared by all selectors."""

    def __init__(self, num_channels: Sequence[int], fraction: _Fraction = 0.5,
                 budget: str = "layer", seed: int = 0) -> None:
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
            if budget == "global":
                raise ValueError("budget='global' takes one fraction, not a list")
            fractions = [float(f) for f in fraction]
            if len(fractions) != len(num_channels):
                raise ValueError(f"got {len(fractions)} fractions for {len(num_channels)} layers")
        if any(not (0.0 < f <= 1.0) for f in fractions):
            raise ValueError(f"fractions must lie in (0, 1], got {fractions}")
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

    def _top(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Highest-scoring channels within the budget; random among equal scores."""
        if self.budget == "layer":
            return [_top_k(s, k, self.generator) for s, k in zip(scores, self.active_counts())]
        return self._top_global(scores)

    def _top_global(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
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
        chosen = order[torch.sort(priority, stable=True).indices[: self.total_budget()]]
        chosen_layer = layer_of[chosen]
        return [torch.sort(chosen[chosen_layer == layer] - offsets[layer]).values
                for layer in range(len(sizes))]

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
        if len(saliencies) != len(self.num_channels):
            raise ValueError(f"got saliency for {len(saliencies)} layers, expected "
                             f"{len(self.num_channels)}")
        rewards = []
        for layer, (s, c) in enumerate(zip(saliencies, self.num_channels)):
            s = torch.as_tensor(s).detach().to("cpu", torch.float64)
            if s.shape != (c,):
                raise ValueError(f"saliency of layer {layer} has shape {tuple(s.shape)}, "
                                 f"expected ({c},)")
            if not torch.isfinite(s).all():
                raise ValueError(f"saliency of layer {layer} is not finite")
            rewards.append(normalize_rewards(s, self._pending[layer]))
        for active, reward, counts, means in zip(self._pending, rewards, self.counts, self.means):
            counts[active] += 1
            # Incremental mean: exact, and no history to store.
            means[active] += (reward - means[active]) / counts[active]
        self._pending = None

    def best(self, fraction: Optional[_Fraction] = None) -> list[torch.Tensor]:
        """The channels to keep at the end (by default at the selector's fraction)."""
        raise NotImplementedError

    def _choose(self) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- state -----------------------------------------------------------------

    def _config(self) -> dict:
        return {"kind": type(self).__name__, "num_channels": list(self.num_channels),
                "fractions": list(self.fractions), "budget": self.budget}

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
        view = _Selector(self.num_channels, fraction, self.budget, self.seed)
        view.generator = self.generator
        return view


def normalize_rewards(saliency: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Rewards in [0, 1] for the active channels of one layer at one step.

    Saliency is divided by the largest saliency among the layer's active
    channels at that step. Why this normalization: raw Taylor saliency differs
    by orders of magnitude between layers and shrinks as the loss falls, so raw
    means would be dominated by early steps and by some layers; CUCB's
    confidence term assumes rewards bounded in [0, 1]. Dividing by the per-step
    layer maximum makes a reward scale- and drift-free ("how close to the best
    channel of its layer right now"), bounded, and independent of how many
    channels are active (unlike dividing by the layer's L2 norm or sum). If all
    active channels report zero (e.g. a dead layer), all rewards are zero.
    """
    values = saliency[active]
    peak = values.max()
    if peak <= 0:
        return torch.zeros_like(values)
    return values / peak


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
    bound is ``mean + sqrt(3 ln t / (2 T))`` with ``T`` the number of times it
    was active and ``mean`` its mean normalized reward (see
    :func:`normalize_rewards`); channels never tried (``T = 0``) have an infinite
    bound. The top channels by bound within the budget are activated. Statistics
    are updated after every step, the random ones included.

    ``best()`` keeps the channels of highest mean reward.
    """

    def __init__(self, num_channels: Sequence[int], fraction: _Fraction = 0.5,
                 tau: int = DEFAULT_TAU,
                 budget: str = "layer", seed: int = 0) -> None:
        super().__init__(num_channels, fraction, budget, seed)
        if int(tau) != tau or tau < 0:
            raise ValueError(f"tau must be a non-negative integer, got {tau}")
        self.tau = int(tau)

    def ucb(self, t: int) -> list[torch.Tensor]:
        """The upper confidence bounds at bandit time ``t``."""
        bounds = []
        for counts, means in zip(self.counts, self.means):
            bonus = torch.sqrt(3.0 * math.log(t) / (2.0 * counts.clamp(min=1)))
            # Never-tried channels come first (and 0/0 at t = 1 must not be NaN).
            bounds.append(torch.where(counts > 0, means + bonus, math.inf))
        return bounds

    def _choose(self) -> list[torch.Tensor]:
        if self.steps < self.tau:
            return self._top([torch.zeros(c, dtype=torch.float64) for c in self.num_channels])
        # The poster sets t <- tau after warm-up and increments before each step.
        t = self.steps + 1
        return self._top(self.ucb(t))

    def best(self, fraction: Optional[_Fraction] = None) -> list[torch.Tensor]:
        return self._with_fraction(fraction)._top([m.clone() for m in self.means])

    def _config(self) -> dict:
        return {**super()._config(), "tau": self.tau}


class RandomSelector(_Selector):
    """Uniformly random channels at every step and at the end: the paper's baseline.

    Keeps the same statistics as :class:`CUCBSelector` (for the record) but
    never uses them.
    """

    def _choose(self) -> list[torch.Tensor]:
        return self._top([torch.zeros(c, dtype=torch.float64) for c in self.num_channels])

    def best(self, fraction: Optional[_Fraction] = None) -> list[torch.Tensor]:
        return self._with_fraction(fraction)._top(
            [torch.zeros(c, dtype=torch.float64) for c in self.num_channels])
