"""The measurement method's statistics: stats of known samples, paired speedup bands, tie groups."""

from __future__ import annotations

import gc
import random

import pytest

from optagent.hardware import fingerprint
from optagent.trial.measure import (
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




def test_calibration_puts_a_trial_on_the_jobs_reference_scale() -> None:
    """latency_ms = reference / paired speedup; tails, per-sample latency and throughput move by the same
    factor; the raw median is kept. The machine ran 10% slow here (baseline 11 against a reference of 10)."""
    from optagent.search.calibration import calibrate

    raw = {"latency_ms": 5.5, "latency_p90_ms": 6.6, "latency_p99_ms": 7.7, "latency_per_sample_ms": 5.5 / 8,
           "throughput": 8000 / 5.5, "baseline_latency_ms": 11.0, "speedup": 2.0, "batch_size": 8.0, "accuracy": 0.9}
    m = calibrate(raw, 10.0)
    assert m["latency_ms"] == pytest.approx(5.0) and m["latency_measured_ms"] == 5.5
    assert m["latency_p90_ms"] == pytest.approx(6.0) and m["latency_p99_ms"] == pytest.approx(7.0)
    assert m["latency_p90_ms"] >= m["latency_ms"]
    assert m["latency_per_sample_ms"] == pytest.approx(5.0 / 8) and m["throughput"] == pytest.approx(1600.0)
    assert m["latency_reference_ms"] == 10.0 and m["baseline_drift"] == pytest.approx(0.1)
    assert m["accuracy"] == 0.9 and m["speedup"] == 2.0 and m["baseline_latency_ms"] == 11.0
    assert calibrate(m, 20.0) == m  # calibrated once: a replayed tell does not scale it again
    first = calibrate(raw)  # the first trial on a worker at a batch is its own reference
    assert first["latency_reference_ms"] == 11.0 and first["latency_ms"] == pytest.approx(5.5)
    assert first["baseline_drift"] == 0.0
    assert calibrate({"accuracy": 0.5}, 10.0) == {"accuracy": 0.5}  # a failed or latency-less trial


def test_compute_holds_off_while_a_trial_times(tmp_path) -> None:
    """The host lock: a trial's compute step waits while another trial times, and goes on after."""
    import threading

    from optagent.trial.lock import computing, measure_exclusively

    lock = tmp_path / "measure.lock"
    entered = threading.Event()

    def step() -> None:
        with computing(lock):
            entered.set()

    with measure_exclusively(lock):
        worker = threading.Thread(target=step)
        worker.start()
        assert not entered.wait(0.3)  # held off while the timing runs
    assert entered.wait(5)
    worker.join()
    with computing(lock), computing(lock):  # compute steps of several trials share the lock
        pass


def test_large_allocations_stay_on_the_heap_in_a_trial_process() -> None:
    """glibc's mmap threshold is fixed high for trials (optagent.trial.pipeline.steady_allocator), in a fresh process
    so this test's own interpreter is untouched: a 32 MiB block then comes from the heap, not from mmap."""
    import subprocess
    import sys
    import textwrap

    probe = textwrap.dedent("""
        import ctypes, sys
        from optagent.trial.pipeline import steady_allocator
        if not steady_allocator():
            print("no-glibc"); sys.exit(0)
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        block = libc.malloc(32 << 20)
        heap = any("[heap]" in line and int(line.split("-")[0], 16) <= block < int(line.split()[0].split("-")[1], 16)
                   for line in open("/proc/self/maps"))
        print("heap" if heap else "mmap")
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("heap", "no-glibc")
