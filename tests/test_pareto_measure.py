"""Pareto bookkeeping and the latency measurement method."""

from __future__ import annotations

import random
import time

import pytest

from optagent.search.front import dominates, front_of, insert
from optagent.trial.measure import LatencyStats, MeasureSettings, interleaved


def test_incremental_front_equals_the_full_computation() -> None:
    rng = random.Random(7)
    signs = [1.0, -1.0]
    points = {n: [round(rng.random(), 2), round(rng.random(), 2)] for n in range(300)}
    front: dict[int, list[float]] = {}
    for n, v in points.items():
        insert(front, n, v, signs)
    assert set(front) == front_of(points, signs)
    for n in front:
        assert not any(dominates(points[m], points[n], signs) for m in points)


def test_dominance_respects_directions() -> None:
    assert dominates([0.9, 1.0], [0.8, 2.0], [1.0, -1.0])
    assert not dominates([0.9, 3.0], [0.8, 2.0], [1.0, -1.0])
    assert not dominates([0.9, 2.0], [0.9, 2.0], [1.0, -1.0])


def test_stats_of_known_samples() -> None:
    s = LatencyStats.of([float(x) for x in range(1, 101)])
    assert s.median_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.iqr_ms == pytest.approx(49.5)
    assert s.reps == 100 and len(s.samples_ms) == 100


def test_interleaved_timing_sees_a_two_to_one_ratio() -> None:
    def work(seconds: float):
        def call() -> None:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        return call

    settings = MeasureSettings(warmup=2, min_reps=20, max_reps=60, min_time_s=0.05, max_time_s=1.0)
    stats = interleaved({"slow": work(0.002), "fast": work(0.001)}, settings)
    ratio = stats["slow"].median_ms / stats["fast"].median_ms
    assert 1.6 < ratio < 2.5
    assert stats["slow"].reps == stats["fast"].reps >= 20  # round-robin: same number of samples each
