"""Latency measurement: warm-up, fixed threads, interleaved candidates, raw samples kept.

Latency on a shared machine drifts by more than the effects being measured, so every trial times its
candidate *interleaved* with the baseline in the same process at the same batch size: both see the same
noise and their ratio (the speedup) is what can be trusted. Because sample i of every callable comes from
the same round, the per-round ratios are *paired*: `speedup_band` summarises them by their median and a
block-bootstrap confidence band, and `tie_groups` turns overlapping bands into ties. See docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MeasureSettings:
    warmup: int = 10  # calls per candidate before timing (caches, allocator, oneDNN primitive cache)
    min_reps: int = 25
    max_reps: int = 2000
    min_time_s: float = 0.5  # keep timing at least this long per candidate...
    max_time_s: float = 4.0  # ...and stop by this, spread reached or not
    target_spread: float = 0.05  # stop once IQR/median falls below this (after min_time_s)
    # untimed calls of the same callable right before each timed one: the timed call then runs on caches
    # warmed by itself, as in serving, not on what the previous callable (a big baseline) left behind
    warm_calls: int = 1
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
    # min over consecutive blocks of rounds of the block's median: the quiet-phase latency (see `quiet_median`)
    stable_ms: float | None = None

    @property
    def spread(self) -> float:
        """IQR / median: the relative noise of this measurement."""
        return self.iqr_ms / self.median_ms if self.median_ms else float("inf")

    def to_json(self) -> dict[str, Any]:
        """Summary figures (no raw samples): median, p90, p99, iqr, mean, spread, reps."""
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "iqr_ms": self.iqr_ms,
                "mean_ms": self.mean_ms, "spread": self.spread, "reps": self.reps, "stable_ms": self.stable_ms}

    @classmethod
    def of(cls, samples: list[float]) -> LatencyStats:
        ordered = sorted(samples)
        q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
        return cls(median_ms=statistics.median(ordered), p90_ms=q[89], p99_ms=q[98], iqr_ms=q[74] - q[24],
                   mean_ms=statistics.fmean(ordered), reps=len(ordered), samples_ms=tuple(samples),
                   stable_ms=quiet_median(samples))


def quiet_median(samples: Sequence[float], blocks: int = 8, min_block: int = 5) -> float:
    """The lowest median over consecutive blocks of samples (rounds, in time order).

    Other processes only ever *add* time, and on a shared machine they come in phases that span many
    rounds (with several intra-op threads one preempted thread stalls the whole call, so a busy phase can
    be 5x slower). The median of the quietest block estimates the uncontended latency, which is what is
    comparable between trials measured at different moments; within a block the median still ignores
    single outliers. With fewer than 2 * min_block samples it is the plain median.
    """
    n = len(samples)
    if n < 2 * min_block:
        return statistics.median(samples) if n else float("nan")
    size = max(min_block, math.ceil(n / blocks))
    return min(statistics.median(samples[i:i + size]) for i in range(0, n - size + 1, size))


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Time one call in milliseconds; CUDA calls are timed with events and synchronised."""
    if device.type == "cuda":
        import torch

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

    Each round times every callable once, so slow drifts of the machine hit all of them alike; each timed
    call follows `warm_calls` untimed calls of the same callable, so a small model is not timed on caches
    a big one just filled (that alone made an int8 CNN look 11% slower next to its fp32 baseline here).
    Stops when every callable has `min_reps` samples, `min_time_s` has passed and each spread is
    below `target_spread`, or when `max_time_s` / `max_reps` is reached.
    """
    import torch  # here, not at import: the coordinator reads this module and never loads torch

    s = settings or MeasureSettings()
    timer = _timer(device or torch.device("cpu"))
    names = list(calls)
    rng = random.Random(seed)
    with torch.inference_mode(), _quiet_gc():
        for _ in range(s.warmup):
            for name in names:
                calls[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        started = time.perf_counter()
        while True:
            rng.shuffle(names)
            for name in names:
                for _ in range(s.warm_calls):
                    calls[name]()
                samples[name].append(timer(calls[name]))
            reps = len(samples[names[0]])
            elapsed = time.perf_counter() - started
            if reps >= s.max_reps or (elapsed >= s.max_time_s * len(names) and reps >= 5):
                break
            settled = reps >= s.min_reps and elapsed >= s.min_time_s * len(names) and reps % 5 == 0
            if settled and all(LatencyStats.of(v).spread <= s.target_spread for v in samples.values()):
                break
    return {name: LatencyStats.of(v) for name, v in samples.items()}


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """No garbage-collection pauses inside timed calls: collect once, then disable until timing ends."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -- paired comparison -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speedup:
    """`reference / candidate` from paired rounds: the median ratio and a confidence band around it."""

    ratio: float
    low: float
    high: float
    rounds: int

    def overlaps(self, other: Speedup, margin: float = 0.0) -> bool:
        """The two bands overlap once each is widened by a relative `margin`."""
        grow = 1.0 + margin
        return self.low / grow <= other.high * grow and other.low / grow <= self.high * grow

    def verdict(self, margin: float = 0.0) -> str:
        """"faster", "slower" or "tie" against the reference (band within `margin` of 1 = tie)."""
        if self.low > 1.0 + margin:
            return "faster"
        if self.high < 1.0 / (1.0 + margin):
            return "slower"
        return "tie"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def paired_ratios(reference: Sequence[float], candidate: Sequence[float]) -> list[float]:
    """Per-round ratios reference[i] / candidate[i] (samples of the same `interleaved` round)."""
    n = min(len(reference), len(candidate))
    return [reference[i] / candidate[i] for i in range(n) if candidate[i] > 0]


