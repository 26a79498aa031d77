"""The confirmation pass: Pareto candidates rebuilt and timed together, with bands and tie groups."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest

from optagent.contract import sha256_bytes
from optagent.protocol import VERSION
from optagent.trial import run_trial
from optagent.trial.confirm import combine

TINY = Path(__file__).parent / "fixtures" / "tiny_model.py"


def _payload(candidates: dict, processes: int = 1) -> dict:
    return {"version": VERSION, "kind": "confirm", "trial": -1, "processes": processes, "job": {"id": 1, "name": "t"},
            "model": {"path": str(TINY), "sha256": sha256_bytes(TINY.read_bytes()), "source_b64": None},
            "strategies": ["pruning"], "objectives": ["accuracy:max", "latency_ms:min"], "threads": 1,
            "device": "cpu", "seed": 0, "measure": {"warmup": 3, "min_time_s": 0.05, "max_time_s": 0.4},
            "candidates": candidates}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTAGENT_CACHE_DIR", str(tmp_path / "cache"))


def test_confirmation_gives_bands_and_ties_baseline_equivalents() -> None:
    result = run_trial(_payload({
        "1": {"params": {}, "seed": 1},                                    # the baseline itself
        "2": {"params": {"pruning": {"method": "none"}}, "seed": 2},       # off params: the same model
        "3": {"params": {"pruning": {"method": "structured", "amount": 0.7}}, "seed": 3},
    }))
    assert result["state"] == "complete", result.get("failure_reason")
    assert result["trial"] == -1 and result["kind"] == "confirm"
    conf = result["confirmations"]
    assert set(conf) == {"1", "2", "3"}
    for c in conf.values():
        assert c["low"] <= c["speedup"] <= c["high"]
        assert c["latency_ms"] > 0 and c["baseline_latency_ms"] > 0 and c["batch_size"] == 8
        assert isinstance(c["tie_group"], int) and c["tie_group"] >= 1
        assert c["vs_baseline"] in ("faster", "tie", "slower")
    for same in ("1", "2"):  # identical to the baseline: ~1, and a tie with it
        assert 0.9 < conf[same]["speedup"] < 1.1
        assert conf[same]["vs_baseline"] == "tie"
    assert conf["1"]["tie_group"] == conf["2"]["tie_group"]
    fastest = max(conf, key=lambda n: conf[n]["speedup"])
    assert conf[fastest]["tie_group"] == 1
    samples = result["samples"]["8"]  # raw samples per inference batch size, baseline included
    assert set(samples) == {"baseline", "1", "2", "3"}
    assert len({len(v) for v in samples.values()}) == 1  # round-robin: one sample per round each
    assert result["hardware"]["threads"] == 1 and result["duration_s"] > 0


def test_a_candidate_that_cannot_be_rebuilt_is_reported_alone() -> None:
    result = run_trial(_payload({"1": {"params": {}, "seed": 1},
                                 "4": {"params": {"pruning": {"method": "structured", "amount": 7.0}}, "seed": 4}}))
    assert result["state"] == "complete"
    assert "error" in result["confirmations"]["4"] and "speedup" in result["confirmations"]["1"]


def test_no_candidates_is_a_failed_result() -> None:
    result = run_trial(_payload({}))
    assert result["state"] == "failed" and result["trial"] == -1 and "no candidates" in result["failure_reason"]


def test_fresh_processes_add_the_process_to_process_spread_to_the_band() -> None:
    payload = _payload({"1": {"params": {}, "seed": 1},
                        "3": {"params": {"pruning": {"method": "structured", "amount": 0.7}}, "seed": 3}},
                       processes=2)
    payload.update(exclusive_measure=True, parallel=2)  # as local workers: both at once, timing under the lock
    # time long enough to tell the pruned model from the baseline on a busy machine (0.4 s tied them there)
    payload["measure"] = {"warmup": 3, "min_time_s": 0.3, "max_time_s": 2.0}
    result = run_trial(payload)
    assert result["state"] == "complete", result.get("failure_reason")
    assert result["processes"] == 2 and len(result["samples"]) == 2
    assert result["worker"]["pid"] == os.getpid()  # the combined result is the calling worker's
    assert result["noise"] is not None and result["noise"] >= 0
    for c in result["confirmations"].values():
        assert c["processes"] == 2 and len(c["runs"]) == 2
        assert c["speedup"] == pytest.approx(math.sqrt(c["runs"][0] * c["runs"][1]))
        assert c["low"] <= c["ci_low"] <= c["speedup"] <= c["ci_high"] <= c["high"]
        assert c["noise"] == result["noise"] and c["batch_size"] == 8
    assert result["confirmations"]["3"]["tie_group"] == 1 < result["confirmations"]["1"]["tie_group"]


def test_every_process_failing_fails_the_confirmation_with_each_reason() -> None:
    payload = _payload({"1": {"params": {}, "seed": 1}}, processes=2)
    payload["model"] = {**payload["model"], "path": "/nonexistent/model.py"}
    result = run_trial(payload)
    assert result["state"] == "failed"
    reason = result["failure_reason"]
    assert reason.startswith("every confirmation process failed: process 1: no candidate could be rebuilt")
    assert "process 2:" in reason and "/nonexistent/model.py" in reason


def _run(speedups: dict[str, float], rounds: int = 60) -> dict:
    """A single-process confirmation result with the given per-candidate speedups (bands at the point)."""
    return {"confirmations": {n: {"speedup": v, "low": v, "high": v, "rounds": rounds, "latency_ms": 10 / v,
                                  "latency_spread": 0.01, "baseline_latency_ms": 10.0,
                                  "baseline_latency_spread": 0.01, "batch_size": 8} if v else {"error": "boom"}
                              for n, v in speedups.items()},
            "samples": {}, "hardware": {"threads": 1}, "worker": {"host": "h"}, "duration_s": 1.0}


def test_combine_pools_the_spread_between_processes_into_a_prediction_band() -> None:
    from scipy.stats import t

    runs = [_run({"1": 2.00, "2": 4.0, "3": 0.0}), _run({"1": 2.10, "2": 4.1, "3": 0.0}),
            _run({"1": 1.95, "2": 3.9, "3": 0.0})]
    out = combine(runs)
    logs = {"1": [math.log(v) for v in (2.0, 2.1, 1.95)], "2": [math.log(v) for v in (4.0, 4.1, 3.9)]}
    ss = sum(sum((y - sum(ys) / 3) ** 2 for y in ys) for ys in logs.values())
    noise = math.sqrt(ss / 4)  # two candidates, three processes each: 4 degrees of freedom
    assert out["noise"] == pytest.approx(noise) and out["processes"] == 3
    c = out["confirmations"]["1"]
    centre = sum(logs["1"]) / 3
    assert c["speedup"] == pytest.approx(math.exp(centre))
    reach = t.ppf(0.975, 4) * noise
    assert c["high"] == pytest.approx(math.exp(centre + reach * math.sqrt(1 + 1 / 3)))
    assert c["low"] == pytest.approx(math.exp(centre - reach * math.sqrt(1 + 1 / 3)))
    assert c["ci_high"] == pytest.approx(math.exp(centre + reach / math.sqrt(3)))
    assert c["runs"] == [2.0, 2.1, 1.95] and c["rounds"] == 180 and c["vs_baseline"] == "faster"
    assert out["confirmations"]["2"]["tie_group"] == 1 and c["tie_group"] == 2
    assert out["confirmations"]["3"] == {"error": "boom"}


def test_ties_are_decided_process_by_process() -> None:
    """A process that runs everything 5% slower moves every speedup alike, so the bands overlap; the
    ratio between two candidates within each process still separates a real 14% difference."""
    runs = [_run({"7": 11.40, "11": 12.78, "12": 12.9}), _run({"7": 10.77, "11": 12.40, "12": 12.3}),
            _run({"7": 10.54, "11": 12.20, "12": 12.25})]
    conf = combine(runs)["confirmations"]
    assert conf["7"]["high"] > conf["11"]["low"]  # overlapping noise bands ...
    assert conf["11"]["tie_group"] == conf["12"]["tie_group"] == 1  # ... within 1%: a tie
    assert conf["7"]["tie_group"] == 2  # ... 14% slower in every process: ranked below


def test_combine_with_one_process_keeps_the_in_process_band() -> None:
    run = _run({"1": 2.0})
    run["confirmations"]["1"].update(low=1.9, high=2.1)
    c = combine([run])["confirmations"]["1"]
    assert (c["low"], c["speedup"], c["high"]) == (1.9, 2.0, 2.1) and c["noise"] is None


def test_noise_band_covers_95_percent_of_fresh_measurements() -> None:
    """Simulated processes with log-normal noise: a new process's speedup lands inside the band ~95% of
    the time (the band is a prediction interval, not the narrower confidence band of the mean)."""
    rng = random.Random(7)
    true, sigma, inside, trials = {"1": 3.0, "2": 5.0, "3": 8.0}, 0.01, 0, 600
    for _ in range(trials):
        runs = [_run({n: v * math.exp(rng.gauss(0, sigma)) for n, v in true.items()}) for _ in range(3)]
        band = combine(runs)["confirmations"]["2"]
        fresh = true["2"] * math.exp(rng.gauss(0, sigma))
        inside += band["low"] <= fresh <= band["high"]
    assert 0.92 <= inside / trials <= 0.98


def test_phase_noise_sees_a_ratio_that_moves_over_time_and_not_round_noise() -> None:
    from optagent.trial.confirm import _phase_noise

    rng = random.Random(3)
    base = [10.0 * math.exp(rng.gauss(0, 0.03)) for _ in range(120)]
    steady = [1.0 * math.exp(rng.gauss(0, 0.05)) for _ in range(120)]  # noisy rounds, one true ratio
    var, df = _phase_noise(base, steady)
    assert df == 3 and math.sqrt(var) < 0.01
    # a busy phase in the second half slows the candidate by 6% against the baseline
    moving = [c * (1.06 if i >= 60 else 1.0) for i, c in enumerate(steady)]
    var, _ = _phase_noise(base, moving)
    assert 0.02 < math.sqrt(var) < 0.05  # block medians -3%/+3% around the mean: sd ~0.034
    assert _phase_noise(base[:15], steady[:15]) == (0.0, 0)  # too few rounds for two blocks


def test_the_band_for_a_search_time_speedup_adds_phase_and_its_own_sampling_noise() -> None:
    runs = [_run({"1": 2.00}), _run({"1": 2.04}), _run({"1": 1.98})]
    plain = combine(runs)["confirmations"]["1"]
    for run in runs:
        run["confirmations"]["1"].update(phase_var=0.02 ** 2, phase_df=3)
    phased = combine(runs)["confirmations"]["1"]
    searched = combine(runs, searched={"1": (1.9, 2.1)})["confirmations"]["1"]
    assert plain["high"] < phased["high"] < searched["high"] and plain["low"] > phased["low"] > searched["low"]
    assert phased["phase_noise"] == pytest.approx(0.02)
    assert phased["ci_low"] == plain["ci_low"]  # the confidence band of the mean is the processes' alone
