"""optagent as a library: search, resume, cancel, and read jobs, returning typed objects.

The CLI only parses arguments and prints what these return; benchmarks and tests call them directly.

    from optagent import api
    report = api.search("examples/digits_cnn.py", trials=10, db="sqlite:///demo.db")
    for t in report.pareto:
        print(t.number, t.metrics["speedup"], t.recipe)

A bad input raises `optagent.UserError` before a job row exists. Where a call runs a search it returns
when the job ends (completed, cancelled, interrupted); a job that fails raises UserError with its reason.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from optagent.errors import UserError
from optagent.job import JobConfig, JobStatus, TrialState

EventSink = Callable[[str, dict[str, Any]], None]
STALE_AFTER_S = 60.0  # a running job whose coordinator was silent this long has no live coordinator


@dataclass(frozen=True)
class JobReport:
    """A job and its trials as stored (SQLModel rows), with the views the read commands show."""

    job: Any  # optagent.storage.Job
    trials: list[Any] = field(default_factory=list)  # optagent.storage.Trial, by number

    @property
    def config(self) -> JobConfig:
        return JobConfig.of(self.job)

    @property
    def status(self) -> JobStatus:
        return JobStatus(self.job.status)

    @property
    def baseline(self) -> Any | None:
        return next((t for t in self.trials if t.number == 0 and t.state == TrialState.COMPLETE), None)

    @property
    def pareto(self) -> list[Any]:
        """The Pareto trials, fastest first (ties by their confirmed rank)."""
        rows = [t for t in self.trials if t.on_front]
        return sorted(rows, key=lambda t: (t.metrics.get("tie_group", 0),
                                           -(t.metrics.get("confirmed_speedup") or t.metrics.get("speedup") or 0.0)))

    @property
    def coordinator_stale_s(self) -> float | None:
        """Seconds since a `running` job's coordinator was last seen, when that is longer than STALE_AFTER_S."""
        from optagent.storage import utcnow

        if self.job.status not in (JobStatus.RUNNING, JobStatus.CANCELLING) or self.job.heartbeat_at is None:
            return None
        silent = (utcnow() - _aware(self.job.heartbeat_at)).total_seconds()
        return silent if silent > STALE_AFTER_S else None

    def counts(self) -> dict[str, Any]:
        searched = [t for t in self.trials if t.number > 0]
        feasible = [t for t in searched if t.state == TrialState.COMPLETE and t.feasible]
        return {
            **{state.value: sum(t.state == state for t in searched) for state in TrialState},
            "budget": self.config.n_trials,
            "best_feasible_speedup": max((t.metrics.get("speedup", 0.0) for t in feasible), default=None),
            "pareto_size": sum(t.on_front for t in self.trials),
        }


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _engine(db: str | None) -> tuple[Any, str]:
    from optagent.storage import init_db, normalize_url

    url = normalize_url(db)
    return init_db(url), url


def report(job: str, db: str | None = None) -> JobReport:
    """A job (by id or name) and its trials."""
    from optagent.storage import find_job, job_trials

    engine, _ = _engine(db)
    with Session(engine) as s:
        row = find_job(s, str(job))
        return JobReport(row, job_trials(s, row.id or 0))


def status(job: str, db: str | None = None) -> JobReport:
    """A job's progress: the job row and every trial (`JobReport.counts()` sums them up)."""
    return report(job, db)


def pareto(job: str, db: str | None = None) -> list[Any]:
    """A job's Pareto trials, fastest first."""
    return report(job, db).pareto


def jobs(db: str | None = None) -> list[JobReport]:
    from optagent.storage import Job, job_trials

    engine, _ = _engine(db)
    with Session(engine) as s:
        return [JobReport(j, job_trials(s, j.id or 0)) for j in s.exec(select(Job).order_by(Job.id))]


