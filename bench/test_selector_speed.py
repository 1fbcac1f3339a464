"""The selector's share of an exploration step for VGG-16-BN (selector_cases.py): the
per-layer selectors before (``old``) against the flat ones (``new``), select + apply +
update, at p = 0.5, for CUCB (layer and global budgets) and the trainer's default
(ShrinkSelector, global budget, mid-schedule).

Ratios come from interleaved rounds (timing.py): one step is about a millisecond, so
many rounds. Run: pytest bench/test_selector_speed.py --benchmark-json=out.json, or
``python bench/test_selector_speed.py`` for the table of bench/README.md.
"""
from __future__ import annotations

import os
import time

import pytest

from selector_cases import make_selector_cases
from timing import THREADS, interleaved_medians, torch_threads

KINDS = ["cucb", "cucb-global", "shrink-global"]
ROUNDS = int(os.environ.get("DCE_BENCH_SELECTOR_ROUNDS", "301"))


def measure(kind: str, threads: int, rounds: int = ROUNDS) -> dict:
    # One thread: this process's CPU time, steadier than wall time on the shared machine
    # (it leaves out the time other processes hold the core). Two: wall time.
    clock = time.process_time if threads == 1 else time.perf_counter
    with torch_threads(threads):
        medians = interleaved_medians(make_selector_cases(kind), rounds=rounds, warmup=10,
                                      clock=clock)
    return {f"ms_{name}": 1e3 * t for name, t in medians.items()}


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"threads{t}")
@pytest.mark.parametrize("kind", KINDS)
def test_selector_step(benchmark, kind, threads):
    ms = measure(kind, threads)
    benchmark.extra_info.update(kind="selector", selector=kind, threads=threads, **ms,
                                new_over_old=ms["ms_new"] / ms["ms_old"])
    with torch_threads(threads):
        benchmark.pedantic(make_selector_cases(kind)["new"], rounds=20, warmup_rounds=2)


if __name__ == "__main__":
    print("| selector | threads | old ms | new ms | new/old | new, no apply, ms |")
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        for threads in THREADS:
            ms = measure(kind, threads)
            print(f"| {kind} | {threads} | {ms['ms_old']:.3f} | {ms['ms_new']:.3f} | "
                  f"{ms['ms_new'] / ms['ms_old']:.2f} | {ms['ms_new-no-apply']:.3f} |",
                  flush=True)
