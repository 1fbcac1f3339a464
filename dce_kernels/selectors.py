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

Blocks. ``blocks[l] = b`` splits layer ``l``'s channels into ``b`` equal runs and
every selection activates equally many channels in each run (a grouped conv reads
or writes them: its compact form is again a grouped conv, which needs that). Its
counts are multiples of ``b`` (at least ``b``): under ``budget="layer"`` the nearest
one, ``b * max(1, round(fraction * C / b))``; under the global and FLOPs budgets the
counts the budget gives, each rounded to the nearest multiple, so the total may miss
the budget by up to ``b / 2`` channels a blocked layer. Each run then takes its top
channels by score, as a layer would.

Ties are broken uniformly at random by the selector's own seeded generator: in
CUCB every never-tried channel has an infinite bound, and breaking those ties by
index would always explore the low-numbered channels first. The generator's
state is part of ``state_dict()``, so a resumed run selects exactly what the
uninterrupted run would have.

Where the state lives. All per-channel state (counts, means, and each selector's own)
is one flat tensor over the channels of all layers end to end, on the selector's
``device`` (``to(device)``; :class:`~dce_kernels.DynamicChannels` puts it on the
model's), and every step is a fixed number of tensor ops over it, whatever the number
of layers: the layers' top ``k`` are two row-wise top-k's over the scores padded to
``[layers, widest]`` (the cut, then uniform draws among the channels tied at it), a
global ranking one random permutation and one integer sort, a reward normalization a
segment reduction. Nothing is read back to the host on the way, with these exceptions,
each stated where it happens:

- ``budget="global"``: how the total splits between layers decides the shapes of the
  index tensors ``select()`` returns, so it reads the ``L`` counts to the host, once per
  selection that changes (every step for CUCB and random, only where the schedule moves
  the total for :class:`ShrinkSelector`);
- ``budget="flops"``: the greedy runs on the host (one read of the scores per such
  selection);
- a non-finite saliency cannot raise in ``update()`` without a read: ``update()`` leaves
  that step out of the statistics and records it on the device, and
  :meth:`~_Selector.check_saliency` (called by ``best()`` and ``state_dict()``, and by
  the trainer every few steps) raises, naming the step and the layers;
- ``state_dict()`` copies the state to the host.

The random draws depend on the device's generator: a run on the GPU selects other
channels than the same run on the CPU (each exactly reproducible, resumes included).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = ["CUCBSelector", "RandomSelector", "ShrinkSelector", "TaylorPruneSelector", "BUDGETS",
           "DEFAULT_TAU",
           "REWARD_RULES", "normalize_rewards", "NonFiniteSaliencyError"]

# How a fraction becomes channel counts (see the module docstring).
BUDGETS = ("layer", "global", "flops")
# Random warm-up steps of CUCB before the bandit takes over (the poster's tau).
DEFAULT_TAU = 100
# The layout of state_dict(): 2 is the flat one. Format 1 (per-layer lists, written before
# the selectors were vectorized) drew its random numbers per layer, so it cannot continue
# a run exactly here and is refused.
STATE_FORMAT = 2

_Fraction = Union[float, Sequence[float]]
_LOW_63_BITS = 0x7FFFFFFFFFFFFFFF


def _order_key(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort as the float64 ``scores`` do (-0.0 and 0.0 equal, the
    infinities at the ends; no NaN): integer sorts are radix sorts, several times
    faster than float sorts on the CPU."""
    bits = (scores.to(torch.float64) + 0.0).view(torch.int64)  # + 0.0 turns -0.0 into 0.0
    return torch.where(bits < 0, bits ^ _LOW_63_BITS, bits)


class NonFiniteSaliencyError(ValueError):
    """A saliency passed to ``update()`` was not finite: ``step`` (the selector's, from
    1) of the first such update and ``layers``, ``[(layer, entries not finite), ...]``."""

    def __init__(self, message: str, step: int, layers: list[tuple[int, int]]) -> None:
        super().__init__(message)
        self.step, self.layers = step, layers


class _Segments:
    """The channels of all layers end to end: layer ``l`` owns the flat positions
    ``[offsets[l], offsets[l] + sizes[l])``. Host lists for the shapes, device
    tensors for the ops."""

    def __init__(self, sizes: Sequence[int], device: torch.device) -> None:
        self.sizes = list(sizes)
        self.offsets = [0]
        for c in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + c)
        self.total = sum(self.sizes)
        self.layers = len(self.sizes)
        self.device = device
        self.layer_of = torch.repeat_interleave(
            torch.arange(self.layers, device=device), torch.tensor(self.sizes, device=device),
            output_size=self.total)
        self.start_of = torch.tensor(self.offsets, device=device)[self.layer_of]
        self.ids = torch.arange(self.total, device=device)
        # The padded layout [layers, widest]: flat position -> padded position.
        self.widest = max(self.sizes)
        self.padded = self.layer_of * self.widest + (self.ids - self.start_of)
        self._counts_for: Optional[tuple[tuple[int, ...], torch.Tensor]] = None

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(flat.split(self.sizes))

    def cat(self, parts: Sequence, dtype: torch.dtype, what: str) -> torch.Tensor:
        """One flat tensor of per-layer ``parts`` (checked against the layers' sizes)."""
        if len(parts) != self.layers:
            raise ValueError(f"got {what} for {len(parts)} layers, expected {self.layers}")
        tensors = [torch.as_tensor(p).detach() for p in parts]
        for layer, (t, c) in enumerate(zip(tensors, self.sizes)):
            if t.shape != (c,):
                raise ValueError(f"{what} of layer {layer} has shape {tuple(t.shape)}, "
                                 f"expected ({c},)")
        if len({t.device for t in tensors}) > 1:
            tensors = [t.to(self.device) for t in tensors]
        return torch.cat(tensors).to(self.device, dtype)  # one copy, one conversion

    def reduce(self, values: torch.Tensor, how: str, initial: float) -> torch.Tensor:
        """Per-layer ``how`` ("amax", "amin", ...) of flat ``values``: ``[L]``."""
        out = torch.full((self.layers,), initial, dtype=values.dtype, device=self.device)
        return out.scatter_reduce_(0, self.layer_of, values, how)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.layers, dtype=values.dtype, device=self.device)
        return out.index_add_(0, self.layer_of, values)

    def counts_tensor(self, counts: Sequence[int]) -> torch.Tensor:
        """``counts`` as a ``[L, 1]`` device tensor (kept while the counts stay)."""
        key = tuple(counts)
        if self._counts_for is None or self._counts_for[0] != key:
            host = torch.tensor(key).unsqueeze(1)
            if self.device.type == "cuda":  # a pageable copy would wait for the device
                host = host.pin_memory()
            self._counts_for = (key, host.to(self.device, non_blocking=True))
        return self._counts_for[1]

    def pad(self, values: torch.Tensor, fill) -> torch.Tensor:
        """Flat ``values`` as ``[layers, widest]``, ``fill`` after each layer's end."""
        out = torch.full((self.layers * self.widest,), fill, dtype=values.dtype,
                         device=self.device)
        return out.scatter_(0, self.padded, values).view(self.layers, self.widest)

    def mask(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.total, dtype=torch.bool, device=self.device).index_fill_(
            0, ids, True)

    def ids_of(self, mask: torch.Tensor, count: int) -> torch.Tensor:
        """The flat positions where ``mask`` is True, ascending; ``count`` of them (known
        on the host: unlike ``nonzero()``, this needs no read of the device)."""
        if self.device.type == "cpu":
            return torch.nonzero_static(mask, size=count).squeeze(1)  # one op on the CPU
        slot = torch.where(mask, torch.cumsum(mask, 0) - 1, count)
        out = torch.empty(count + 1, dtype=torch.long, device=self.device)
        # Every position outside the mask writes the spare last slot, which is dropped.
        return out.index_put_((slot,), self.ids)[:count]

    def local(self, ids: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
        """Ascending flat ``ids`` as one index tensor per layer (``counts[l]`` each)."""
        return list((ids - self.start_of[ids]).split(list(counts)))


class _Choice:
    """A selection as the selector keeps it: flat ascending ids and the per-layer counts."""

    __slots__ = ("ids", "counts")

    def __init__(self, ids: torch.Tensor, counts: Sequence[int]) -> None:
        self.ids, self.counts = ids, [int(k) for k in counts]


class _Selector:
    """Budget bookkeeping, tie-breaking, reward statistics and state shared by all
    selectors. ``reward`` and ``discount`` shape the per-channel means (see
    :class:`CUCBSelector`); the selectors that rank by them expose both.
    ``device``: where the state lives and the work runs (see the module docstring)."""

    def __init__(self, num_channels: Sequence[int], fraction: _Fraction = 0.5,
                 budget: str = "layer", seed: int = 0, reward: str = "max",
                 discount: float = 1.0, cost=None, flops_weight: float = 0.0,
                 device: Union[str, torch.device] = "cpu",
                 blocks: Optional[Sequence[int]] = None) -> None:
        num_channels = [int(c) for c in num_channels]
        if not num_channels:
            raise ValueError("a selector needs at least one layer")
        if any(c < 1 for c in num_channels):
            raise ValueError(f"every layer needs at least one channel, got {num_channels}")
        blocks = [1] * len(num_channels) if blocks is None else list(blocks)
        if len(blocks) != len(num_channels) or any(
                int(b) != b or b < 1 or c % int(b) for b, c in zip(blocks, num_channels)):
            raise ValueError(f"blocks must give each layer a number of equal runs that "
                             f"divides its channels, got {blocks} for {num_channels}")
        self.blocks = [int(b) for b in blocks]
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
        self.device = torch.device(device)
        self.segments = _Segments(num_channels, self.device)
        self.rows = self._row_segments()
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        # Statistics every selector keeps (CUCB needs them; for random selection
        # they are a record of how often each channel ran).
        self._counts = self._zeros()
        self._means = self._zeros()
        self.steps = 0  # completed select() calls
        self._pending: Optional[_Choice] = None
        # The first update() whose saliency was not finite (0: none yet), and how many
        # entries of each layer were not finite then (see check_saliency).
        self._bad_step = torch.zeros((), dtype=torch.long, device=self.device)
        self._bad_counts = torch.zeros(len(num_channels), dtype=torch.long, device=self.device)

    def _row_segments(self) -> _Segments:
        """The flat channels cut into the blocks' runs (each run a row of the per-row
        top-k); without blocks, the layers themselves."""
        if all(b == 1 for b in self.blocks):
            return self.segments
        return _Segments([c // b for c, b in zip(self.num_channels, self.blocks)
                          for _ in range(b)], self.device)

    def _block_counts(self, counts: Sequence[int]) -> list[int]:
        """``counts`` rounded to the nearest multiple of each layer's blocks (at least
        one channel a run, at most all): the identity without blocks."""
        return [b * min(c // b, max(1, round(k / b)))
                for k, b, c in zip(counts, self.blocks, self.num_channels)]

    def _zeros(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.zeros(self.segments.total, dtype=dtype, device=self.device)

    # -- per-layer views of the flat state ---------------------------------------

    @property
    def counts(self) -> list[torch.Tensor]:
        """How often each channel was active, one ``[C]`` view per layer."""
        return self.segments.split(self._counts)

    @counts.setter
    def counts(self, per_layer: Sequence) -> None:
        self._counts = self.segments.cat(per_layer, torch.float64, "counts")

    @property
    def means(self) -> list[torch.Tensor]:
        """Each channel's mean reward, one ``[C]`` view per layer."""
        return self.segments.split(self._means)

    @means.setter
    def means(self, per_layer: Sequence) -> None:
        self._means = self.segments.cat(per_layer, torch.float64, "means")

    def to(self, device: Union[str, torch.device]) -> "_Selector":
        """Moves the state (and the work) to ``device``; returns the selector. A
        generator of another kind of device draws other numbers, so changing the kind
        (CPU <-> CUDA) is allowed only before the first ``select()``: the generator then
        restarts from the seed."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        if device.type != self.device.type and self.steps > 0:
            raise RuntimeError(f"the selector has drawn from its {self.device.type} generator "
                               f"for {self.steps} step(s); moving it to {device.type} would "
                               "change the draws of the rest of the run. Move it before the "
                               "first select()")
        generator = torch.Generator(device=device)
        if device.type == self.device.type:
            generator.set_state(self.generator.get_state())
        else:
            generator.manual_seed(self.seed)
        self.generator = generator
        self.device = device
        self.segments = _Segments(self.num_channels, device)
        self.rows = self._row_segments()
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        if self._pending is not None:
            self._pending = _Choice(self._pending.ids.to(device), self._pending.counts)
        return self

    # -- budgets ---------------------------------------------------------------

    def active_counts(self) -> list[int]:
        """Per-layer channel counts under ``budget='layer'``."""
        return self._block_counts([max(1, round(f * c))
                                   for f, c in zip(self.fractions, self.num_channels)])

    def total_budget(self) -> int:
        total = sum(self.num_channels)
        return max(len(self.num_channels), round(self.fractions[0] * total))

    def flops_budget(self) -> float:
        """Under ``budget="flops"``: FLOPs per image of the uniformly narrow network."""
        return self.cost(self.active_counts())

    def _rank(self, scores: torch.Tensor) -> torch.Tensor:
        """Flat positions of ``scores`` (flat), highest first, equal scores in random order."""
        perm = torch.randperm(self.segments.total, generator=self.generator, device=self.device)
        # A stable sort of a random permutation orders ties randomly.
        order = torch.sort(_order_key(scores)[perm], descending=True, stable=True).indices
        return perm[order]

    def _rank_by_layer(self, scores: torch.Tensor) -> torch.Tensor:
        """Each layer's positions, highest score first, the layers one after another."""
        ranked = self._rank(scores)
        return ranked[torch.sort(self.segments.layer_of[ranked], stable=True).indices]

    def _top(self, scores: torch.Tensor, layer_counts: Optional[list[int]] = None,
             total: Optional[int] = None, flops: Optional[float] = None) -> _Choice:
        """Highest-scoring channels (``scores``: flat) within the budget (or within
        ``layer_counts`` / ``total`` channels, or ``flops``); random among equal scores."""
        if self.budget == "layer":
            return self._top_layers(scores, self.active_counts() if layer_counts is None
                                    else layer_counts)
        if self.budget == "flops":
            choice = self._top_flops(scores, self.flops_budget() if flops is None else flops)
        else:
            choice = self._top_global(scores, self.total_budget() if total is None else total)
        if self.rows is self.segments:
            return choice
        # The budget decided the counts; the blocks' runs share each equally.
        return self._top_layers(scores, choice.counts)

    def _top_layers(self, scores: torch.Tensor, counts: list[int]) -> _Choice:
        """The top ``counts[l]`` of each layer by two per-row top-k's (several times
        cheaper than sorting): every channel above the layer's ``k``-th score is in; of
        those equal to it, as many as are missing, the highest of uniform draws. With
        blocks, the rows are the blocks' runs, each with its share of the count."""
        counts = self._block_counts(counts)
        seg = self.rows
        row_counts = [k // b for k, b in zip(counts, self.blocks) for _ in range(b)]
        k = seg.counts_tensor(row_counts)
        widest_k = max(row_counts)
        # Order keys, and below every real key (-inf's included) the padding.
        key = seg.pad(_order_key(scores), torch.iinfo(torch.int64).min)
        kth = key.topk(widest_k, dim=1).values.gather(1, k - 1)
        above, tied = key > kth, key == kth
        missing = k - above.sum(1, keepdim=True)  # >= 1: the k-th itself is tied
        draws = torch.rand(key.shape, generator=self.generator, dtype=torch.float64,
                           device=self.device)
        draws = torch.where(tied, draws, -1.0)
        cut = draws.topk(widest_k, dim=1).values.gather(1, missing - 1)
        chosen = (above | (tied & (draws >= cut))).view(-1)[seg.padded]
        return _Choice(seg.ids_of(chosen, sum(counts)), counts)

    def _top_global(self, scores: torch.Tensor, total: int) -> _Choice:
        seg = self.segments
        order = self._rank(scores)  # channel ids, best first
        rank_of = torch.empty_like(order).index_put_((order,), seg.ids)
        # Each layer's best channel is forced in; then the rest by global rank.
        forced = (rank_of == seg.reduce(rank_of, "amin", seg.total)[seg.layer_of])[order]
        rest = ~forced & (torch.cumsum(~forced, 0) <= total - seg.layers)
        mask = torch.zeros_like(forced).index_put_((order,), forced | rest)
        # The one read: how the total splits between layers fixes the shapes returned.
        counts = seg.sum(mask.long()).tolist()
        return _Choice(seg.ids_of(mask, total), counts)

    def _uninformed_scores(self) -> torch.Tensor:
        """Scores that say nothing (random choice): zeros, as the tie-breaking of the
        channel budgets is random already; under ``budget="flops"`` fresh uniform
        draws, since equal scores would make the greedy empty one layer after another
        (with them it drops at random, weighted by what a channel costs)."""
        if self.budget == "flops":
            return torch.rand(self.segments.total, generator=self.generator,
                              dtype=torch.float64, device=self.device)
        return self._zeros()

    def _top_flops(self, scores: torch.Tensor, target: float) -> _Choice:
        """Drops channels one at a time until the compact network costs at most
        ``target`` FLOPs: each time, of the worst channel of every layer, the one of
        lowest ``score / saving ** flops_weight``. Channels scored -inf go first,
        unconditionally; every layer keeps at least one channel.

        The greedy is sequential (each drop changes what the next one saves), so it
        runs on the host: one read of the ranking and the scores."""
        seg = self.segments
        by_layer = (self._rank_by_layer(scores) - seg.start_of).cpu().split(seg.sizes)
        host_scores = scores.cpu().split(seg.sizes)
        worst_first = [order.flip(0) for order in by_layer]
        dropped = [min(int(torch.isneginf(s).sum()), s.numel() - 1) for s in host_scores]
        counts = [c - d for c, d in zip(self.num_channels, dropped)]
        flops = self.cost(counts)
        while flops > target:
            saving = self.cost.saving(counts).tolist()
            choice, lowest = None, math.inf
            for g, order in enumerate(worst_first):
                if counts[g] <= 1 or saving[g] <= 0:
                    continue  # a layer keeps one channel; a free channel is never dropped
                value = float(host_scores[g][order[dropped[g]]]) / saving[g] ** self.flops_weight
                if choice is None or value < lowest:
                    choice, lowest = g, value
            if choice is None:
                break  # nothing left to drop: the budget is below one channel a layer
            flops -= saving[choice]
            dropped[choice] += 1
            counts[choice] -= 1
        kept = torch.cat([torch.sort(order[d:]).values + off
                          for order, d, off in zip(worst_first, dropped, seg.offsets)])
        return _Choice(kept.to(self.device), counts)

    # -- the step protocol -----------------------------------------------------

    def select(self) -> list[torch.Tensor]:
        """Active channels for the next step: one sorted int64 tensor per layer, on the
        selector's device."""
        choice = self._choose()
        self.steps += 1
        self._pending = choice
        return self.segments.local(choice.ids, choice.counts)

    def update(self, saliencies: Sequence[torch.Tensor]) -> None:
        """Records the saliency each layer reported for the last selection. A step whose
        saliency is not finite anywhere is left out and recorded (see
        :meth:`check_saliency`)."""
        if self._pending is None:
            raise RuntimeError("update() called without a preceding select()")
        saliency = self.segments.cat(saliencies, torch.float64, "saliency")
        finite = torch.isfinite(saliency)
        ok = finite.all()
        self._record_nonfinite(finite, ok)
        active = self.segments.mask(self._pending.ids)
        reward = self._rewards(saliency, active)
        counts = self._counts + active
        step = self._step_size(counts)
        means = torch.where(active, self._means + (reward - self._means) * step, self._means)
        self._counts = torch.where(ok, counts, self._counts)
        self._means = torch.where(ok, means, self._means)
        self._observe(saliency, ok)
        self._pending = None

    def _record_nonfinite(self, finite: torch.Tensor, ok: torch.Tensor) -> None:
        first = (self._bad_step == 0) & ~ok
        self._bad_step = torch.where(first, self.steps, self._bad_step)
        self._bad_counts = torch.where(first, self.segments.sum((~finite).long()),
                                       self._bad_counts)

    def nonfinite_saliency(self) -> Optional[tuple[int, list[tuple[int, int]]]]:
        """``(step, [(layer, entries), ...])`` of the first ``update()`` whose saliency
        was not finite (``step`` counts ``select()`` calls from 1), or None. One read of
        the device."""
        step = int(self._bad_step)
        if step == 0:
            return None
        return step, [(layer, k) for layer, k in enumerate(self._bad_counts.tolist()) if k]

    def check_saliency(self) -> None:
        """Raises :class:`NonFiniteSaliencyError` (a ValueError) if a saliency passed
        to ``update()`` was not finite: the
        statistics left that step out, but a run that produces such saliency has
        diverged."""
        bad = self.nonfinite_saliency()
        if bad is not None:
            step, layers = bad
            where = ", ".join(f"layer {layer} ({k} of {self.num_channels[layer]} channels)"
                              for layer, k in layers)
            raise NonFiniteSaliencyError(f"the saliency passed to update() at step {step} is "
                                         f"not finite in {where}; the selector left that step "
                                         "out", step, layers)

    def _rewards(self, saliency: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """:func:`normalize_rewards` of every layer at once (flat; meaningful where
        ``active``)."""
        seg = self.segments
        if self.reward == "rank":
            return self._rank_rewards(saliency, active)
        if self.reward == "max":
            scale = seg.reduce(torch.where(active, saliency, -math.inf), "amax", -math.inf)
        else:
            scale = seg.sum(torch.where(active, saliency * saliency, 0.0)).sqrt()
        scale = scale[seg.layer_of]
        return torch.where(scale > 0, saliency / scale, 0.0)

    def _rank_rewards(self, saliency: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        seg = self.segments
        # Active values ascending within each layer (inactive ones after them).
        key = _order_key(torch.where(active, saliency, math.inf))
        by_value = torch.sort(key, stable=True).indices
        order = by_value[torch.sort(seg.layer_of[by_value], stable=True).indices]
        k, layer = key[order], seg.layer_of[order]
        first = torch.ones_like(active)
        first[1:] = (k[1:] != k[:-1]) | (layer[1:] != layer[:-1])
        last = torch.ones_like(active)
        last[:-1] = first[1:]
        run_start = torch.where(first, seg.ids, 0).cummax(0).values
        run_end = torch.where(last, seg.ids, seg.total).flip(0).cummin(0).values.flip(0)
        # Mean rank of ties: count of smaller values plus half the count of equal ones.
        smaller = (run_start - seg.start_of[order]).to(torch.float64)
        equal = (run_end - run_start).to(torch.float64)
        n = seg.sum(active.to(torch.float64))[layer]
        ranks = torch.where(n > 1, (smaller + 0.5 * equal) / (n - 1),
                            (saliency[order] > 0).to(torch.float64))
        return torch.empty_like(saliency).index_put_((order,), ranks)

    def _step_size(self, counts: torch.Tensor) -> torch.Tensor:
        # 1/T, the incremental mean (exact, no history to store), until a discount
        # below 1 floors it: an exponential moving average.
        return torch.clamp(1.0 / counts, min=1.0 - self.discount)

    def _observe(self, saliency: torch.Tensor, ok: torch.Tensor) -> None:
        """Hook for selectors that keep more than the per-channel reward means
        (``saliency``: flat; ``ok``: whether it is finite)."""

    def best(self, fraction: Optional[_Fraction] = None) -> list[torch.Tensor]:
        """The channels to keep at the end (by default at the selector's fraction)."""
        self.check_saliency()
        choice = self._best(self._with_fraction(fraction))
        return self.segments.local(choice.ids, choice.counts)

    def _best(self, view: "_Selector") -> _Choice:
        raise NotImplementedError

    def _choose(self) -> _Choice:
        raise NotImplementedError

    # -- state -----------------------------------------------------------------

    def _config(self) -> dict:
        config = {"kind": type(self).__name__, "num_channels": list(self.num_channels),
                  "fractions": list(self.fractions), "budget": self.budget}
        if self.rows is not self.segments:  # absent without blocks: older checkpoints load
            config["blocks"] = list(self.blocks)
        if self.cost is not None:
            config["cost"] = list(self.cost.fingerprint())
            config["flops_weight"] = self.flops_weight
        return config

    def _flat_state(self) -> dict[str, str]:
        """state_dict key -> attribute of every flat tensor of the state."""
        return {"counts": "_counts", "means": "_means"}

    def state_dict(self) -> dict:
        """The state on the host (flat tensors, the generator): a checkpoint's. Raises
        if a saliency was not finite (see :meth:`check_saliency`)."""
        self.check_saliency()
        pending = self._pending
        return {
            "format": STATE_FORMAT,
            "config": self._config(),
            "seed": self.seed,
            "steps": self.steps,
            **{key: getattr(self, attr).cpu().clone() for key, attr in self._flat_state().items()},
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
            "pending": None if pending is None else {"ids": pending.ids.cpu().clone(),
                                                     "counts": list(pending.counts)},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"selector state of format {state.get('format', 1)}, this dce_kernels reads "
                f"format {STATE_FORMAT}: the state was written by the per-layer selectors of "
                "an older dce_kernels, whose random draws differ, so it cannot continue that "
                "run exactly here; finish the run with the code that started it")
        if state["config"] != self._config():
            raise ValueError(f"selector state was saved for {state['config']}, "
                             f"this selector is {self._config()}")
        if state["generator_device"] != self.device.type:
            raise ValueError(f"selector state was saved with a {state['generator_device']} "
                             f"generator, this selector's is on {self.device.type}: the draws "
                             f"would differ; move the selector with .to() before loading")
        missing = set(self._flat_state()) - set(state)
        if missing:
            raise ValueError(f"selector state lacks {sorted(missing)}")
        flat = {}
        for key, attr in self._flat_state().items():
            value = state[key]
            mine = getattr(self, attr)
            if not isinstance(value, torch.Tensor) or value.shape != mine.shape:
                raise ValueError(f"selector state's {key!r} must be a tensor of shape "
                                 f"{tuple(mine.shape)}, got {getattr(value, 'shape', value)}")
            flat[attr] = value.to(self.device, mine.dtype).clone()
        pending = state["pending"]
        if pending is not None and sum(pending["counts"]) != pending["ids"].numel():
            raise ValueError("selector state's pending selection is inconsistent")
        vars(self).update(flat)
        self.seed = int(state["seed"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        self._pending = None if pending is None else _Choice(pending["ids"].to(self.device),
                                                            pending["counts"])
        self._bad_step.zero_()
        self._bad_counts.zero_()

    def _with_fraction(self, fraction: Optional[_Fraction]) -> "_Selector":
        """A budget-only view at another fraction, sharing this generator."""
        if fraction is None:
            return self
        view = _Selector(self.num_channels, fraction, self.budget, self.seed, cost=self.cost,
                         flops_weight=self.flops_weight, device=self.device,
                         blocks=self.blocks)
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
                 horizon: Optional[int] = None, cost=None, flops_weight: float = 0.0,
                 device: Union[str, torch.device] = "cpu",
                 blocks: Optional[Sequence[int]] = None) -> None:
        super().__init__(num_channels, fraction, budget, seed, reward, discount, cost,
                         flops_weight, device, blocks)
        if int(tau) != tau or tau < 0:
            raise ValueError(f"tau must be a non-negative integer, got {tau}")
        if horizon is not None and (int(horizon) != horizon or horizon < 1):
            raise ValueError(f"horizon must be a positive number of steps, got {horizon}")
        self.tau = int(tau)
        self.horizon = None if horizon is None else int(horizon)

    def confidence_scale(self, t: int) -> float:
        """``c_t``: 1 without a horizon, else falling linearly to 0 at the horizon."""
        return 1.0 if self.horizon is None else max(0.0, 1.0 - t / self.horizon)

    def _ucb(self, t: int) -> torch.Tensor:
        counts = self._counts
        bonus = self.confidence_scale(t) * torch.sqrt(3.0 * math.log(t)
                                                      / (2.0 * counts.clamp(min=1)))
        # Never-tried channels come first (and 0/0 at t = 1 must not be NaN).
        return torch.where(counts > 0, self._means + bonus, math.inf)

    def ucb(self, t: int) -> list[torch.Tensor]:
        """The upper confidence bounds at bandit time ``t``, one ``[C]`` tensor per layer."""
        return self.segments.split(self._ucb(t))

    def _choose(self) -> _Choice:
        if self.steps < self.tau:
            return self._top(self._uninformed_scores())
        # The poster sets t <- tau after warm-up and increments before each step.
        return self._top(self._ucb(self.steps + 1))

    def _best(self, view: _Selector) -> _Choice:
        return view._top(self._means)

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

    def _choose(self) -> _Choice:
        return self._top(self._uninformed_scores())

    def _best(self, view: _Selector) -> _Choice:
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
                 cost=None, flops_weight: float = 0.0,
                 device: Union[str, torch.device] = "cpu",
                 blocks: Optional[Sequence[int]] = None) -> None:
        super().__init__(num_channels, fraction, budget, seed, cost=cost,
                         flops_weight=flops_weight, device=device, blocks=blocks)
        if int(accumulate_from) != accumulate_from or accumulate_from < 0:
            raise ValueError(f"accumulate_from must be a non-negative number of steps, "
                             f"got {accumulate_from}")
        self.accumulate_from = int(accumulate_from)
        self._sums = self._zeros()

    @property
    def sums(self) -> list[torch.Tensor]:
        """The accumulated saliency, one ``[C]`` view per layer."""
        return self.segments.split(self._sums)

    @sums.setter
    def sums(self, per_layer: Sequence) -> None:
        self._sums = self.segments.cat(per_layer, torch.float64, "sums")

    def _choose(self) -> _Choice:
        return _Choice(self.segments.ids.clone(), self.num_channels)

    def _observe(self, saliency: torch.Tensor, ok: torch.Tensor) -> None:
        # self.steps already counts the select() of this step.
        if self.steps > self.accumulate_from:
            self._sums = torch.where(ok, self._sums + saliency, self._sums)

    def _scores(self) -> torch.Tensor:
        seg = self.segments
        norm = seg.sum(self._sums * self._sums).sqrt()[seg.layer_of]
        return torch.where(norm > 0, self._sums / norm, self._sums)

    def scores(self) -> list[torch.Tensor]:
        """Accumulated saliency, L2-normalized per layer."""
        return self.segments.split(self._scores())

    def _best(self, view: _Selector) -> _Choice:
        return view._top(self._scores())

    def _config(self) -> dict:
        return {**super()._config(), "accumulate_from": self.accumulate_from}

    def _flat_state(self) -> dict[str, str]:
        return {**super()._flat_state(), "sums": "_sums"}


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

    A step whose counts (or FLOPs target) equal the previous step's keeps the previous
    set: it is exactly what ranking again would choose (every survivor), and it costs
    nothing, which makes the steps after the horizon free.

    ``order="random"`` drops channels in random order instead (the same schedule and
    cost, no saliency): the control that says what the saliency ranking is worth.
    """

    def __init__(self, num_channels: Sequence[int], fraction: _Fraction = 0.5,
                 horizon: int = 1, budget: str = "layer", seed: int = 0,
                 reward: str = "l2", discount: float = 1.0, order: str = "saliency",
                 cost=None, flops_weight: float = 0.0,
                 device: Union[str, torch.device] = "cpu",
                 blocks: Optional[Sequence[int]] = None) -> None:
        super().__init__(num_channels, fraction, budget, seed, reward, discount, cost,
                         flops_weight, device, blocks)
        if order not in ("saliency", "random"):
            raise ValueError(f"order must be 'saliency' or 'random', got {order!r}")
        self.order = order
        if int(horizon) != horizon or horizon < 1:
            raise ValueError(f"horizon must be a positive number of steps, got {horizon}")
        self.horizon = int(horizon)
        self._alive = self._zeros(torch.bool).logical_not_()
        # The budget target of the last selection and that selection (the survivors).
        self._planned: Optional[tuple[object, _Choice]] = None

    @property
    def alive(self) -> list[torch.Tensor]:
        """The channels not dropped yet, one ``[C]`` bool view per layer."""
        return self.segments.split(self._alive)

    @alive.setter
    def alive(self, per_layer: Sequence) -> None:
        self._alive = self.segments.cat(per_layer, torch.bool, "alive")
        self._planned = None  # the survivors changed: the next selection ranks again

    def active_fraction(self, t: int, fraction: Optional[float] = None) -> float:
        """``f_t`` of ``fraction`` (default: the budget's, the first layer's under a list)."""
        p = self.fractions[0] if fraction is None else fraction
        return p + (1.0 - p) * (1.0 - min(1.0, t / self.horizon)) ** 3

    def counts_at(self, t: int) -> tuple[list[int], int]:
        """Per-layer counts (layer budget) and the total (global budget) at step ``t``."""
        layer = self._block_counts([max(k, round(self.active_fraction(t, f) * c)) for k, f, c
                                    in zip(self.active_counts(), self.fractions,
                                           self.num_channels)])
        total = max(self.total_budget(), round(self.active_fraction(t) * sum(self.num_channels)))
        return layer, total

    def flops_at(self, t: int) -> float:
        """Under ``budget="flops"``: the FLOPs target at step ``t``, the same cubic
        from the full network's FLOPs down to the budget's."""
        full, budget = self.cost.full, self.flops_budget()
        return budget + (full - budget) * (1.0 - min(1.0, t / self.horizon)) ** 3

    def _target(self, t: int):
        if self.budget == "flops":
            return self.flops_at(t)
        layer, total = self.counts_at(t)
        return tuple(layer) if self.budget == "layer" else total

    def _alive_scores(self) -> torch.Tensor:
        scores = self._means if self.order == "saliency" else self._uninformed_scores()
        return torch.where(self._alive, scores, -math.inf)

    def _choose(self) -> _Choice:
        target = self._target(self.steps)
        if self._planned is not None and self._planned[0] == target:
            return self._planned[1]
        if self.budget == "flops":
            choice = self._top(self._alive_scores(), flops=target)
        elif self.budget == "layer":
            choice = self._top(self._alive_scores(), layer_counts=list(target))
        else:
            choice = self._top(self._alive_scores(), total=target)
        self._alive = self.segments.mask(choice.ids)
        self._planned = (target, choice)
        return choice

    def _best(self, view: _Selector) -> _Choice:
        return view._top(self._alive_scores())

    def to(self, device: Union[str, torch.device]) -> "ShrinkSelector":
        super().to(device)
        if self._planned is not None:
            target, choice = self._planned
            self._planned = (target, _Choice(choice.ids.to(self.device), choice.counts))
        return self

    def _config(self) -> dict:
        return {**super()._config(), "horizon": self.horizon, "reward": self.reward,
                "discount": self.discount, "order": self.order}

    def _flat_state(self) -> dict[str, str]:
        return {**super()._flat_state(), "alive": "_alive"}

    def state_dict(self) -> dict:
        planned = None if self._planned is None else self._planned[0]
        return {**super().state_dict(), "planned_for": planned}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        target = state["planned_for"]
        if target is None:
            self._planned = None
            return
        # The survivors are the last selection (read once, at load time).
        counts = self.segments.sum(self._alive.long()).tolist()
        ids = self.segments.ids_of(self._alive, sum(counts))
        self._planned = (tuple(target) if isinstance(target, (list, tuple)) else target,
                         _Choice(ids, counts))
