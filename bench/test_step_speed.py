"""Whole training step of VGG-16-BN (batch 64, 32x32): ours (channel-sparse
layers with packed activations, CUCB selection, masked SGD, saliency) against
the plain dense model and a plain model physically narrowed to the active
width (the bound), at active fraction p; saliency on vs off; peak memory.

Timing ratios come from interleaved rounds (timing.py) and go into each
benchmark's extra_info for bench/report.py. Peak memory is measured in a fresh
process per candidate (step_memory.py): the growth of the resident set's
high-water mark over a few steps, beyond the model and data set up first.

Run: make bench   (or: pytest bench/test_step_speed.py --benchmark-json=out.json)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from step_cases import make_step_cases
from timing import THREADS, interleaved_medians, paired_ratio, torch_threads

FRACTIONS = [1.0, 0.75, 0.5, 0.25]
ROUNDS = int(os.environ.get("DCE_BENCH_STEP_ROUNDS", "7"))
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"threads{t}")
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda p: f"p{p}")
def test_training_step(benchmark, fraction, threads):
    with torch_threads(threads):
        cases = make_step_cases(fraction)
        medians = interleaved_medians(cases, rounds=ROUNDS)
        benchmark.extra_info.update(
            kind="step", fraction=fraction, threads=threads,
            **{f"ms_{name}": 1e3 * t for name, t in medians.items()},
            ours_over_dense=medians["ours"] / medians["dense"],
            ours_over_narrow=medians["ours"] / medians["narrow"],
            narrow_over_dense=medians["narrow"] / medians["dense"])
        benchmark.pedantic(cases["ours"], rounds=2, warmup_rounds=0)


@pytest.mark.parametrize("fraction", [1.0, 0.5], ids=lambda p: f"p{p}")
def test_step_saliency_overhead(benchmark, fraction):
    """The whole step with and without saliency, at the most threads listed."""
    threads = max(THREADS)
    with torch_threads(threads):
        with_s = make_step_cases(fraction, saliency=True)["ours"]
        without = make_step_cases(fraction, saliency=False)["ours"]
        ratio, spread = paired_ratio(with_s, without, rounds=2 * ROUNDS + 1)
        benchmark.extra_info.update(kind="step_saliency", fraction=fraction, threads=threads,
                                    saliency_overhead=ratio - 1.0, saliency_resolution=spread)
        benchmark.pedantic(with_s, rounds=1, warmup_rounds=0)


def _peak_memory(candidate: str, fraction: float) -> float:
    out = subprocess.run([sys.executable, os.path.join(HERE, "step_memory.py"), candidate,
                          str(fraction)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda p: f"p{p}")
def test_step_peak_memory(benchmark, fraction):
    peaks = {name: _peak_memory(name, fraction) for name in ("dense", "narrow", "ours")}
    benchmark.extra_info.update(kind="memory", fraction=fraction,
                                **{f"mib_{name}": v for name, v in peaks.items()})
    benchmark.pedantic(lambda: None, rounds=1)
