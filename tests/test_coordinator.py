"""The coordinator's loop on a FakeExecutor: ordering, failures, resume and cancel, in-process and fast."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import optuna
import pytest
from sqlmodel import Session

from optagent.errors import UserError
from optagent.hookspecs import hookimpl
from optagent.job import JobConfig, JobStatus
from optagent.registry import build_registry, get_plugin_manager
from optagent.search import Cancelled, Coordinator, create_job
from optagent.storage import Job, init_db, job_trials
from optagent.strategy import Param, SpaceContext, Stage, Strategy, real
from optagent.testing import FakeExecutor, fake_answer

STRATEGIES = ["knob"]


class Knob(Strategy):
    """A strategy with one continuous parameter: every sampled point is new, so no trial is a repeat."""

    name = "knob"
    stage = Stage.DEPLOY
    description = "a test knob"

    def search_space(self, ctx: SpaceContext) -> list[Param]:
        return [real("x", 0.0, 1.0)]

    def off_params(self, ctx: SpaceContext) -> dict[str, Any]:
        return {"x": 0.0}

    def apply(self, model: Any, params: dict[str, Any], trial: Any) -> Any:
        return model


class KnobPlugin:
    @hookimpl
    def optagent_register_strategies(self, register: Any) -> None:
        register(Knob())


@pytest.fixture(scope="module")
def registry() -> Any:
    return build_registry(get_plugin_manager(extra=[KnobPlugin()]))


@pytest.fixture
def db(tmp_path: Path) -> tuple[Any, str]:
    url = f"sqlite:///{tmp_path / 'coord.db'}"
    return init_db(url), url


def _job(db: tuple[Any, str], tmp_path: Path, **options: Any) -> int:
    engine, _ = db
    model = tmp_path / "model.py"
    model.write_text("# a model file the fake executor never runs\n")
    cfg = JobConfig(model_path=str(model), sampler="random",
                    **{"strategies": STRATEGIES, "n_trials": 6, "confirm": False, **options}).validate()
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


def test_a_failed_trial_is_told_to_the_sampler_as_a_violated_constraint(db: tuple[Any, str], tmp_path: Path,
                                                                       registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path, n_trials=3)
    executor = FakeExecutor(answer=fake_answer(fail=lambda p: "boom" if p["trial"] == 2 else None))
    job = Coordinator(engine, url, job_id, registry, executor).run()
    study = optuna.load_study(study_name=f"optagent-{job_id}-{job.name}", storage=url)
    failed = study.trials[2]
    assert failed.state == optuna.trial.TrialState.COMPLETE  # the samplers only learn from finished trials
    assert failed.constraints["accuracy_drop"] >= 1000 and failed.user_attrs["optagent"]["failed"]
    ok = study.trials[1]
    assert ok.constraints["accuracy_drop"] < 1000
    assert _rows(engine, job_id)[2].state == "failed"  # optagent's own record says what happened


def _fixed_params(params: dict[str, Any]) -> Any:
    """An answer that ignores the sampler: every trial measures the same recipe."""
    return lambda payload: fake_answer()({**payload, "params": params})


def test_a_parameter_set_measured_before_is_not_run_again(db: tuple[Any, str], tmp_path: Path,
                                                         registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path, n_trials=3, strategies=["pruning"])
    coordinator = Coordinator(engine, url, job_id, registry, FakeExecutor())
    same = {"pruning": {"method": "structured", "amount": 0.5}}
    coordinator.space.suggest = lambda trial: same  # type: ignore[method-assign]
    coordinator._search = lambda deadline: [coordinator._ask() or coordinator._drain() for _ in range(3)]  # type: ignore
    coordinator._drain = lambda: [coordinator._tell(o.number, o.result)  # type: ignore[attr-defined]
                                  for o in coordinator.executor.poll(0)]
    coordinator.run()
    rows = _rows(engine, job_id)
    assert [r.number for r in rows] == [0, 1, 2, 3]
    assert "reused_from" not in rows[1].metrics
    for r in rows[2:]:
        assert r.metrics["reused_from"] == 1 and r.values == rows[1].values
        assert any("same parameters as trial 1" in n for n in r.notes)
    assert [n for n, _ in coordinator.executor.sent] == [0, 1]  # measured once


def test_an_option_that_fails_three_times_alike_is_dropped(db: tuple[Any, str], tmp_path: Path,
                                                          registry: Any) -> None:
    engine, url = db
    job_id = _job(db, tmp_path, n_trials=12, strategies=["pruning", "knob"])

    def fail(payload: dict[str, Any]) -> str | None:
        method = payload["params"].get("pruning", {}).get("method")
        return f"shape '[1, {payload['trial']}, -1]' is invalid" if method == "structured" else None

    events: list[tuple[str, dict[str, Any]]] = []
    executor = FakeExecutor(answer=fake_answer(fail=fail))
    coordinator = Coordinator(engine, url, job_id, registry, executor, on_event=lambda k, d: events.append((k, d)))
    coordinator.run()
    dropped = [d for k, d in events if k == "option_dropped"]
    assert [d["option"] for d in dropped] == ['pruning.method="structured"']
    assert "after 3 failures with the same error" in dropped[0]["text"]
    structured_runs = [p for n, p in executor.sent if p["params"].get("pruning", {}).get("method") == "structured"]
    assert len(structured_runs) == 3  # never sent again once dropped
    assert coordinator.spent() == 12


def test_the_warm_start_tries_each_engine_then_each_precision_on_the_fastest(db: tuple[Any, str], tmp_path: Path,
                                                                           registry: Any) -> None:
    from optagent.testing.fake import FAKE_CAPABILITIES, fake_metrics

    def metrics(params: dict[str, Any]) -> dict[str, float]:
        m = fake_metrics(params)
        if (params.get("runtime") or {}).get("engine") == "onnxruntime":
            m.update(speedup=m["speedup"] * 3, latency_ms=m["latency_ms"] / 3)
        return m

    software = {"torch": "2.13.0", "inductor": True, "cxx": "g++", "onnx": "1", "onnxruntime": "1", "onnxscript": "1"}
    FAKE_CAPABILITIES["extra"] = {"software": software}
    try:
        engine, url = db
        job_id = _job(db, tmp_path, n_trials=8, strategies=["quantization", "runtime"], warm_start=True)
        executor = FakeExecutor(answer=fake_answer(metrics=metrics))
        events: list[tuple[str, dict[str, Any]]] = []
        Coordinator(engine, url, job_id, registry, executor, on_event=lambda k, d: events.append((k, d))).run()
    finally:
        FAKE_CAPABILITIES["extra"] = {}
    sent = [p["params"] for n, p in executor.sent if n > 0]
    assert [p["runtime"]["engine"] for p in sent[:2]] == ["compile", "onnxruntime"]
    assert all(p["quantization"]["mode"] == "none" for p in sent[:2])
    phase2 = sent[2:4]
    assert all(p["runtime"]["engine"] == "onnxruntime" for p in phase2)  # the fastest engine of phase 1
    assert {p["quantization"]["mode"] for p in phase2} == {"dynamic_int8", "static_int8"}
    assert any(k == "warm_start" for k, _ in events)


def test_the_warm_start_tries_the_precisions_on_every_engine_within_the_tie_of_the_fastest(
        db: tuple[Any, str], tmp_path: Path, registry: Any) -> None:
    from optagent.search.warmstart import precisions
    from optagent.testing.fake import FAKE_CAPABILITIES, fake_metrics

    def metrics(params: dict[str, Any]) -> dict[str, float]:  # fp32: ONNX Runtime 3x, compile 2.7x (a tie)
        m = fake_metrics(params)
        factor = {"onnxruntime": 3.0, "compile": 2.7}.get((params.get("runtime") or {}).get("engine"), 1.0)
        m.update(speedup=m["speedup"] * factor, latency_ms=m["latency_ms"] / factor)
        return m

    software = {"torch": "2.13.0", "inductor": True, "cxx": "g++", "torchao": "0.1", "onnx": "1", "onnxruntime": "1",
                "onnxscript": "1"}
    FAKE_CAPABILITIES["extra"] = {"software": software}
    try:
        job_id = _job(db, tmp_path, n_trials=12, strategies=["quantization", "runtime"], warm_start=True)
        executor = FakeExecutor(answer=fake_answer(metrics=metrics))
        coordinator = Coordinator(db[0], db[1], job_id, registry, executor)
        coordinator.run()
        space = coordinator.space
    finally:
        FAKE_CAPABILITIES["extra"] = {}
    sent = [p["params"] for n, p in executor.sent if n > 0]
    ort, compiled = precisions(space, "onnxruntime"), precisions(space, "compile")
    assert ort and compiled
    phase2 = sent[2:2 + len(ort) + len(compiled)]
    assert [p["runtime"]["engine"] for p in phase2] == ["onnxruntime"] * len(ort) + ["compile"] * len(compiled)
    assert [p["quantization"]["mode"] for p in phase2] == ort + compiled
    assert all(p["mixed_precision"]["keep_float"] == 0 for p in phase2 if "mixed_precision" in p)


def test_the_warm_start_then_composes_the_best_point_with_pruning_and_recovery(db: tuple[Any, str], tmp_path: Path,
                                                                              registry: Any) -> None:
    from optagent.search.warmstart import pruning_points, recovery_point
    from optagent.testing.fake import fake_metrics

    def metrics(params: dict[str, Any]) -> dict[str, float]:  # static int8 is the fastest precision alone
        m = fake_metrics(params)
        factor = 4.0 if (params.get("quantization") or {}).get("mode") == "static_int8" else 1.0
        m.update(speedup=m["speedup"] * factor, latency_ms=m["latency_ms"] / factor)
        return m

    job_id = _job(db, tmp_path, n_trials=10, strategies=["pruning", "finetune", "quantization"], warm_start=True)
    executor = FakeExecutor(answer=fake_answer(metrics=metrics))
    coordinator = Coordinator(db[0], db[1], job_id, registry, executor)
    coordinator.run()
    sent = [p["params"] for n, p in executor.sent if n > 0]
    precisions = [p["quantization"]["mode"] for p in sent if p["pruning"] == {"method": "none"}]
    assert "static_int8" in precisions
    points, recovery = pruning_points(coordinator.space), recovery_point(coordinator.space)
    assert [p["amount"] for p in points] == [0.25, 0.5]
    assert recovery["epochs"] == 3 and recovery["optimizer"] == "adam" and recovery["schedule"] == "cosine"
    composed = sent[len(precisions):len(precisions) + len(points)]
    assert [p["pruning"] for p in composed] == points
    assert all(p["quantization"]["mode"] == "static_int8" for p in composed)  # on top of the best point
    assert all({k: p["finetune"][k] for k in recovery} == recovery for p in composed)


def test_with_reuse_a_second_job_on_the_same_model_and_hardware_answers_from_the_first(
        db: tuple[Any, str], tmp_path: Path, registry: Any) -> None:
    engine, url = db
    first = FakeExecutor()
    Coordinator(engine, url, _job(db, tmp_path, n_trials=4, seed=3), registry, first).run()
    second = FakeExecutor()
    events: list[tuple[str, dict[str, Any]]] = []
    job_id = _job(db, tmp_path, n_trials=4, seed=3, reuse=True)  # same seed: the sampler proposes the same points
    Coordinator(engine, url, job_id, registry, second, on_event=lambda k, d: events.append((k, d))).run()
    rows = _rows(engine, job_id)
    reused = [r for r in rows if "reused_from" in r.metrics]
    assert [r.number for r in reused] == [1, 2, 3, 4]  # the first job's four points, not run again
    assert all(any("--reuse" in n for n in r.notes) for r in reused)
    # reused trials cost nothing, so the budget buys four new measurements on top
    assert [n for n, _ in second.sent] == [0, 5, 6, 7, 8]
    assert any(k == "reuse" for k, _ in events)
