"""JobConfig validates itself before a job row exists; enums and the objective parser."""

from __future__ import annotations

import pytest

from optagent.errors import UserError
from optagent.job import JobConfig, JobStatus, TrialState, did_you_mean, parse_objectives


def _cfg(**changes: object) -> JobConfig:
    return JobConfig(**{"model_path": "m.py", "strategies": ["pruning"], **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_trials": 0}, "--trials must be at least 1"),
    ({"n_trials": None}, "give a budget"),
    ({"timeout_s": -1.0}, "--timeout must be positive"),
    ({"trial_timeout_s": -1.0}, "--trial-timeout must be positive"),
    ({"workers": 0}, "--workers must be at least 1"),
    ({"max_accuracy_drop": 2.0}, "between 0 and 1"),
    ({"sampler": "tpee"}, "--sampler 'tpee' is unknown (did you mean tpe?)"),
    ({"device": "gpu"}, "--device 'gpu' is unknown"),
    ({"queue": "a b"}, "--queue 'a b' is not a valid queue name"),
    ({"strategies": []}, "no strategy to search"),
    ({"objectives": ["accuracy:max", "accuracy:min"]}, "objective accuracy is given twice"),
    ({"objectives": ["accuracy"]}, "is not NAME:max or NAME:min"),
    ({"constraint_metric": "perplexity:lowest"}, "is not NAME or NAME:min"),
])
def test_a_bad_setting_is_named_with_its_fix(changes: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        _cfg(**changes).validate()


def test_a_good_config_round_trips() -> None:
    cfg = _cfg(constraint_metric="perplexity:min", max_relative_drop=0.02).validate()
    assert JobConfig.from_json(cfg.to_json()) == cfg and cfg.constraint_name == "perplexity"


def test_states_compare_with_their_stored_text() -> None:
    assert JobStatus.RUNNING == "running" and str(JobStatus.INTERRUPTED) == "interrupted"
    assert TrialState("queued").in_flight and TrialState.PRUNED.done and not TrialState.CANCELLED.done


def test_objectives_and_near_misses() -> None:
    assert [o.metric for o in parse_objectives(None)] == ["accuracy", "latency_ms"]
    assert did_you_mean("Accuracy", ["accuracy", "f1"]) == " (did you mean accuracy?)"
    assert did_you_mean("zzz", ["accuracy"]) == ""
