"""Answering a trial from a result already measured, instead of running it again.

Within a job (dedup, on by default) a parameter set measured before is answered from that trial's row.
With `--reuse`, a parameter set another job measured on the same model file (hash) and the same hardware
fingerprint is answered from that job's row too: its latencies are put back on this job's reference scale
(optagent.search.calibration) and it is judged by this job's objectives and constraint. Recipes are
compared with every strategy a job did not search at its off params, so jobs that searched different
strategies name the same recipe alike. A reused trial carries `reused_from` and a note, and costs no budget.
"""

from __future__ import annotations

from typing import Any

from optagent.job import JobConfig
from optagent.search.calibration import References, uncalibrated
from optagent.search.front import Goal
from optagent.search.records import Records
from optagent.search.space import SearchSpace
from optagent.search.steering import Steering, params_key
from optagent.storage import Trial, utcnow

Params = dict[str, dict[str, Any]]


class Reuse:
    def __init__(self, cfg: JobConfig, records: Records, space: SearchSpace, steering: Steering,
                 references: References, goal: Goal):
        self.cfg, self.records, self.space, self.steering = cfg, records, space, steering
        self.references, self.goal = references, goal
        self._elsewhere: dict[str, tuple[str, Trial]] = {}  # params key -> (job, row) measured by other jobs

    def load_elsewhere(self, model_hash: str) -> int:
        """With `--reuse`: index the other jobs' trials on this model and hardware; returns how many."""
        if self.cfg.reuse:
            fingerprint = (self.records.row(0) or Trial(job_id=0, number=0)).hardware
            self._elsewhere = {params_key(self.space.full(row.params)): (job, row)
                               for job, row in self.records.elsewhere(model_hash, fingerprint)}
        return len(self._elsewhere)

    def find(self, params: Params) -> tuple[Trial, str, bool] | None:
        """(the row measured before, why it applies, whether it is another job's), or None."""
        twin = self.steering.seen(params) if self.cfg.dedup else None
        if twin is not None:
            row = self.records.row(twin)
            return (row, f"same parameters as trial {twin}", False) if row is not None else None
        found = self._elsewhere.get(params_key(self.space.full(params)))
        if found is None:
            return None
        job, row = found
        return row, f"same parameters as trial {row.number} of job {job} (same model and hardware, --reuse)", True

    def row(self, job_id: int, number: int, params: Params, source: Trial, why: str, foreign: bool) -> Trial:
        """The new trial's row, carrying the source's result."""
        metrics, values, feasible = dict(source.metrics), source.values, source.feasible
        if foreign and source.state == "complete":
            metrics = self.references.calibrated(uncalibrated(metrics), source.worker)
            values = self.goal.values(metrics)
            feasible = self.goal.constraint(metrics) <= 0 if values is not None else None
        metrics["reused_from"] = float(source.number)
        return Trial(job_id=job_id, number=number, params=params, recipe=source.recipe, state=source.state,
                     metrics=metrics, values=values, feasible=feasible, failure_reason=source.failure_reason,
                     notes=[*source.notes, f"{why}: its result is reused, not measured again"], duration_s=0.0,
                     hardware=source.hardware, worker=source.worker, finished_at=utcnow())