def _executor(cfg: JobConfig, broker: str | None, job_key: str, job_name: str) -> Any:
    if broker:
        from optagent.executors.celery import CeleryExecutor

        return CeleryExecutor(broker, queue=cfg.queue, job_key=job_key, max_attempts=cfg.max_attempts,
                              broker_retry_s=cfg.broker_retry_s, job_name=job_name)
    from optagent.executors.local import LocalExecutor

    return LocalExecutor(workers=cfg.workers, time_limit_s=cfg.trial_timeout_s)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a service stop, a closed terminal) stop the coordinator like Ctrl-C: the job ends
    `interrupted`, so `optagent resume` continues it, instead of staying `running` with no coordinator."""
    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(engine: Any, url: str, job_id: int, broker: str | None, registry: Any, on_event: EventSink | None,
         executor: Any = None) -> JobReport:
    from optagent.search import Coordinator
    from optagent.storage import Job, utcnow

    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        cfg, key, name = JobConfig.of(job), job.key or f"job{job.id}", job.name
    with _signals_interrupt():
        try:
            executor = executor or _executor(cfg, broker, key, name)
            coordinator = Coordinator(engine, url, job_id, registry, executor, on_event=on_event)
        except BaseException as exc:  # nothing ran: the job says why instead of staying pending
            from optagent.security import redact_text

            with Session(engine) as s:
                row = s.get(Job, job_id)
                if row is not None and row.status == JobStatus.PENDING:
                    row.status, row.finished_at = JobStatus.FAILED, utcnow()
                    row.error = redact_text(str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
                    s.add(row)
                    s.commit()
            raise
        coordinator.run()
    return report(str(job_id), url)


def _free_default_name(engine: Any, cfg: JobConfig) -> str:
    """`<model stem>-<stamp>` made a valid job name, `-2`, `-3`... when searches started in the same second."""
    from optagent.job import default_name
    from optagent.storage import Job

    base = default_name(cfg.model_path, dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    name, taken = base, 1
    with Session(engine) as s:
        while s.exec(select(Job).where(Job.name == name)).first() is not None:
            taken += 1
            name = f"{base}-{taken}"
    return name


def _check_strategies(names: list[str], registry: Any) -> None:
    from optagent.job import did_you_mean

    known = sorted(registry.strategies)
    for n in names:
        if n not in registry.strategies:
            raise UserError(f"unknown strategy {n!r}{did_you_mean(n, known)}; installed strategies: "
                            f"{', '.join(known) or 'none'} (see `optagent plugins`)")


def _check_metrics(cfg: JobConfig, found: Any, registry: Any) -> None:
    """Objectives and the constraint metric against what a trial will report: the model file's metrics (from
    the preflight's one evaluation), optagent's measurements and the plugins' metrics."""
    from optagent.job import did_you_mean
    from optagent.metrics import RESERVED

    measured = found.metric_names()
    known = sorted(set(measured) | RESERVED | set(registry.metrics))
    wanted = [("--objective", o.metric) for o in cfg.parsed_objectives]
    if cfg.max_accuracy_drop is not None or cfg.max_relative_drop is not None:
        wanted.append(("--constraint-metric", cfg.constraint_name))
    for option, metric in wanted:
        if metric not in known:
            builtin = ", ".join(["latency_ms", "throughput", "speedup", *sorted(registry.metrics)])
            raise UserError(f"{option} {metric}: no trial measures {metric!r}{did_you_mean(metric, known)}; "
                            f"evaluate() returns {', '.join(measured) or 'nothing'} and optagent measures "
                            f"{builtin} (docs/metrics.md)")


def _check_broker(broker: str, insecure: bool) -> None:
    from optagent.security import require_secret
    from optagent.workers.celery_app import BrokerUrl, check_broker

    BrokerUrl.parse(broker)  # a malformed URL is named as such, before anything else is said about it
    require_secret(broker, insecure, "optagent search")
    check_broker(broker)  # a URL that parses, and a server that answers


