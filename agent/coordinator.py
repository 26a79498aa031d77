"""The search coordinator: the one process that calls Optuna ask/tell and writes the database.

Workers (local processes or Celery) only compute: a JSON payload in, a JSON result out. Keeping a single
writer makes SQLite safe, keeps the sampler's state in one place (Optuna does not store it) and makes
failure handling explicit: a result is told once (`skip_if_finished`), a crashed trial is failed with its
reason, and the coordinator itself can be restarted (`optagent resume`) from what the database holds.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from optagent import pareto
from optagent.errors import UserError
from optagent.executors import Executor
from optagent.hardware import Capabilities
from optagent.measure import calibrate, reference_key
from optagent.registry import Registry
from optagent.storage import Job, Trial, get_trial, job_trials, utcnow
from optagent.strategy import Objective, SpaceContext, sample, study_point, suggest_all

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

EventSink = Callable[[str, dict[str, Any]], None]
CONSTRAINT = "accuracy_drop"  # <= 0 when the trial keeps the constraint metric within the allowed drop


@dataclass
class JobConfig:
    """Everything that defines a job; stored as JSON on the job row (secrets never included)."""

    model_path: str
    objectives: list[str] = field(default_factory=lambda: ["accuracy:max", "latency_ms:min"])
    strategies: list[str] = field(default_factory=list)
    n_trials: int | None = 20
    timeout_s: float | None = None
    max_accuracy_drop: float = 0.01
    constraint_metric: str = "accuracy"
    sampler: str = "tpe"
    seed: int = 0
    workers: int = 1
    threads: int = 1
    device: str = "auto"
    measure: dict[str, Any] = field(default_factory=dict)
    trial_timeout_s: float | None = 1800.0
    executor: str = "local"  # "local" | "celery"
    queue: str = "optagent"
    max_attempts: int = 3
    confirm: bool = True  # re-measure the Pareto trials interleaved with the baseline when the search ends
    confirm_processes: int = 3  # fresh processes the confirmation runs in (their spread is the noise band)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def parsed_objectives(self) -> tuple[Objective, ...]:
        return tuple(Objective.parse(o) for o in self.objectives)


class StudyStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, plus writes staged for a trial that go into the transaction of its final state.

    A finished trial has a result row in optagent's table, a constraint (a system attribute the samplers
    read) and what optuna-dashboard shows (a user attribute). Written one transaction each, they sat on the
    coordinator's critical path between a result arriving and the next trial being sent. Staged with
    `stage`, they go into the session `study.tell` commits (the storage's scoped session is one per thread):
    the result, its attributes and the trial's state are stored together or not at all.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._staged: dict[int, tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]] = {}

    def stage(self, trial_id: int, *, statements: tuple[Any, ...] = (), system: dict[str, Any],
              user: dict[str, Any]) -> None:
        """Stage for the next tell of `trial_id`: SQL `statements` (each must change one row), then
        attributes. Replaces whatever a tell that did not write left staged (a trial told before, which
        `skip_if_finished` skips)."""
        self._staged = {trial_id: (statements, system, user)}

    def unstage(self, trial_id: int) -> bool:
        """Drop what is staged for `trial_id`; True if it was still there (the tell did not write it)."""
        return self._staged.pop(trial_id, None) is not None

    def set_trial_state_values(self, trial_id: int, state: optuna.trial.TrialState,
                               values: Any = None) -> bool:
        staged = self._staged.pop(trial_id, None)
        if staged is not None and state.is_finished():
            self._write_staged(trial_id, *staged)
        return super().set_trial_state_values(trial_id, state, values)

    def _write_staged(self, trial_id: int, statements: tuple[Any, ...], system: dict[str, Any],
                      user: dict[str, Any]) -> None:
        """Into the session the base class commits (or rolls back) next. A running trial has none of these
        attributes yet, so they are plain inserts (Optuna's per-attribute upsert costs a SELECT and an ORM
        statement each, about 0.8 ms); an attribute set before falls back to that upsert."""
        from optuna.storages._rdb import models

        tables = ((models.TrialSystemAttributeModel, system), (models.TrialUserAttributeModel, user))
        session = self.scoped_session()

        def run_statements() -> None:
            for statement in statements:
                if session.execute(statement).rowcount != 1:  # type: ignore[attr-defined]
                    raise RuntimeError(f"a staged write for trial id {trial_id} changed no row: {statement}")

        try:
            try:
                run_statements()
                for model, attrs in tables:
                    if attrs:
                        session.execute(sa.insert(model.__table__), [
                            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()])
            except sa.exc.IntegrityError:  # an attribute was set before: again, updating it in place
                session.rollback()
                run_statements()
                for model, attrs in tables:
                    for key, value in attrs.items():
                        self._set_trial_attr_without_commit(session, model, trial_id, key, value)
        except BaseException:
            session.rollback()
            raise


def tell(study: optuna.Study, trial: optuna.trial.Trial | int, values: list[float] | None) -> None:
    """`study.tell(trial, values)` (FAIL when `values` is None), skipped if the trial is finished, and
    without what `Study.tell` does after telling: read the finished trial back with all its relations and
    deep-copy it for a return value the coordinator does not use (about a millisecond per trial)."""
    state = optuna.trial.TrialState.COMPLETE if values is not None else optuna.trial.TrialState.FAIL
    try:
        from optuna.study._tell import _tell_with_warning
    except ImportError:  # pragma: no cover - a future Optuna without it: the public call
        study.tell(trial, values, state=state, skip_if_finished=True)
        return
    _tell_with_warning(study, trial, values, state=state, skip_if_finished=True)


def study_storage(study: optuna.Study) -> StudyStorage:
    """The `StudyStorage` under a study opened on `optuna_storage` (Optuna wraps it in a cache)."""
    backend = getattr(study._storage, "_backend", study._storage)
    assert isinstance(backend, StudyStorage), "studies are opened on optuna_storage()"
    return backend


def make_sampler(cfg: JobConfig) -> optuna.samplers.BaseSampler:
    """A fresh sampler (Optuna does not persist samplers, so resume rebuilds it from the config).

    Feasibility reaches the sampler through each trial's constraint (`Trial.set_constraint`), so TPE
    and NSGA-II both search with the accuracy constraint rather than a weighted sum.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cfg.sampler == "tpe":
            startup = max(4, min(10, (cfg.n_trials or 40) // 4))
            return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup, multivariate=True,
                                              group=True, constant_liar=True)
        if cfg.sampler == "nsga2":
            population = max(8, min(50, (cfg.n_trials or 200) // 4))
            return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=population)
        if cfg.sampler == "random":
            return optuna.samplers.RandomSampler(seed=cfg.seed)
    raise UserError(f"unknown sampler {cfg.sampler!r}; use tpe, nsga2 or random")


def optuna_storage(url: str) -> StudyStorage:
    from optagent.storage import sqlite_creator

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"creator": sqlite_creator(url)}
    return StudyStorage(url, engine_kwargs=kwargs)


def trial_dict(t: Trial) -> dict[str, Any]:
    """The JSON view of a trial used by hooks, --json output and reports."""
    return {
        "number": t.number, "state": t.state, "recipe": t.recipe, "params": t.params, "metrics": t.metrics,
        "values": t.values, "feasible": t.feasible, "on_front": t.on_front, "failure_reason": t.failure_reason,
        "notes": t.notes, "duration_s": t.duration_s, "worker": t.worker, "hardware": t.hardware,
    }


def job_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "name": job.name, "status": job.status, "model_path": job.model_path,
        "model_hash": job.model_hash, "config": job.config, "error": job.error,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def make_payload(cfg: JobConfig, job: dict[str, Any], model_path: str, model_hash: str, number: int,
                 params: dict[str, dict[str, Any]], source_b64: str | None = None) -> dict[str, Any]:
    """The JSON a worker needs to run (or rebuild) trial `number`; see optagent.pipeline for the fields.

    Trial seeds are derived from the job seed and the trial number, so any trial can be rebuilt exactly
    (`optagent export`, `apply`, `profile`, the confirmation pass).
    """
    return {
        "trial": number, "job": job, "model": {"path": model_path, "sha256": model_hash, "source_b64": source_b64},
        "params": params, "strategies": list(cfg.strategies), "objectives": list(cfg.objectives),
        "seed": cfg.seed + number, "threads": cfg.threads, "device": cfg.device, "measure": cfg.measure,
        "exclusive_measure": cfg.executor == "local" and cfg.workers > 1,
        "time_limit_s": cfg.trial_timeout_s, "max_attempts": cfg.max_attempts,
    }


def payload_for(job: Job, trial: Trial) -> dict[str, Any]:
    """Rebuild the payload of a stored trial (the model file must still match the job's hash)."""
    return make_payload(JobConfig.from_json(job.config), {"id": job.id, "name": job.name}, job.model_path,
                        job.model_hash, trial.number, trial.params)


def create_job(engine: Engine, cfg: JobConfig, name: str | None, model_hash: str) -> Job:
    with Session(engine) as session:
        if name and session.exec(_select_job_by_name(name)).first() is not None:
            raise UserError(f"a job named {name!r} already exists; pick another --name or `optagent resume {name}`")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        job = Job(name=name or f"{Path(cfg.model_path).stem}-{stamp}", study_name="", model_path=cfg.model_path,
                  model_hash=model_hash, config=cfg.to_json(), status="pending")
        session.add(job)
        session.commit()
        session.refresh(job)
        if session.exec(_select_job_by_name(job.name)).all().__len__() > 1:  # pragma: no cover - race
            raise UserError(f"job name {job.name!r} is taken; pass --name")
        job.study_name = f"optagent-{job.id}-{job.name}"
        session.add(job)
        session.commit()
        session.refresh(job)
        return job


def _select_job_by_name(name: str) -> Any:
    from sqlmodel import select

    return select(Job).where(Job.name == name)


class Coordinator:
    """Runs (or resumes) one job to the end of its budget."""

    HEARTBEAT_S = 5.0

    def __init__(self, engine: Engine, url: str, job_id: int, registry: Registry, executor: Executor,
                 on_event: EventSink | None = None, hooks: Any = None):
        self.engine, self.registry, self.executor = engine, registry, executor
        self.on_event = on_event or (lambda kind, data: None)
        self.hooks = hooks if hooks is not None else registry.pm.hook
        with Session(engine) as s:
            job = s.get(Job, job_id)
            if job is None:  # pragma: no cover - callers pass ids they just read
                raise UserError(f"no job with id {job_id}")
            self.job_id, self.job_name, self.study_name = job_id, job.name, job.study_name
            self.model_path, self.model_hash = job.model_path, job.model_hash
        self.cfg = JobConfig.from_json(self._job().config)
        self.objectives = self.cfg.parsed_objectives
        self.strategies = [registry.strategy(name) for name in self.cfg.strategies]
        self._unsearched = [s for name, s in registry.strategies.items() if name not in self.cfg.strategies]
        self._fixed: dict[str, Any] = {}  # their off params, which cross-strategy conditions read; see _setup_space
        self.study = optuna.create_study(
            storage=optuna_storage(url), study_name=self.study_name, load_if_exists=True,
            directions=[o.direction for o in self.objectives], sampler=make_sampler(self.cfg))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names([o.metric for o in self.objectives])
        # what optuna-dashboard shows about the job (it does not read Optuna 5's named constraints)
        self.study.set_user_attr("optagent_job", self.job_name)
        self.study.set_user_attr("model_path", self.model_path)
        self.study.set_user_attr("model_sha256", self.model_hash)
        self.study.set_user_attr("constraint",
                                 f"{self.cfg.constraint_metric} >= baseline - {self.cfg.max_accuracy_drop}")
        self._front: dict[int, list[float]] = {}
        self._live: dict[int, optuna.trial.Trial] = {}
        self._dispatched: dict[int, tuple[dict[str, Any], str]] = {}  # number -> (params, recipe) until told
        self._references: dict[str, float] = {}  # reference_key -> the job's reference latency (ms)
        self._finished: set[int] = set()  # searched trials told to Optuna (complete or failed)
        self._failed = 0
        self._job_json = job_dict(self._job())
        self._last_beat = 0.0
        self._source_b64: str | None = None
        self.space: SpaceContext | None = None
        self.baseline: dict[str, float] | None = None

    # -- small helpers --------------------------------------------------------------------------------
    def _job(self) -> Job:
        with Session(self.engine) as s:
            job = s.get(Job, self.job_id)
            assert job is not None
            return job

    def _update_job(self, **changes: Any) -> Job:
        with Session(self.engine) as s:
            job = s.get(Job, self.job_id)
            assert job is not None
            for key, value in changes.items():
                setattr(job, key, value)
            s.add(job)
            s.commit()
            s.refresh(job)
            return job

    def _emit(self, kind: str, **data: Any) -> None:
        try:
            self.on_event(kind, data)
        except Exception:  # progress output must never stop a search
            log.debug("progress sink failed", exc_info=True)

    def _payload(self, number: int, params: dict[str, dict[str, Any]]) -> dict[str, Any]:
        if self.cfg.executor != "local" and self._source_b64 is None:
            self._source_b64 = base64.b64encode(Path(self.model_path).read_bytes()).decode()
        return make_payload(self.cfg, {"id": self.job_id, "name": self.job_name}, self.model_path,
                            self.model_hash, number, params, self._source_b64)

    def _calibrated(self, result: dict[str, Any]) -> dict[str, Any]:
        """The result with its latencies on the job's reference scale (`optagent.measure.calibrate`). The
        reference per worker and batch is the interleaved baseline latency of the first trial told there
        (the baseline trial's, at the default batch); it is stored with every trial (latency_reference_ms),
        so a resumed job keeps it."""
        metrics = result.get("metrics") or {}
        if result.get("state") != "complete" or "batch_size" not in metrics:
            return result
        key = _reference_key(result.get("worker"), metrics["batch_size"])
        calibrated = calibrate(metrics, self._references.get(key))
        if "latency_reference_ms" in calibrated:
            self._references.setdefault(key, float(calibrated["latency_reference_ms"]))
        return {**result, "metrics": calibrated}

    def _note_reference(self, metrics: dict[str, Any], worker: dict[str, Any] | None) -> None:
        """On resume: the reference a stored trial was calibrated by."""
        if worker and "latency_reference_ms" in metrics and "batch_size" in metrics:
            self._references.setdefault(_reference_key(worker, metrics["batch_size"]),
                                        float(metrics["latency_reference_ms"]))

    def _beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_beat > self.HEARTBEAT_S:
            self._last_beat = now
            job = self._update_job(heartbeat_at=utcnow())
            if job.status == "cancelling":
                raise _Cancelled()

    # -- the baseline ---------------------------------------------------------------------------------
    def _run_baseline(self) -> None:
        """Trial 0: every strategy off, measured exactly like every other trial; then added to the study."""
        with Session(self.engine) as s:
            row = get_trial(s, self.job_id, 0)
        if row is None or row.state != "complete":
            self._store_dispatch(0, {})
            self.executor.submit(0, self._payload(0, {}))
            self._emit("baseline_started")
            result = None
            while result is None:
                for outcome in self.executor.poll(1.0):
                    if outcome.number == 0:
                        result = outcome.result
                self._beat()
            result = self._calibrated(result)
            if result["state"] != "complete":
                reason = result.get("failure_reason") or "unknown"
                self._store_result(0, result, values=None, feasible=None)
                raise UserError(f"the baseline trial failed: {reason}; fix the model file (try `optagent check "
                                f"{self.model_path}`)")
            try:
                self._setup_space(result)
            except UserError as exc:
                self._store_result(0, {**result, "state": "failed", "failure_reason": str(exc)}, None, None)
                raise
            values = self._objective_values(result["metrics"])
            self._store_result(0, result, values=values, feasible=True)
        else:
            self._setup_space({"capabilities": row.hardware.get("capabilities"),
                               "model_info": row.hardware.get("model_info"), "metrics": row.metrics})
            self._note_reference(row.metrics, row.worker)
            values = row.values
        assert self.baseline is not None and values is not None and self.space is not None
        if not any(t.number == 0 or t.user_attrs.get("optagent_number") == 0 for t in self.study.get_trials()):
            off = {s.name: s.off_params(self.space) for s in self.strategies}
            flat, dists = study_point(self.strategies, self.space, off, self._fixed)
            frozen = optuna.trial.create_trial(params=flat, distributions=dists, values=values,
                                               user_attrs={"optagent_number": 0, "baseline": True})
            frozen.set_constraint(CONSTRAINT, 0.0)
            self.study.add_trial(frozen)
        self._update_front(0, values)
        self.study.set_user_attr("baseline_metrics", self.baseline)
        self._emit("baseline", metrics=self.baseline)

    def _setup_space(self, result: dict[str, Any]) -> None:
        metrics = result["metrics"]
        missing = [o.metric for o in self.objectives if o.metric not in metrics]
        if self.cfg.constraint_metric not in metrics and self.cfg.max_accuracy_drop is not None:
            missing.append(self.cfg.constraint_metric)
        if missing:
            known = ", ".join(sorted(metrics))
            raise UserError(f"metric {', '.join(dict.fromkeys(missing))} is not measured; measured metrics: {known}; "
                            "pick objectives/--constraint-metric from these")
        self.baseline = {k: float(v) for k, v in metrics.items()}
        caps = Capabilities(**{**result["capabilities"], "cpu_flags": tuple(result["capabilities"]["cpu_flags"]),
                               "quantized_engines": tuple(result["capabilities"]["quantized_engines"]),
                               "gpu_capability": tuple(result["capabilities"]["gpu_capability"])
                               if result["capabilities"].get("gpu_capability") else None})
        info = result.get("model_info") or {}
        self.space = SpaceContext(capabilities=caps, objectives=self.objectives,
                                  default_batch_size=int(info.get("default_batch_size", 1)),
                                  has_conv=bool(info.get("has_conv", True)),
                                  has_linear=bool(info.get("has_linear", True)))
        # installed strategies this job does not search sit at their off params (conditions may read them)
        self._fixed = {s.name: s.off_params(self.space) for s in self._unsearched}

    # -- objectives, constraints, the front --------------------------------------------------------------
    def _objective_values(self, metrics: dict[str, float]) -> list[float] | None:
        try:
            return [float(metrics[o.metric]) for o in self.objectives]
        except KeyError:
            return None

    def _constraint(self, metrics: dict[str, float]) -> float:
        """<= 0 when feasible: the constraint metric may drop at most max_accuracy_drop below the baseline."""
        assert self.baseline is not None
        if self.cfg.max_accuracy_drop is None:
            return 0.0
        floor = self.baseline[self.cfg.constraint_metric] - self.cfg.max_accuracy_drop
        return floor - float(metrics[self.cfg.constraint_metric])

    def _update_front(self, number: int, values: list[float]) -> set[int]:
        """Incremental Pareto update (O(front size)); returns trial numbers whose flag changed."""
        signs = [1.0 if o.direction == "maximize" else -1.0 for o in self.objectives]
        changed = pareto.insert(self._front, number, values, signs)
        if changed:
            with Session(self.engine) as s:
                for n in changed:
                    row = get_trial(s, self.job_id, n)
                    if row is not None:
                        row.on_front = n in self._front
                        s.add(row)
                s.commit()
        return changed

    # -- storage of trials ------------------------------------------------------------------------------
    def _recipe(self, params: dict[str, Any]) -> str:
        if self.space is None or not params:
            return "baseline"
        parts = []
        for strategy in self.strategies:
            p = params.get(strategy.name)
            if p and not strategy.is_off(p, self.space):
                parts.append(f"{strategy.name}({', '.join(f'{k}={_short(v)}' for k, v in p.items())})")
        return " + ".join(parts) or "baseline"

    def _store_dispatch(self, number: int, params: dict[str, Any], new: bool = False) -> None:
        with Session(self.engine) as s:
            row = (None if new else get_trial(s, self.job_id, number)) or Trial(job_id=self.job_id, number=number)
            row.state, row.params, row.recipe = "running", params, self._recipe(params)
            self._dispatched[number] = (row.params, row.recipe)
            s.add(row)
            s.commit()

    @staticmethod
    def _result_fields(result: dict[str, Any], values: list[float] | None, feasible: bool | None) -> dict[str, Any]:
        """The columns of a trial row that a result sets."""
        hardware = dict(result.get("hardware") or {})
        if result.get("capabilities"):
            hardware["capabilities"] = result["capabilities"]
        if result.get("model_info"):
            hardware["model_info"] = result["model_info"]
        return {"state": "complete" if result["state"] == "complete" else "failed",
                "metrics": result.get("metrics", {}), "samples": result.get("samples", {}), "values": values,
                "feasible": feasible, "failure_reason": result.get("failure_reason"),
                "notes": result.get("notes", []), "duration_s": result.get("duration_s"), "hardware": hardware,
                "worker": result.get("worker", {}), "finished_at": utcnow()}

    def _store_result(self, number: int, result: dict[str, Any], values: list[float] | None,
                      feasible: bool | None) -> Trial:
        """Store a result in its own transaction (the baseline, which is not told); searched trials' results
        go into their tell's transaction (`_tell`)."""
        with Session(self.engine, expire_on_commit=False) as s:  # the row stays readable: no re-SELECT
            row = get_trial(s, self.job_id, number) or Trial(job_id=self.job_id, number=number)
            for key, value in self._result_fields(result, values, feasible).items():
                setattr(row, key, value)
            s.add(row)
            s.commit()
            return row

    # -- the loop --------------------------------------------------------------------------------------
    def _ask(self) -> None:
        assert self.space is not None
        trial = self.study.ask()
        params = suggest_all(trial, self.strategies, self.space, self._fixed)
        self._live[trial.number] = trial
        # sent first, recorded while the worker picks it up; a crash in between leaves a RUNNING Optuna trial
        # without a row, which resume recovers (_recover_unrecorded)
        self.executor.submit(trial.number, self._payload(trial.number, params))
        self._store_dispatch(trial.number, params, new=True)
        self._emit("trial_started", number=trial.number, params=params)
        self.hooks.optagent_trial_started(job=self._job_json, trial={"number": trial.number, "params": params})

    def _tell(self, number: int, result: dict[str, Any]) -> None:
        if number in self._finished:
            return  # a duplicate (redelivered) result: the first one counts
        result = self._calibrated(result)
        metrics = result.get("metrics", {})
        values = self._objective_values(metrics) if result["state"] == "complete" else None
        if result["state"] == "complete" and values is None:
            missing = [o.metric for o in self.objectives if o.metric not in metrics]
            result = {**result, "state": "failed", "failure_reason": f"objective metric {', '.join(missing)} missing"}
        feasible = self._constraint(metrics) <= 0 if values is not None else None
        fields = self._result_fields(result, values, feasible)
        if number not in self._dispatched:  # sent by an earlier coordinator
            sent = self._row(number)
            self._dispatched[number] = (sent.params, sent.recipe) if sent else ({}, "")
        params, recipe = self._dispatched.pop(number)
        row = Trial(job_id=self.job_id, number=number, params=params, recipe=recipe, **fields)
        table = Trial.__table__
        update = sa.update(table).where(table.c.job_id == self.job_id, table.c.number == number).values(**fields)
        live = self._live.pop(number, None)
        self._tell_study(live or self._trial_handle(number), row, update)  # the row is written with the tell
        self._finished.add(number)
        self._failed += values is None
        if feasible and values is not None:
            self._update_front(number, values)
            row.on_front = number in self._front
        self._emit("trial_finished", trial=trial_dict(row), counts=self.counts())
        self.hooks.optagent_trial_finished(job=self._job_json, trial=trial_dict(row))

    def _tell_study(self, trial: optuna.trial.Trial, row: Trial, *statements: Any) -> None:
        """Tell Optuna a result, with its constraint and what optuna-dashboard shows for it (one user
        attribute), in one transaction with `statements` (the result row's update)."""
        shown: dict[str, Any] = {"optagent_number": row.number, "recipe": row.recipe}
        system: dict[str, Any] = {}
        if row.values is not None:
            c = self._constraint(row.metrics)
            system[f"constraints:{CONSTRAINT}"] = c  # what Trial.set_constraint stores (it re-reads all attrs)
            shown.update(feasible=c <= 0, **{CONSTRAINT: c},
                         **{k: row.metrics[k] for k in ("speedup", "model_size_mb") if k in row.metrics})
        else:
            shown["failure_reason"] = str(row.failure_reason)[:1000]
        storage = study_storage(self.study)
        storage.stage(trial._trial_id, statements=statements, system=system, user={"optagent": shown})
        tell(self.study, trial, row.values)
        if storage.unstage(trial._trial_id) and statements:  # Optuna had it finished already: store it alone
            with self.engine.begin() as conn:
                for statement in statements:
                    conn.execute(statement)

    def _trial_handle(self, number: int) -> optuna.trial.Trial:
        """A handle on a RUNNING trial asked by an earlier coordinator (resume). Optuna has no public
        lookup from trial number to a Trial, so this uses the storage's id mapping."""
        storage = self.study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        return optuna.trial.Trial(self.study, trial_id)

    def counts(self) -> dict[str, int]:
        """Progress counters, kept in memory so a long search does not re-read every trial per step."""
        return {"complete": len(self._finished) - self._failed, "failed": self._failed,
                "running": len(self.executor.in_flight()), "budget": self.cfg.n_trials or 0,
                "front": len(self._front)}

    def _resubmit_in_flight(self) -> None:
        """After a coordinator restart: send again every trial the database says was dispatched."""
        with Session(self.engine) as s:
            rows = [r for r in job_trials(s, self.job_id) if r.number > 0]
        if self._recover_unrecorded({r.number for r in rows}):
            with Session(self.engine) as s:
                rows = [r for r in job_trials(s, self.job_id) if r.number > 0]
        for row in rows:
            if row.state in ("running", "queued"):
                self.executor.submit(row.number, self._payload(row.number, row.params))
            elif row.state in ("complete", "failed"):
                self._finished.add(row.number)
                self._failed += row.state == "failed"
                self._note_reference(row.metrics, row.worker)
                if row.feasible and row.values is not None:
                    self._update_front(row.number, row.values)
        frozen = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for row in rows:
            t = frozen.get(row.number)
            if t is not None and t.state == optuna.trial.TrialState.RUNNING and row.state in ("complete", "failed"):
                self._tell_study(self._trial_handle(row.number), row)  # stored, but the tell was lost: tell now

    def _recover_unrecorded(self, recorded: set[int]) -> bool:
        """Trials an earlier coordinator asked and perhaps sent, but did not record (`_ask` sends before it
        writes the row). Their params are rebuilt from the study, exactly as they were sampled, and the row
        written; the resubmission that follows reuses the trial's task id, so a trial that did go out runs
        once. A trial asked but not fully sampled never went out: it is failed in Optuna, with the reason."""
        assert self.space is not None
        recovered = False
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for t in running:
            if t.number == 0 or t.number in recorded:
                continue
            recovered = True
            try:
                params = sample(self.strategies, self.space, lambda key, _d, t=t: t.params[key], self._fixed)
            except KeyError:
                log.warning("trial %s was asked but never sent (the coordinator stopped while sampling it); "
                            "failing it", t.number)
                reason = "the coordinator stopped before the trial was sent"
                study_storage(self.study).stage(t._trial_id, system={}, user={
                    "optagent": {"optagent_number": t.number, "failure_reason": reason}})
                tell(self.study, t.number, None)
                continue
            self._store_dispatch(t.number, params, new=True)
        return recovered

    def run(self) -> Job:
        job = self._update_job(status="running", started_at=self._job().started_at or utcnow(), error=None)
        self.hooks.optagent_job_started(job=job_dict(job))
        deadline = time.monotonic() + self.cfg.timeout_s if self.cfg.timeout_s else None
        status, error = "completed", None
        try:
            self._run_baseline()
            self._resubmit_in_flight()
            budget = self.cfg.n_trials
            while True:
                self._beat()
                finished = len(self._finished)
                inflight = self.executor.in_flight()
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if (budget is not None and finished >= budget) or (out_of_time and not inflight):
                    break
                while (not out_of_time and len(inflight) < self.executor.capacity
                       and (budget is None or finished + len(inflight) < budget)):
                    self._ask()
                    inflight = self.executor.in_flight()
                for outcome in self.executor.poll(0.5):
                    self._tell(outcome.number, outcome.result)
            if self.cfg.confirm:
                self._confirm()
        except _Cancelled:
            status, error = "cancelled", "cancelled by `optagent cancel`"
            self._abandon_in_flight("cancelled")
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted; `optagent resume` continues it"
            self._abandon_in_flight("interrupted")
        except UserError as exc:
            status, error = "failed", str(exc)
            self._abandon_in_flight("failed")
        finally:
            self.executor.close()
        job = self._update_job(status=status, error=error, finished_at=utcnow())
        self._job_json = job_dict(job)
        front = [trial_dict(t) for t in self.pareto_rows()]
        self.hooks.optagent_job_finished(job=self._job_json, pareto=front)
        self._emit("job_finished", job=self._job_json, pareto=front)
        if status == "failed":
            raise UserError(error or "the job failed")
        return job

    def _abandon_in_flight(self, state: str) -> None:
        """Cancel or fail: stop in-flight trials. Interrupted: leave them (Celery workers finish them and
        `optagent resume` collects the results; local processes end with the coordinator)."""
        if state == "interrupted":
            return
        self.executor.cancel()
        with Session(self.engine) as s:
            for row in job_trials(s, self.job_id):
                if row.state in ("running", "queued"):
                    row.state = "cancelled"
                    s.add(row)
                    if row.number > 0:
                        trial = self._live.pop(row.number, None) or self._trial_handle(row.number)
                        self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            s.commit()
        for trial in self._live.values():  # asked, but the send failed before it had a row
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        self._live.clear()

    def _confirm(self) -> None:
        """Re-measure the Pareto trials interleaved with the baseline in fresh processes (optagent.confirm):
        the speedups shown at the end are those ratios with their noise band, and ties are called ties."""
        candidates = {n: row for n, row in ((n, self._row(n)) for n in sorted(self._front) if n > 0) if row}
        if not candidates:
            return
        processes = max(1, self.cfg.confirm_processes)
        payload = {**self._payload(-1, {}), "kind": "confirm", "seed": self.cfg.seed, "processes": processes,
                   "candidates": {str(n): {"params": row.params, "seed": self.cfg.seed + n,
                                           "speedup_low": row.metrics.get("speedup_low"),
                                           "speedup_high": row.metrics.get("speedup_high")}
                                  for n, row in candidates.items()}}
        # local workers time under the host lock, so one process can build while another times
        payload["parallel"] = min(processes, self.cfg.workers) if payload.get("exclusive_measure") else 1
        if self.cfg.trial_timeout_s:
            payload["time_limit_s"] = self.cfg.trial_timeout_s * (len(candidates) + 1) * processes
        self._emit("confirm_started", trials=sorted(candidates), processes=processes, parallel=payload["parallel"])
        self.executor.submit(-1, payload)
        result = None
        while result is None:
            self._beat()
            result = next((o.result for o in self.executor.poll(1.0) if o.number == -1), None)
        if result.get("state") != "complete":
            log.warning("confirmation pass failed: %s", result.get("failure_reason"))
            self._emit("confirmed", ok=False, reason=result.get("failure_reason"))
            return
        with Session(self.engine) as s:
            for key, conf in result.get("confirmations", {}).items():
                row = get_trial(s, self.job_id, int(key))
                if row is None:
                    continue
                if "error" in conf:
                    row.notes = [*row.notes, f"confirmation failed: {conf['error']}"]
                else:
                    ref = self._references.get(_reference_key(result.get("worker"), conf.get("batch_size") or 0))
                    latency = ref / conf["speedup"] if ref and conf["speedup"] > 0 else conf["latency_ms"]
                    row.metrics = {**row.metrics, **confirmed_metrics(conf), "confirmed_latency_ms": latency}
                    row.notes = [*row.notes, f"confirmed vs baseline: {conf['vs_baseline']}"]
                s.add(row)
            s.commit()
        self._emit("confirmed", ok=True, confirmations=result.get("confirmations", {}),
                   notes=result.get("notes", []))

    def _row(self, number: int) -> Trial | None:
        with Session(self.engine) as s:
            return get_trial(s, self.job_id, number)

    def pareto_rows(self) -> list[Trial]:
        with Session(self.engine) as s:
            return [t for t in job_trials(s, self.job_id) if t.on_front]


def confirmed_metrics(conf: dict[str, Any]) -> dict[str, Any]:
    """A trial's metrics from its entry in a confirmation result (optagent.confirm)."""
    out = {"confirmed_speedup": conf["speedup"], "confirmed_speedup_low": conf["low"],
           "confirmed_speedup_high": conf["high"], "tie_group": conf["tie_group"]}
    if "ci_low" in conf:
        out.update(confirmed_speedup_ci_low=conf["ci_low"], confirmed_speedup_ci_high=conf["ci_high"],
                   confirmed_speedup_runs=conf["runs"], confirmed_processes=conf["processes"])
    if conf.get("noise") is not None:
        out["confirmed_noise"] = conf["noise"]
    if conf.get("phase_noise") is not None:
        out["confirmed_phase_noise"] = conf["phase_noise"]
    return out


def _reference_key(worker: dict[str, Any] | None, batch: Any) -> str:
    """The job's reference latency that applies to a result from `worker` at inference batch `batch`."""
    worker = worker or {}
    return reference_key(str(worker.get("host", "")), worker.get("gpu"), int(batch))


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class _Cancelled(Exception):
    pass
