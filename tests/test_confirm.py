"""The confirmation pass: Pareto candidates rebuilt and timed together, with bands and tie groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from optagent.contract import sha256_bytes
from optagent.pipeline import run_trial

TINY = Path(__file__).parent / "fixtures" / "tiny_model.py"


def _payload(candidates: dict) -> dict:
    return {"kind": "confirm", "trial": -1, "job": {"id": 1, "name": "t"},
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