def search(model: str | os.PathLike[str], *, db: str | None = None, broker: str | None = None,
           name: str | None = None, on_event: EventSink | None = None, registry: Any = None,
           executor: Any = None, import_timeout_s: float = 60.0, insecure: bool = False,
           **options: Any) -> JobReport:
    """Search strategy compositions for a model file; `options` are `JobConfig` fields (n_trials,
    objectives, strategies, workers, threads, ...). Returns when the job ends.

    Everything is checked before the job row is written, cheapest first: the options, the name, the
    database, the broker (reachable; OPTAGENT_SECRET unless on loopback or `insecure`), then the model file
    in a child process under `import_timeout_s` per piece (optagent.preflight), whose one evaluation
    gives the metric names the objectives and the constraint are checked against, and whether --device
    cuda can work here."""
    from optagent import preflight
    from optagent.contract import sha256_bytes
    from optagent.job import validate_name
    from optagent.registry import build_registry
    from optagent.search import create_job
    from optagent.storage import Job

    unknown = sorted(set(options) - set(JobConfig.__dataclass_fields__) - {"model_path"})
    if unknown:
        raise UserError(f"unknown search option {', '.join(unknown)}; see optagent.job.JobConfig for the options")
    if name is not None:
        validate_name(name)
    registry = registry or build_registry()
    strategies = options.pop("strategies", None)
    names = list(registry.strategies) if strategies is None else [s.strip() for s in strategies if s.strip()]
    _check_strategies(names, registry)
    options = {k: v for k, v in options.items() if v is not None or k in ("n_trials", "timeout_s")}
    workers = int(options.get("workers") or 1)
    options.setdefault("threads", max(1, (os.cpu_count() or 1) // workers))
    options["executor"] = "celery" if broker else "local"
    cfg = JobConfig(model_path=str(Path(model).resolve()), strategies=names, **options).validate()
    engine, url = _engine(db)
    if name is not None:
        with Session(engine) as s:
            if s.exec(select(Job).where(Job.name == name)).first() is not None:
                raise UserError(f"a job named {name!r} already exists; pick another --name or "
                                f"`optagent resume {name}`")
    if broker and executor is None:
        _check_broker(broker, insecure)
    found = preflight.run(model, timeout_s=import_timeout_s)
    found.raise_first()
    _check_metrics(cfg, found, registry)
    if cfg.device == "cuda" and not broker and not found.cuda:
        raise UserError("--device cuda: torch sees no usable CUDA device on this machine; use --device cpu (or "
                        "auto), or send the trials to GPU workers with --broker")
    digest = sha256_bytes(Path(model).read_bytes())
    job = create_job(engine, cfg, name or _free_default_name(engine, cfg), digest)
    assert job.id is not None
    if on_event:
        on_event("job_created", {"job": {"id": job.id, "name": job.name}, "config": cfg.to_json(),
                                 "database": engine.url.render_as_string(hide_password=True)})
    return _run(engine, url, job.id, broker, registry, on_event, executor)


def resume(job: str, *, db: str | None = None, broker: str | None = None, on_event: EventSink | None = None,
           registry: Any = None, executor: Any = None, insecure: bool = False) -> JobReport:
    """Continue a job whose coordinator stopped: keep results that arrived, re-run what was lost, finish."""
    from optagent.registry import build_registry

    engine, url = _engine(db)
    current = report(job, url)
    cfg = current.config
    if current.status == JobStatus.COMPLETED:
        raise UserError(f"job {current.job.name} is already completed; start a new search instead")
    if cfg.executor == "celery" and not broker and executor is None:
        raise UserError(f"job {current.job.name} ran on Celery workers; pass --broker (or OPTAGENT_BROKER_URL)")
    if cfg.executor == "celery" and broker and executor is None:
        _check_broker(broker, insecure)
    return _run(engine, url, current.job.id, broker if cfg.executor == "celery" else None,
                registry or build_registry(), on_event, executor)


def cancel(job: str, *, db: str | None = None, broker: str | None = None) -> JobStatus:
    """Stop a job: a live coordinator is asked to stop (CANCELLING); otherwise the job is cancelled here and
    its queued trials are dropped on the workers (with `broker`). Returns the job's new status."""
    from optagent.storage import find_job, job_trials, utcnow

    engine, url = _engine(db)
    with Session(engine) as s:
        row = find_job(s, job)
        if JobStatus(row.status).finished:
            raise UserError(f"job {row.name} is already {row.status}")
        alive = JobReport(row).coordinator_stale_s is None and row.status == JobStatus.RUNNING \
            and row.heartbeat_at is not None
        if alive:
            row.status = JobStatus.CANCELLING  # the coordinator sees this at its next heartbeat and stops
        else:
            row.status, row.error, row.finished_at = JobStatus.CANCELLED, "cancelled by `optagent cancel`", utcnow()
            trials = job_trials(s, row.id or 0)
            in_flight = [t.number for t in trials if TrialState(t.state).in_flight]
            # the coordinator sends a trial before writing its row, so the one after the last row may be out
            in_flight.append(max((t.number for t in trials), default=0) + 1)
            for t in trials:
                if TrialState(t.state).in_flight:
                    t.state = TrialState.CANCELLED
                    s.add(t)
            cfg = JobConfig.of(row)
            if cfg.executor == "celery" and broker:
                from optagent.executors.celery import CeleryExecutor

                CeleryExecutor(broker, queue=cfg.queue, job_key=row.key or f"job{row.id}").revoke(in_flight)
        s.add(row)
        s.commit()
        return JobStatus(row.status)
