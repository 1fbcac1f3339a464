"""Interleaved timing: the machine is shared and noisy, so every candidate is
timed in the same rounds, round-robin, and compared by the median."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Dict, Iterator

import torch


# Thread counts every suite measures at (DCE_BENCH_THREADS, e.g. "1,2").
THREADS = [int(t) for t in os.environ.get("DCE_BENCH_THREADS", "1,2").split(",")]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block, then restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def interleaved_medians(cases: Dict[str, Callable[[], object]], rounds: int = 15,
                        warmup: int = 2, clock: Callable[[], float] = time.perf_counter
                        ) -> Dict[str, float]:
    """Median seconds per call of each case, cases alternating within each round.

    ``clock`` is wall time by default; ``time.process_time`` (CPU time of this
    process) is steadier on a loaded machine for single-threaded runs."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples = {name: [] for name in cases}
    for r in range(rounds):
        # Rotate the order so no case always runs right after the same neighbour.
        names = list(cases)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            start = clock()
            cases[name]()
            samples[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def paired_ratio(numerator: Callable[[], object], denominator: Callable[[], object],
                 rounds: int = 41, warmup: int = 2,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Median over rounds of the time ratio of two calls made back to back
    (order alternating), and half the interquartile range of those ratios.

    For small differences (a fused reduction of ~1%) a ratio per round cancels
    the slow drift of a shared machine that separate medians keep; the spread
    says how small a difference this run could resolve."""
    for _ in range(warmup):
        numerator(), denominator()
    ratios = []
    for r in range(rounds):
        first, second = (numerator, denominator) if r % 2 == 0 else (denominator, numerator)
        t0 = clock()
        first()
        t1 = clock()
        second()
        t2 = clock()
        a, b = (t1 - t0, t2 - t1) if r % 2 == 0 else (t2 - t1, t1 - t0)
        ratios.append(a / b)
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), (q[2] - q[0]) / 2
