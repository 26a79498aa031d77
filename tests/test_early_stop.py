"""Early stopping of recovery fine-tuning: the constraint pruner, the median pruner, and a pruned trial."""

from __future__ import annotations

from pathlib import Path

import pytest

from optagent.contract import sha256_bytes
from optagent.errors import TrialPruned
from optagent.protocol import VERSION
from optagent.strategy import Constraint
from optagent.trial import run_trial
from optagent.trial.early_stop import checker

TINY = Path(__file__).parent / "fixtures" / "tiny_model.py"


def test_a_hopeless_curve_stops_at_its_first_epoch() -> None:
    check = checker({"kind": "constraint"}, Constraint("accuracy", 1.0, 0.98), total_steps=30)
    assert check(0, 0.11) is None  # before training: nothing to extrapolate
    reason = check(10, 0.27)  # +0.16 per 10 steps, doubled over 20 more steps: 0.91 < 0.98
    assert reason is not None and "cannot reach the constraint (0.98)" in reason


def test_a_curve_that_can_still_make_it_goes_on() -> None:
    check = checker({"kind": "constraint"}, Constraint("accuracy", 1.0, 0.98), total_steps=30)
    assert check(0, 0.50) is None
    assert check(10, 0.85) is None  # 0.85 + 2 x 0.35 x 2: reachable
    assert check(20, 0.97) is None


def test_a_minimised_constraint_stops_when_it_cannot_fall_far_enough() -> None:
    check = checker({"kind": "constraint"}, Constraint("perplexity", -1.0, 4.1), total_steps=20)
    assert check(0, 9.0) is None
    assert check(10, 8.5) is not None  # -0.05 per step, doubled over 10 steps: 7.5 > 4.1
    assert checker({"kind": "none"}, Constraint("perplexity", -1.0, 4.1), 20)(10, 99.0) is None


def test_the_median_pruner_stops_a_curve_below_the_earlier_ones() -> None:
    history = [{"0": 0.5, "1": 0.9, "2": 0.95}] * 4
    check = checker({"kind": "median", "history": history}, Constraint("accuracy", 1.0, 0.9), total_steps=2)
    assert check(0, 0.5) is None
    assert check(1, 0.6) is not None


def test_trial_pruned_carries_the_curve() -> None:
    exc = TrialPruned("why", {0: 0.1, 10: 0.2})
    assert str(exc) == "why" and exc.intermediate[10] == 0.2


def test_a_fine_tuning_trial_that_cannot_meet_the_constraint_is_pruned(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTAGENT_CACHE_DIR", str(tmp_path / "cache"))
    payload = {"version": VERSION, "trial": 1, "job": {"id": 1, "name": "t"},
               "model": {"path": str(TINY), "sha256": sha256_bytes(TINY.read_bytes())},
               "strategies": ["pruning", "finetune", "batch_size"], "objectives": ["accuracy:max", "latency_ms:min"],
               "params": {"pruning": {"method": "structured", "amount": 0.7},
                          "finetune": {"epochs": 3, "optimizer": "sgd", "sgd_lr": 1e-5, "schedule": "constant",
                                       "warmup": 0.0},
                          "batch_size": {"train": 32}},
               "threads": 1, "device": "cpu", "seed": 0, "measure": {"warmup": 1, "min_reps": 3, "max_time_s": 0.2},
               # a bound no accuracy reaches: the first epoch's gain, doubled, falls short
               "constraint": {"metric": "accuracy", "sign": 1.0, "bound": 1.5}, "pruner": {"kind": "constraint"}}
    result = run_trial(payload)
    assert result["state"] == "pruned", result["failure_reason"]
    assert result["failure_reason"].startswith("stopped early at step ")
    assert "0" in result["intermediate"] and len(result["intermediate"]) >= 2
    assert "accuracy" in result["metrics"]
