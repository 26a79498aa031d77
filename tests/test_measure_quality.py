"""The measurement method's statistics: stats of known samples, paired speedup bands, tie groups."""

from __future__ import annotations

import gc
import random

import pytest

from optagent.hardware import fingerprint
from optagent.measure import (
    LatencyStats,
    MeasureSettings,
    Speedup,
    interleaved,
    paired_ratios,
    quiet_median,
    speedup_band,
    tie_groups,
)


def test_stats_report_median_tails_spread_and_the_quiet_block() -> None:
    samples = [10.0] * 40 + [50.0] * 40  # a quiet phase, then a busy one
    s = LatencyStats.of(samples)
    assert s.median_ms == pytest.approx(30.0)
    assert s.stable_ms == pytest.approx(10.0)  # the quiet phase's median
    assert s.p90_ms == pytest.approx(50.0) and s.p99_ms == pytest.approx(50.0)
    assert s.spread == pytest.approx(40.0 / 30.0)
    assert s.to_json()["reps"] == 80 and "samples_ms" not in s.to_json()
    assert quiet_median([3.0, 1.0, 2.0]) == 2.0  # too few samples for blocks: the plain median
    single = LatencyStats.of([4.0])
    assert single.median_ms == single.p99_ms == single.stable_ms == 4.0 and single.iqr_ms == 0.0


def test_paired_band_finds_a_two_to_one_ratio_despite_shared_drift() -> None:
    rng = random.Random(0)
    drift = [1.0 + 3.0 * (i // 20 % 2) for i in range(200)]  # the machine gets 4x slower in phases
    ref = [2.0 * d * rng.uniform(0.97, 1.03) for d in drift]
    cand = [1.0 * d * rng.uniform(0.97, 1.03) for d in drift]
    assert len(paired_ratios(ref, cand)) == 200
    band = speedup_band(ref, cand)
    assert band.low <= band.ratio <= band.high
    assert band.low > 1.95 and band.high < 2.05  # pairing cancels the 4x drift
    assert band.verdict() == "faster" and speedup_band(cand, ref).verdict() == "slower"
    same = speedup_band(ref, [r * rng.uniform(0.97, 1.03) for r in ref])
    assert same.low <= 1.0 <= same.high or same.verdict(0.02) == "tie"


def test_tie_groups_rank_fastest_first_and_join_overlapping_bands() -> None:
    bands = {"a": Speedup(2.0, 1.9, 2.1, 50), "b": Speedup(1.95, 1.85, 2.05, 50),
             "c": Speedup(1.0, 0.98, 1.02, 50), "d": Speedup(1.005, 1.001, 1.009, 50)}
    groups = tie_groups(bands)
    assert groups["a"] == groups["b"] == 1
    assert groups["c"] == groups["d"] == 2  # 0.5% apart: a tie within the 2% margin
    assert tie_groups(bands, margin=0.0)["c"] == 2 and tie_groups({"x": Speedup(1.2, 1.1, 1.3, 9)}) == {"x": 1}


def test_interleaved_times_with_gc_off_and_restores_it() -> None:
    seen = []
    settings = MeasureSettings(warmup=1, min_reps=5, max_reps=10, min_time_s=0.0, max_time_s=0.2)
    stats = interleaved({"a": lambda: seen.append(gc.isenabled()), "b": lambda: None}, settings)
    assert stats["a"].reps == stats["b"].reps >= 5
    assert not any(seen) and gc.isenabled()


def test_fingerprint_names_what_makes_figures_comparable() -> None:
    fp = fingerprint(3)
    assert fp["threads"] == 3 and fp["torch"] and fp["cpu_model"]
    assert isinstance(fp["cpu_flags"], list) and "device" in fp



def test_latency_is_calibrated_by_the_jobs_reference_and_the_raw_median_kept(tmp_path, monkeypatch) -> None:
    """With the job's reference for this worker and batch, latency_ms is the reference over the paired speedup
    (a slow phase moves candidate and baseline alike); the trial's own median stays in latency_measured_ms."""
    from pathlib import Path

    from optagent.contract import sha256_bytes
    from optagent.executors._base import worker_identity
    from optagent.measure import reference_key
    from optagent.pipeline import run_trial

    monkeypatch.setenv("OPTAGENT_CACHE_DIR", str(tmp_path / "cache"))
    tiny = Path(__file__).parent / "fixtures" / "tiny_model.py"
    payload = {"trial": 1, "job": {"id": 1, "name": "t"},
               "model": {"path": str(tiny), "sha256": sha256_bytes(tiny.read_bytes()), "source_b64": None},
               "params": {"pruning": {"method": "structured", "amount": 0.5}}, "strategies": ["pruning"],
               "objectives": ["accuracy:max", "latency_ms:min"], "seed": 1, "threads": 1, "device": "cpu",
               "measure": {"warmup": 3, "min_time_s": 0.05, "max_time_s": 0.3}}
    raw = run_trial(payload)["metrics"]
    assert raw["latency_ms"] == raw["latency_measured_ms"] and "baseline_drift" not in raw  # no reference yet

    me = worker_identity()
    reference = 2.0 * raw["baseline_latency_ms"]  # as if the reference had been taken on a machine twice as slow
    m = run_trial({**payload, "reference_ms": {reference_key(me["host"], me["gpu"], 8): reference}})["metrics"]
    assert m["latency_ms"] == pytest.approx(reference / m["speedup"])
    assert m["latency_per_sample_ms"] == pytest.approx(m["latency_ms"] / 8)
    assert m["throughput"] == pytest.approx(8000.0 / m["latency_ms"])
    assert m["baseline_drift"] == pytest.approx(m["baseline_latency_ms"] / reference - 1)
    assert m["latency_measured_ms"] != m["latency_ms"]
    other = run_trial({**payload, "reference_ms": {reference_key(me["host"], me["gpu"], 16): reference}})["metrics"]
    assert other["latency_ms"] == other["latency_measured_ms"]  # another batch's reference does not apply
