"""The messages between coordinator and workers: one definition, JSON round trips, versions checked."""

from __future__ import annotations

import json

import pytest

from optagent.job import JobConfig, make_payload
from optagent.protocol import (
    VERSION,
    Candidate,
    ConfirmPayload,
    ConfirmResult,
    JobRef,
    ModelRef,
    ProtocolError,
    TrialPayload,
    TrialResult,
    parse_payload,
    parse_result,
)


def _trial() -> TrialPayload:
    cfg = JobConfig(model_path="/m/model.py", strategies=["pruning"], seed=3, threads=2)
    return make_payload(cfg, JobRef(7, "job"), ModelRef("/m/model.py", "ab" * 32), 4,
                        {"pruning": {"method": "structured", "amount": 0.5}}, {"optagent.plugins.pruning": "0.1.0"})


def test_a_trial_payload_survives_json() -> None:
    payload = _trial()
    wire = json.loads(json.dumps(payload.to_json()))
    assert wire["version"] == VERSION and wire["kind"] == "trial" and wire["seed"] == 7  # job seed + trial number
    assert parse_payload(wire) == payload


def test_a_confirm_payload_survives_json() -> None:
    base = _trial()
    payload = ConfirmPayload(**{k: v for k, v in base.__dict__.items() if k != "params"},
                             candidates={"4": Candidate({"pruning": {"method": "none"}}, 4, 1.1, 1.3)},
                             processes=2, parallel=1)
    wire = json.loads(json.dumps(payload.to_json()))
    assert wire["trial"] == -1 and wire["kind"] == "confirm"
    back = parse_payload(wire)
    assert isinstance(back, ConfirmPayload) and back.candidates["4"].speedup_high == 1.3


@pytest.mark.parametrize("change", [{"version": VERSION + 1}, {"version": None}, {"kind": "train"}])
def test_a_message_of_another_version_or_kind_is_refused(change: dict) -> None:
    wire = {**_trial().to_json(), **change}
    with pytest.raises(ProtocolError, match="version|kind"):
        parse_payload(wire)


def test_an_incomplete_payload_is_refused() -> None:
    wire = _trial().to_json()
    del wire["model"]
    with pytest.raises(ProtocolError, match="incomplete"):
        parse_payload(wire)


def test_a_worker_answers_an_unknown_version_with_a_failed_result() -> None:
    from optagent.trial import run_trial

    result = run_trial({**_trial().to_json(), "version": 99})
    assert result["state"] == "failed" and result["trial"] == 4
    assert result["failure_reason"].startswith("worker refused the payload: the payload has protocol version 99")
    confirm = run_trial({"kind": "confirm", "version": 99})
    assert confirm["state"] == "failed" and confirm["kind"] == "confirm"


def test_results_survive_json_and_are_told_apart() -> None:
    done = TrialResult(trial=2, state="complete", metrics={"accuracy": 0.9}, capabilities={"device": "cpu"})
    assert parse_result(json.loads(json.dumps(done.to_json()))) == done
    failed = TrialResult.failed(3, "boom")
    assert parse_result(failed.to_json()).failure_reason == "boom"
    conf = ConfirmResult(state="complete", confirmations={"2": {"speedup": 2.0}})
    assert isinstance(parse_result(conf.to_json()), ConfirmResult)
