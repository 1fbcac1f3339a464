"""Inference FLOPs of the compact network as a function of each group's channel count.

A selector sees layers only as channel counts; to budget FLOPs instead of channels
(``budget="flops"``) it needs to know what a channel costs. A conv that reads
group ``g`` and writes group ``h`` costs ``a * n_g * n_h`` FLOPs, one that reads or
writes a fixed number of channels (the image, a depthwise conv run at full width)
costs ``b * n_h``, a Linear layer reading group ``g`` (flattened or as hidden
units) and writing group ``h`` ``a * n_g * n_h`` (``b * n_g`` for the logits);
concatenations add counts. So the FLOPs per image of the exported network are exactly a quadratic
form of the counts,

    F(n) = c + sum_g b_g n_g + sum_{g <= h} Q_gh n_g n_h,

and :meth:`FlopsCost.fit` finds ``c``, ``b`` and ``Q`` from the exported models of a
few selections (all full; one group at 1 and at 2 channels; two groups at 1),
counted by :func:`~dce_kernels.flops.count_flops` on ``compact_model``: the same
count as the report's "FLOPs / image". The test suite checks the form against
fresh counts of random selections.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .channels.plan import ChannelPlan

__all__ = ["FlopsCost"]


class FlopsCost:
    """``F(n)``: FLOPs per image of the compact network whose groups keep ``n``
    channels; ``saving(n)``: what dropping one more channel of each group saves."""

    def __init__(self, num_channels: Sequence[int], constant: float,
                 linear: Sequence[float], quadratic: Sequence[Sequence[float]]) -> None:
        self.num_channels = [int(c) for c in num_channels]
        size = len(self.num_channels)
        self.constant = float(constant)
        self.linear = torch.as_tensor(linear, dtype=torch.float64)
        q = torch.as_tensor(quadratic, dtype=torch.float64)
        if self.linear.shape != (size,) or q.shape != (size, size):
            raise ValueError(f"a cost over {size} groups needs {size} linear and "
                             f"{size}x{size} quadratic coefficients, got "
                             f"{tuple(self.linear.shape)} and {tuple(q.shape)}")
        # The upper triangle holds Q; n^T S n with the symmetric S equals sum_{g<=h}.
        upper = torch.triu(q)
        self.symmetric = (upper + upper.T) / 2

    def _counts(self, counts: Sequence[int]) -> torch.Tensor:
        n = torch.as_tensor([float(c) for c in counts], dtype=torch.float64)
        if n.shape != (len(self.num_channels),):
            raise ValueError(f"got {n.numel()} channel counts for "
                             f"{len(self.num_channels)} groups")
        return n

    def __call__(self, counts: Sequence[int]) -> float:
        n = self._counts(counts)
        return float(self.constant + self.linear @ n + n @ self.symmetric @ n)

    def saving(self, counts: Sequence[int]) -> torch.Tensor:
        """``F(n) - F(n - e_g)`` for every group ``g``."""
        n = self._counts(counts)
        return self.linear + 2 * (self.symmetric @ n) - self.symmetric.diagonal()

    @property
    def full(self) -> float:
        return self(self.num_channels)

    def fingerprint(self) -> tuple[int, ...]:
        """What a selector's state records of its cost (a resumed run must use the same)."""
        return (round(self.full), round(self([1] * len(self.num_channels))))

    @classmethod
    def fit(cls, model: nn.Module, plan: ChannelPlan, example_input: torch.Tensor) -> "FlopsCost":
        """Fits the quadratic form from exported models of ``model`` under ``plan``
        (``1 + 2 L + L (L - 1) / 2`` exports for ``L`` groups). The plan's
        selection is restored afterwards."""
        from .compact import compact_model  # compact imports channels; keep import light
        from .flops import count_flops

        sizes = plan.num_channels
        # The fewest channels a group can have, and the next count: one, two (with
        # blocks, one and two channels of every run).
        low = plan.blocks
        saved = plan.selection

        def flops(counts: Sequence[int]) -> float:
            plan.apply(plan.leading_channels(counts))
            return float(count_flops(compact_model(model, plan), example_input))

        def at(**changes: int) -> list[int]:
            counts = list(sizes)
            for g, k in changes.items():
                counts[int(g[1:])] = k
            return counts

        size = len(sizes)
        try:
            f_full = flops(sizes)
            # Along one group's axis F is a quadratic in n_g: three points fix it.
            one = [flops(at(**{f"g{g}": low[g]})) for g in range(size)]
            quadratic = torch.zeros(size, size, dtype=torch.float64)
            linear = torch.zeros(size, dtype=torch.float64)
            line = []  # (alpha_g, beta_g, gamma_g): F along axis g = alpha + beta n + gamma n^2
            for g, c in enumerate(sizes):
                lo = low[g]
                if c >= 3 * lo:
                    two = flops(at(**{f"g{g}": 2 * lo}))
                    # Points n = lo, 2 lo, c.
                    d1 = (two - one[g]) / lo
                    d2 = (f_full - one[g]) / (c - lo)
                    gamma = (d2 - d1) / (c - 2 * lo)
                    beta = d1 - 3 * lo * gamma
                elif c == 2 * lo:
                    gamma, beta = 0.0, (f_full - one[g]) / lo
                else:
                    gamma, beta = 0.0, 0.0
                alpha = one[g] - beta * lo - gamma * lo * lo
                line.append((alpha, beta, gamma))
                quadratic[g, g] = gamma
            for g in range(size):
                for h in range(g + 1, size):
                    if sizes[g] == low[g] or sizes[h] == low[h]:
                        continue
                    both = flops(at(**{f"g{g}": low[g], f"g{h}": low[h]}))
                    # Second difference in (n_g, n_h) between the lowest count and full.
                    quadratic[g, h] = ((both - one[g] - one[h] + f_full)
                                       / ((sizes[g] - low[g]) * (sizes[h] - low[h])))
            # beta_g = b_g + sum_{h != g} Q_gh C_h: the other groups sit at full width.
            for g in range(size):
                cross = sum(float(quadratic[min(g, h), max(g, h)]) * sizes[h]
                            for h in range(size) if h != g)
                linear[g] = line[g][1] - cross
            n = torch.tensor(sizes, dtype=torch.float64)
            q_upper = torch.triu(quadratic)
            constant = f_full - float(linear @ n) - float(n @ q_upper @ n)
        finally:
            plan.apply(saved)
        return cls(sizes, constant, linear, quadratic)