def speedup_band(reference: Sequence[float], candidate: Sequence[float], confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> Speedup:
    """Median of the paired per-round ratios with a moving-block bootstrap band over rounds.

    Rounds are resampled in contiguous blocks (length ~ n^(1/3)) because a busy phase of a shared
    machine spans several consecutive rounds; resampling single rounds would pretend they are independent
    and give a band that is too narrow.
    """
    import numpy as np

    ratios = np.asarray(paired_ratios(reference, candidate), dtype=float)
    n = len(ratios)
    if n == 0:
        return Speedup(float("nan"), float("nan"), float("nan"), 0)
    point = float(np.median(ratios))
    if n < 3:
        return Speedup(point, float(ratios.min()), float(ratios.max()), n)
    block = max(1, round(n ** (1 / 3)))
    starts_per = math.ceil(n / block)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, size=(resamples, starts_per))
    idx = ((starts[:, :, None] + np.arange(block)[None, None, :]) % n).reshape(resamples, -1)[:, :n]
    medians = np.median(ratios[idx], axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(medians, [alpha, 1 - alpha])
    return Speedup(point, float(min(low, point)), float(max(high, point)), n)


# Differences below this are not shown as wins, however narrow the bands: process-to-process effects
# (memory layout, allocator state) are about 1-2% on a CPU, and a band from few processes can miss them.
MIN_EFFECT = 0.02


def tie_groups(bands: Mapping[str, Speedup], margin: float = MIN_EFFECT,
               differ: Callable[[str, str], bool] | None = None) -> dict[str, int]:
    """Rank by speedup into groups, 1 = fastest: a candidate that does not differ from the group's leader
    (a tie within the noise) shares its group; else it starts the next. By default two candidates differ
    when their bands do not overlap once each is widened by `margin`; `differ(leader, candidate)` can
    decide instead (the confirmation pass compares them process by process)."""
    differ = differ or (lambda a, b: not bands[a].overlaps(bands[b], margin))
    order = sorted(bands, key=lambda k: -bands[k].ratio if math.isfinite(bands[k].ratio) else math.inf)
    groups: dict[str, int] = {}
    group, leader = 1, None
    for name in order:
        if leader is not None and differ(leader, name):
            group, leader = group + 1, None
        if leader is None:
            leader = name
        groups[name] = group
    return groups
