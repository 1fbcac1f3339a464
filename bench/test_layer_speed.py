"""Layer speed: one 3x3 conv forward+backward (batch 64, VGG-16 shapes) at
active fraction p, ours against dense nn.Conv2d, a physically narrower conv of
the active size, and the naive index_select + conv + index_copy.

pytest-benchmark times ours; the ratios, which are what the targets are stated
in, come from interleaved rounds in the same test (see timing.py) and are stored
in each benchmark's extra_info for bench/report.py.

Run: make bench   (or: pytest bench/test_layer_speed.py --benchmark-json=out.json)
"""
from __future__ import annotations

import os

import pytest

from layer_cases import VGG16_SHAPES, make_cases
from timing import THREADS, interleaved_medians, paired_ratio, torch_threads

FRACTIONS = [1.0, 0.75, 0.5, 0.25]
ROUNDS = int(os.environ.get("DCE_BENCH_ROUNDS", "11"))


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"threads{t}")
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("shape", VGG16_SHAPES, ids=lambda s: f"C{s[0]}-S{s[1]}")
def test_layer_forward_backward(benchmark, shape, fraction, threads):
    with torch_threads(threads):
        cases = make_cases(*shape, fraction)
        medians = interleaved_medians(cases, rounds=ROUNDS)
        benchmark.extra_info.update(
            kind="layer", channels=shape[0], size=shape[1], fraction=fraction, threads=threads,
            **{f"ms_{name}": 1e3 * t for name, t in medians.items()},
            ours_over_dense=medians["ours"] / medians["dense"],
            ours_over_narrow=medians["ours"] / medians["narrow"],
            packed_over_narrow=medians["ours_packed"] / medians["narrow"],
            narrow_over_dense=medians["narrow"] / medians["dense"],
            naive_over_dense=medians["naive"] / medians["dense"],
        )
        benchmark.pedantic(cases["ours"], rounds=3, warmup_rounds=1)


SALIENCY_ROUNDS = int(os.environ.get("DCE_BENCH_SALIENCY_ROUNDS", "41"))


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"threads{t}")
@pytest.mark.parametrize("shape", VGG16_SHAPES, ids=lambda s: f"C{s[0]}-S{s[1]}")
def test_saliency_overhead(benchmark, shape, threads):
    """Ours with and without the fused saliency, full activation: the ratio of
    back-to-back runs, median over many rounds (timing.paired_ratio)."""
    with torch_threads(threads):
        with_s = make_cases(*shape, 1.0, saliency=True)["ours"]
        without = make_cases(*shape, 1.0, saliency=False)["ours"]
        ratio, spread = paired_ratio(with_s, without, rounds=SALIENCY_ROUNDS)
        benchmark.extra_info.update(
            kind="saliency", channels=shape[0], size=shape[1], threads=threads,
            saliency_overhead=ratio - 1.0, saliency_resolution=spread)
        benchmark.pedantic(with_s, rounds=3, warmup_rounds=1)
