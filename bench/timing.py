"""Interleaved timing: the machine is shared and noisy, so every candidate is
timed in the same rounds, round-robin, and compared by the median."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict


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
