"""Latency measurement: warm-up, fixed threads, interleaved candidates, raw samples kept.

Latency on a shared machine drifts by more than the effects being measured, so every trial times its
candidate *interleaved* with the baseline in the same process at the same batch size: both see the same
noise and their ratio (the speedup) is what can be trusted. See docs/metrics.md.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class MeasureSettings:
    warmup: int = 10  # calls per candidate before timing (caches, allocator, oneDNN primitive cache)
    min_reps: int = 25
    max_reps: int = 2000
    min_time_s: float = 0.5  # keep timing at least this long per candidate...
    max_time_s: float = 4.0  # ...and stop by this, spread reached or not
    target_spread: float = 0.05  # stop once IQR/median falls below this (after min_time_s)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> MeasureSettings:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    p99_ms: float
    iqr_ms: float
    mean_ms: float
    reps: int
    samples_ms: tuple[float, ...]

    @property
    def spread(self) -> float:
        """IQR / median: the relative noise of this measurement."""
        return self.iqr_ms / self.median_ms if self.median_ms else float("inf")

    @classmethod
    def of(cls, samples: list[float]) -> LatencyStats:
        ordered = sorted(samples)
        q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
        return cls(median_ms=statistics.median(ordered), p90_ms=q[89], p99_ms=q[98], iqr_ms=q[74] - q[24],
                   mean_ms=statistics.fmean(ordered), reps=len(ordered), samples_ms=tuple(samples))


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Time one call in milliseconds; CUDA calls are timed with events and synchronised."""
    if device.type == "cuda":
        def cuda_time(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        return cuda_time

    def cpu_time(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e6
    return cpu_time


def interleaved(calls: Mapping[str, Callable[[], Any]], settings: MeasureSettings | None = None,
                device: torch.device | None = None, seed: int = 0) -> dict[str, LatencyStats]:
    """Time several callables round-robin (in a shuffled order each round) until stable.

    Each round times every callable once, so slow drifts of the machine hit all of them alike.
    Stops when every callable has `min_reps` samples, `min_time_s` has passed and each spread is
    below `target_spread`, or when `max_time_s` / `max_reps` is reached.
    """
    s = settings or MeasureSettings()
    timer = _timer(device or torch.device("cpu"))
    names = list(calls)
    rng = random.Random(seed)
    with torch.inference_mode():
        for _ in range(s.warmup):
            for name in names:
                calls[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        started = time.perf_counter()
        while True:
            rng.shuffle(names)
            for name in names:
                samples[name].append(timer(calls[name]))
            reps = len(samples[names[0]])
            elapsed = time.perf_counter() - started
            if reps >= s.max_reps or (elapsed >= s.max_time_s * len(names) and reps >= 5):
                break
            settled = reps >= s.min_reps and elapsed >= s.min_time_s * len(names) and reps % 5 == 0
            if settled and all(LatencyStats.of(v).spread <= s.target_spread for v in samples.values()):
                break
    return {name: LatencyStats.of(v) for name, v in samples.items()}
