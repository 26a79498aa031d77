"""The coordinator's loop on a FakeExecutor: ordering, failures, resume and cancel, in-process and fast."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import optuna
import pytest
from sqlmodel import Session

from optagent.errors import UserError
from optagent.job import JobConfig, JobStatus
from optagent.registry import build_registry
from optagent.search import Cancelled, Coordinator, create_job
from optagent.storage import Job, init_db, job_trials
from optagent.testing import FakeExecutor, fake_answer

STRATEGIES = ["pruning", "quantization"]


@pytest.fixture(scope="module")
def registry() -> Any:
    return build_registry()


@pytest.fixture
def db(tmp_path: Path) -> tuple[Any, str]:
    url = f"sqlite:///{tmp_path / 'coord.db'}"
    return init_db(url), url


def _job(db: tuple[Any, str], tmp_path: Path, **options: Any) -> int:
    engine, _ = db
    model = tmp_path / "model.py"
    model.write_text("# a model file the fake executor never runs\n")
    cfg = JobConfig(model_path=str(model), strategies=STRATEGIES, sampler="random",
                    **{"n_trials": 6, "confirm": False, **options}).validate()
    job = create_job(engine, cfg, None, hashlib.sha256(model.read_bytes()).hexdigest())
    assert job.id is not None
    return job.id


def _rows(engine: Any, job_id: int) -> list[Any]:
    with Session(engine) as s:
        return job_trials(s, job_id)


def test_the_baseline_goes_first_then_the_budget_is_spent(db: tuple[Any, str], tmp_path: Path, registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path, n_trials=5)
    executor = FakeExecutor(capacity=2)
    job = Coordinator(engine, url, job_id, registry, executor).run()
    assert job.status == JobStatus.COMPLETED
    assert [n for n, _ in executor.sent] == [0, 1, 2, 3, 4, 5]
    assert executor.sent[0][1]["params"] == {}  # the baseline: every strategy off
    rows = _rows(engine, job_id)
    assert [r.state for r in rows] == ["complete"] * 6
    assert rows[0].on_front and all(r.values is not None for r in rows)
    study = optuna.load_study(study_name=f"optagent-{job_id}-{job.name}", storage=url)
    assert len(study.trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert executor.closed


def test_results_told_out_of_order_are_each_stored_once(db: tuple[Any, str], tmp_path: Path, registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path, n_trials=4)
    executor = FakeExecutor(capacity=3, hold={1})
    coordinator = Coordinator(engine, url, job_id, registry, executor)
    told: list[int] = []
    original = coordinator._tell

    def tell(number: int, raw: dict[str, Any]) -> None:
        told.append(number)
        if len(told) == 2:
            executor.release(1)  # trial 1 finishes after later trials
        original(number, raw)
        original(number, raw)  # a redelivered duplicate is a no-op

    coordinator._tell = tell  # type: ignore[method-assign]
    coordinator.run()
    assert told[0] != 1 and 1 in told
    assert sorted(told) == [1, 2, 3, 4]
    assert [r.number for r in _rows(engine, job_id)] == [0, 1, 2, 3, 4]


def test_a_failed_trial_is_stored_with_its_reason_and_the_search_goes_on(db: tuple[Any, str], tmp_path: Path,
                                                                        registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path, n_trials=4)
    executor = FakeExecutor(answer=fake_answer(fail=lambda p: "boom" if p["trial"] == 2 else None))
    Coordinator(engine, url, job_id, registry, executor).run()
    rows = {r.number: r for r in _rows(engine, job_id)}
    assert rows[2].state == "failed" and rows[2].failure_reason == "boom" and rows[2].values is None
    assert all(rows[n].state == "complete" for n in (0, 1, 3, 4))


def test_a_failing_baseline_fails_the_job_with_the_reason(db: tuple[Any, str], tmp_path: Path,
                                                         registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path)
    executor = FakeExecutor(answer=fake_answer(fail=lambda p: "no weights" if p["trial"] == 0 else None))
    with pytest.raises(UserError, match="the baseline trial failed: no weights"):
        Coordinator(engine, url, job_id, registry, executor).run()
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "failed" and "no weights" in (job.error or "")


def test_an_unexpected_error_marks_the_job_failed_not_running(db: tuple[Any, str], tmp_path: Path,
                                                             registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path)

    def broken(payload: dict[str, Any]) -> dict[str, Any]:
        if payload["trial"] == 2:
            raise RuntimeError("the executor lost its connection")
        return fake_answer()(payload)

    with pytest.raises(RuntimeError):
        Coordinator(engine, url, job_id, registry, FakeExecutor(answer=broken)).run()
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "failed" and "lost its connection" in (job.error or "")


def test_resume_sends_in_flight_trials_again_and_finishes_the_budget(db: tuple[Any, str], tmp_path: Path,
                                                                    registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path, n_trials=5)
    first = FakeExecutor(capacity=2, hold={2, 3})
    coordinator = Coordinator(engine, url, job_id, registry, first)
    polls = 0
    original = first.poll

    def poll(timeout: float) -> list[Any]:
        nonlocal polls
        polls += 1
        if polls > 20:  # trials 2 and 3 never come back: the coordinator is stopped
            raise KeyboardInterrupt
        return original(timeout)

    first.poll = poll  # type: ignore[method-assign]
    job = coordinator.run()
    assert job.status == JobStatus.INTERRUPTED
    in_flight = {r.number for r in _rows(engine, job_id) if r.state == "running"}
    assert in_flight == {2, 3}

    second = FakeExecutor(capacity=2)
    job = Coordinator(engine, url, job_id, registry, second).run()
    assert job.status == JobStatus.COMPLETED
    resent = [n for n, _ in second.sent]
    assert resent[:2] == [2, 3] and 0 not in resent  # the stored baseline is not measured again
    rows = _rows(engine, job_id)
    assert [r.number for r in rows] == [0, 1, 2, 3, 4, 5] and all(r.state == "complete" for r in rows)


def test_cancel_stops_the_search_and_cancels_in_flight_trials(db: tuple[Any, str], tmp_path: Path,
                                                             registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path, n_trials=8)
    executor = FakeExecutor(capacity=2, hold={2})
    coordinator = Coordinator(engine, url, job_id, registry, executor)
    original = coordinator._tell

    def tell(number: int, raw: dict[str, Any]) -> None:
        original(number, raw)
        if number == 1:  # what the heartbeat raises once `optagent cancel` marked the job
            raise Cancelled()

    coordinator._tell = tell  # type: ignore[method-assign]
    job = coordinator.run()
    assert job.status == JobStatus.CANCELLED and executor.cancelled
    rows = {r.number: r.state for r in _rows(engine, job_id)}
    assert rows[2] == "cancelled" and "running" not in rows.values()
    study = optuna.load_study(study_name=f"optagent-{job_id}-{job.name}", storage=url)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_a_metric_the_model_does_not_measure_fails_the_job_naming_the_known_ones(db: tuple[Any, str],
                                                                                tmp_path: Path,
                                                                                registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path, objectives=["f1:max", "latency_ms:min"])
    with pytest.raises(UserError, match="metric f1 is not measured; measured metrics: accuracy"):
        Coordinator(engine, url, job_id, registry, FakeExecutor()).run()


def test_the_confirmation_is_stored_on_the_pareto_trials(db: tuple[Any, str], tmp_path: Path, registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path, n_trials=6, confirm=True)
    executor = FakeExecutor()
    Coordinator(engine, url, job_id, registry, executor).run()
    assert executor.sent[-1][0] == -1 and executor.sent[-1][1]["kind"] == "confirm"
    front = [r for r in _rows(engine, job_id) if r.on_front and r.number > 0]
    assert front and all("confirmed_speedup" in r.metrics and "tie_group" in r.metrics for r in front)
