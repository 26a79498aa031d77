"""A job's rows: creating the job, the trial rows the coordinator writes, and their JSON views.

The coordinator is the only writer. A searched trial's result row is written inside the transaction of
its tell (`result_update`, staged by the loop); the baseline's and everything else go through `Records`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from optagent.errors import UserError
from optagent.job import JobConfig, JobStatus, TrialState
from optagent.protocol import TrialResult
from optagent.storage import Analysis, Job, Trial, get_trial, job_trials, utcnow


def trial_dict(t: Trial) -> dict[str, Any]:
    """The JSON view of a trial used by hooks, --json output and reports."""
    return {
        "number": t.number, "state": str(t.state), "recipe": t.recipe, "params": t.params, "metrics": t.metrics,
        "values": t.values, "feasible": t.feasible, "on_front": t.on_front, "failure_reason": t.failure_reason,
        "notes": t.notes, "duration_s": t.duration_s, "worker": t.worker, "hardware": t.hardware,
    }


def job_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "name": job.name, "status": str(job.status), "model_path": job.model_path,
        "model_hash": job.model_hash, "config": job.config, "error": job.error,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def _select_job_by_name(name: str) -> Any:
    return select(Job).where(Job.name == name)


def create_job(engine: Engine, cfg: JobConfig, name: str | None, model_hash: str) -> Job:
    """A new job row (status pending) for a validated config; a taken name is a UserError."""
    with Session(engine) as session:
        if name and session.exec(_select_job_by_name(name)).first() is not None:
            raise UserError(f"a job named {name!r} already exists; pick another --name or `optagent resume {name}`")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        default = f"{Path(cfg.model_path).stem}-{stamp}"
        taken = 1
        while not name and session.exec(_select_job_by_name(default)).first() is not None:
            taken += 1  # two searches started within the same second
            default = f"{Path(cfg.model_path).stem}-{stamp}-{taken}"
        job = Job(name=name or default, study_name="", model_path=cfg.model_path,
                  model_hash=model_hash, config=cfg.to_json(), status=JobStatus.PENDING)
        session.add(job)
        session.commit()
        session.refresh(job)
        if len(session.exec(_select_job_by_name(job.name)).all()) > 1:  # pragma: no cover - race
            raise UserError(f"job name {job.name!r} is taken; pass --name")
        job.study_name = f"optagent-{job.id}-{job.name}"
        session.add(job)
        session.commit()
        session.refresh(job)
        return job


def result_fields(result: TrialResult, values: list[float] | None, feasible: bool | None) -> dict[str, Any]:
    """The columns of a trial row that a result sets."""
    hardware = dict(result.hardware or {})
    if result.capabilities:
        hardware["capabilities"] = result.capabilities
    if result.model_info:
        hardware["model_info"] = result.model_info
    state = result.state if result.state in (TrialState.COMPLETE, TrialState.PRUNED) else TrialState.FAILED
    samples = {**result.samples, "intermediate": result.intermediate} if result.intermediate else result.samples
    return {"state": str(state), "metrics": result.metrics, "samples": samples, "values": values,
            "feasible": feasible, "failure_reason": result.failure_reason, "notes": list(result.notes),
            "duration_s": result.duration_s, "hardware": hardware, "worker": result.worker,
            "finished_at": utcnow()}


class Records:
    """The rows of one job, read and written in short transactions."""

    def __init__(self, engine: Engine, job_id: int):
        self.engine, self.job_id = engine, job_id

    def job(self) -> Job:
        with Session(self.engine) as s:
            job = s.get(Job, self.job_id)
            if job is None:
                raise UserError(f"no job with id {self.job_id}")
            return job

    def update_job(self, **changes: Any) -> Job:
        with Session(self.engine) as s:
            job = s.get(Job, self.job_id)
            assert job is not None
            for key, value in changes.items():
                setattr(job, key, value)
            s.add(job)
            s.commit()
            s.refresh(job)
            return job

    def row(self, number: int) -> Trial | None:
        with Session(self.engine) as s:
            return get_trial(s, self.job_id, number)

    def rows(self) -> list[Trial]:
        with Session(self.engine) as s:
            return job_trials(s, self.job_id)

    def searched(self) -> list[Trial]:
        return [r for r in self.rows() if r.number > 0]

    def front_rows(self) -> list[Trial]:
        return [t for t in self.rows() if t.on_front]

    def dispatched(self, number: int, params: dict[str, Any], recipe: str, new: bool = False) -> None:
        """The row of a trial sent to a worker (state running)."""
        with Session(self.engine) as s:
            row = (None if new else get_trial(s, self.job_id, number)) or Trial(job_id=self.job_id, number=number)
            row.state, row.params, row.recipe = TrialState.RUNNING, params, recipe
            s.add(row)
            s.commit()

    def store_result(self, number: int, result: TrialResult, values: list[float] | None,
                     feasible: bool | None, **extra: Any) -> Trial:
        """A result in its own transaction (the baseline, which is not told, and reused results)."""
        with Session(self.engine, expire_on_commit=False) as s:  # the row stays readable: no re-SELECT
            row = get_trial(s, self.job_id, number) or Trial(job_id=self.job_id, number=number)
            for key, value in {**result_fields(result, values, feasible), **extra}.items():
                setattr(row, key, value)
            s.add(row)
            s.commit()
            return row

    def analyses(self, model_hash: str, keys: dict[str, str]) -> dict[str, Any]:
        """Stored analyses of this model, by strategy, for the given analysis keys."""
        with Session(self.engine) as s:
            rows = s.exec(select(Analysis).where(Analysis.model_hash == model_hash)).all()
        return {r.strategy: r.data for r in rows if keys.get(r.strategy) == r.key}

    def store_analyses(self, model_hash: str, keys: dict[str, str], data: dict[str, Any]) -> None:
        with Session(self.engine) as s:
            for strategy, value in data.items():
                found = s.exec(select(Analysis).where(Analysis.model_hash == model_hash,
                                                      Analysis.strategy == strategy,
                                                      Analysis.key == keys[strategy])).first()
                row = found or Analysis(model_hash=model_hash, strategy=strategy, key=keys[strategy])
                row.data = value
                s.add(row)
            s.commit()

    def elsewhere(self, model_hash: str, fingerprint: dict[str, Any]) -> list[tuple[str, Trial]]:
        """(job name, row) of every finished trial other jobs measured on the same model file (hash) and on
        hardware with the same fingerprint (CPU, threads, torch and runtime versions, GPU), for `--reuse`."""
        keys = ("cpu_model", "threads", "torch", "software", "gpu", "device", "plugins")
        same = {k: fingerprint.get(k) for k in keys}
        with Session(self.engine) as s:
            jobs = s.exec(select(Job).where(Job.model_hash == model_hash, Job.id != self.job_id)).all()
            out = []
            for job in jobs:
                for row in job_trials(s, job.id or 0):
                    if row.number > 0 and row.state in ("complete", "failed") and "reused_from" not in row.metrics \
                            and {k: row.hardware.get(k) for k in keys} == same:
                        out.append((job.name, row))
        return out

    def insert(self, row: Trial) -> None:
        with Session(self.engine, expire_on_commit=False) as s:
            s.add(row)
            s.commit()

    def result_update(self, number: int, fields: dict[str, Any]) -> Any:
        """The UPDATE that writes a result into an existing row (staged into the tell's transaction)."""
        table = Trial.__table__
        return sa.update(table).where(table.c.job_id == self.job_id, table.c.number == number).values(**fields)

    def set_front(self, changed: set[int], front: set[int] | dict[int, Any]) -> None:
        with Session(self.engine) as s:
            for n in changed:
                row = get_trial(s, self.job_id, n)
                if row is not None:
                    row.on_front = n in front
                    s.add(row)
            s.commit()

    def abandon(self) -> list[int]:
        """Queued and running rows become cancelled; returns their numbers."""
        numbers = []
        with Session(self.engine) as s:
            for row in job_trials(s, self.job_id):
                if TrialState(row.state).in_flight:
                    row.state = TrialState.CANCELLED
                    s.add(row)
                    numbers.append(row.number)
            s.commit()
        return numbers

    def add_notes(self, number: int, notes: list[str], metrics: dict[str, Any] | None = None) -> None:
        with Session(self.engine) as s:
            row = get_trial(s, self.job_id, number)
            if row is None:
                return
            row.notes = [*row.notes, *notes]
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            s.add(row)
            s.commit()
