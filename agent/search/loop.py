"""The search coordinator: the one process that calls Optuna ask/tell and writes the database.

Workers (local processes or Celery) only compute: a payload in, a result out (optagent.protocol). Keeping
a single writer makes SQLite safe, keeps the sampler's state in one place (Optuna does not store it) and
makes failure handling explicit: a result is told once (`skip_if_finished`), a crashed trial is failed
with its reason, and the coordinator itself can be restarted (`optagent resume`) from what the database
holds. The loop is here; its collaborators are the space (what to sample), the goal (objectives and the
constraint), the records (rows), the references (latency scale), the study glue and the executor.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from optagent.errors import UserError
from optagent.executors import Executor
from optagent.job import JobConfig, JobStatus, make_payload
from optagent.protocol import ConfirmPayload, JobRef, ModelRef, TrialPayload, TrialResult, parse_result
from optagent.registry import Registry
from optagent.search import baseline, recovery
from optagent.search import front as fronts
from optagent.search import study as glue
from optagent.search.calibration import References
from optagent.search.confirmation import confirm_front
from optagent.search.records import Records, job_dict, result_fields, trial_dict
from optagent.search.reuse import Reuse
from optagent.search.space import SearchSpace
from optagent.search.steering import Dropped, Steering
from optagent.search.telling import Teller
from optagent.search.warmstart import WarmStart
from optagent.search.warmstart import describe as describe_design
from optagent.storage import Job, Trial, utcnow

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]


class Cancelled(Exception):
    """`optagent cancel` asked the job to stop."""


class Coordinator:
    """Runs (or resumes) one job to the end of its budget."""

    HEARTBEAT_S = 5.0

    def __init__(self, engine: Any, url: str, job_id: int, registry: Registry, executor: Executor,
                 on_event: EventSink | None = None, hooks: Any = None):
        self.registry, self.executor = registry, executor
        self.on_event = on_event or (lambda kind, data: None)
        self.hooks = hooks if hooks is not None else registry.pm.hook
        self.records = Records(engine, job_id)
        job = self.records.job()
        self.job_id, self.job_name = job_id, job.name
        self.model = ModelRef(job.model_path, job.model_hash)
        self.cfg = JobConfig.of(job)
        self.goal = fronts.Goal(self.cfg)
        self.space = SearchSpace(registry, self.cfg.strategies, self.goal.objectives)
        self.references = References()
        self.study = glue.open_study(url, job.study_name, self.cfg, {
            # what optuna-dashboard shows about the job (it does not read Optuna 5's named constraints)
            "optagent_job": self.job_name, "model_path": job.model_path, "model_sha256": job.model_hash,
            "constraint": self.goal.describe()})
        self._front: dict[int, list[float]] = {}
        self._live: dict[int, optuna.trial.Trial] = {}
        self._dispatched: dict[int, tuple[dict[str, Any], str]] = {}  # number -> (params, recipe) until told
        self._finished: set[int] = set()  # searched trials told to Optuna, with a row
        self._failed = 0
        self._reused = 0  # trials answered from an earlier trial's result (not run, not counted in the budget)
        self._skipped = 0  # trials sampled with a dropped option (told as failed, no row, not counted)
        self.steering = Steering(self.goal.signs)
        self.warm = WarmStart(self.space, enabled=False)  # set up with the space, after the baseline
        self.reuse = Reuse(self.cfg, self.records, self.space, self.steering, self.references, self.goal)
        self.teller = Teller(self.study, self.goal, self.steering, self.records.engine)
        self._job_json = job_dict(job)
        self._last_beat = 0.0
        self._plugins = registry.versions()
        self.analyses: dict[str, Any] = {}  # Strategy.analysis results, sent with every trial
        self._curves: list[dict[str, float]] = []  # fine-tuning curves of the constraint metric (early stopping)

    # -- small helpers --------------------------------------------------------------------------------
    def _emit(self, kind: str, **data: Any) -> None:
        try:
            self.on_event(kind, data)
        except Exception:  # progress output must never stop a search
            log.debug("progress sink failed", exc_info=True)

    def payload(self, number: int, params: dict[str, dict[str, Any]]) -> TrialPayload:
        if self.cfg.executor != "local" and self.model.source_b64 is None:
            source = base64.b64encode(Path(self.model.path).read_bytes()).decode()
            self.model = ModelRef(self.model.path, self.model.sha256, source)
        payload = make_payload(self.cfg, JobRef(self.job_id, self.job_name), self.model, number, params, self._plugins)
        constraint = {"metric": self.goal.metric, "sign": self.goal.sign, "bound": self.goal.bound()}
        pruner = {"kind": self.cfg.pruner, "history": self._curves[-50:]}
        return payload.replace(constraint=constraint, analyses=self.analyses, pruner=pruner)

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat > self.HEARTBEAT_S:
            self._last_beat = now
            if self.records.update_job(heartbeat_at=utcnow()).status == JobStatus.CANCELLING:
                raise Cancelled()

    def _wait_for(self, number: int, timeout: float = 1.0) -> dict[str, Any]:
        """Poll until trial `number` reports (other outcomes are told as they come)."""
        while True:
            for outcome in self.executor.poll(timeout):
                if outcome.number == number:
                    return outcome.result
                if outcome.number > 0:
                    self._tell(outcome.number, outcome.result)
            self._beat()

    def counts(self) -> dict[str, int]:
        """Progress counters, kept in memory so a long search does not re-read every trial per step."""
        return {"complete": len(self._finished) - self._failed, "failed": self._failed,
                "running": len(self.executor.in_flight()), "budget": self.cfg.n_trials or 0,
                "front": len(self._front), "reused": self._reused, "skipped": self._skipped}

    def spent(self) -> int:
        """Trials that ran (reused and skipped ones cost nothing and do not count against the budget)."""
        return len(self._finished) - self._reused

    def _update_front(self, number: int, values: list[float]) -> None:
        changed = fronts.insert(self._front, number, values, self.goal.signs)
        if changed:
            self.records.set_front(changed, self._front)

    # -- the baseline ---------------------------------------------------------------------------------
    def _run_baseline(self) -> None:
        """Trial 0 (optagent.search.baseline), then the space, the constraint and the study set up from it."""
        keys = {s.name: f"v{s.analysis_version}:{self.goal.metric}:{self.goal.sign:+.0f}"
                for s in self.space.analysed()}

        def run(payload: TrialPayload) -> dict[str, Any]:
            self.executor.submit(0, payload.to_json())
            return self._wait_for(0)

        base = baseline.measure(self.records, self.goal, self.references, model_hash=self.model.sha256,
                                model_path=self.model.path, analysis_keys=keys,
                                payload=lambda todo: self.payload(0, {}).replace(analyze=todo), run=run,
                                emit=self._emit)
        self.analyses = base.analyses
        self.space.setup(base.capabilities, base.model_info, self.analyses)
        self.goal.baseline = {k: float(v) for k, v in base.metrics.items()}
        if not any(t.number == 0 or t.user_attrs.get("optagent_number") == 0 for t in self.study.get_trials()):
            flat, dists = self.space.point(self.space.off())
            glue.add_known_trial(self.study, flat, dists, base.values, {"optagent_number": 0, "baseline": True})
        self._update_front(0, base.values)
        self.steering.record(0, self.space.off(), "complete", base.values)
        known = self.reuse.load_elsewhere(self.model.sha256)
        if known:
            self._emit("reuse", trials=known)
        self.warm = WarmStart(self.space, self.cfg.warm_start)
        if self.cfg.warm_start and self.warm.queue:
            self._emit("warm_start", design=describe_design(self.space))
        self.study.set_user_attr("baseline_metrics", self.goal.baseline)
        self._emit("baseline", metrics=self.goal.baseline)

    # -- ask and tell ----------------------------------------------------------------------------------
    def _design_point(self) -> int:
        """Enqueue the warm start's next point not measured yet (optagent.search.warmstart); its phase, or 0."""
        while (point := self.warm.next()) is not None:
            params, phase = point
            if self.steering.seen(params) is None and self.steering.blocked(params) is None:
                flat, _ = self.space.point(params)
                self.study.enqueue_trial(flat)
                return phase
        return 0

    def _ask(self) -> None:
        phase = self._design_point()
        trial = self.study.ask()
        params = self.space.suggest(trial)
        self.warm.sent(trial.number, phase)
        dropped = self.steering.blocked(params)
        if dropped is not None:
            self._skip(trial, dropped)
            return
        found = self.reuse.find(params)
        if found is not None:
            self._reuse(trial, params, found)
            return
        self._live[trial.number] = trial
        # sent first, recorded while the worker picks it up; a crash in between leaves a RUNNING Optuna trial
        # without a row, which resume recovers (recovery.recover_unrecorded)
        self.executor.submit(trial.number, self.payload(trial.number, params).to_json())
        recipe = self.space.recipe(params)
        self.records.dispatched(trial.number, params, recipe, new=True)
        self._dispatched[trial.number] = (params, recipe)
        self._emit("trial_started", number=trial.number, params=params)
        self.hooks.optagent_trial_started(job=self._job_json, trial={"number": trial.number, "params": params})

    def _tell(self, number: int, raw: dict[str, Any]) -> None:
        if number in self._finished:
            return  # a duplicate (redelivered) result: the first one counts
        parsed = parse_result(raw)
        result = parsed if isinstance(parsed, TrialResult) else TrialResult.failed(number, "unexpected reply")
        result.metrics = self.references.calibrated(result.metrics, result.worker) if result.state == "complete" \
            else result.metrics
        values = self.goal.values(result.metrics) if result.state == "complete" else None
        if result.state == "complete" and values is None:
            missing = self.goal.missing(result.metrics)
            result.state, result.failure_reason = "failed", f"objective metric {', '.join(missing)} missing"
        feasible = self.goal.constraint(result.metrics) <= 0 if values is not None else None
        if number not in self._dispatched:  # sent by an earlier coordinator
            sent = self.records.row(number)
            self._dispatched[number] = (sent.params, sent.recipe) if sent else ({}, "")
        params, recipe = self._dispatched.pop(number)
        self.warm.told(number, params, result.metrics.get("speedup"), feasible)
        if result.intermediate:
            self._curves.append(dict(result.intermediate))
        for dropped in self.steering.record(number, params, result.state, values, result.failure_reason):
            result.notes.append(dropped.describe())
            self._emit("option_dropped", option=dropped.option, text=dropped.describe())
        fields = result_fields(result, values, feasible)
        row = Trial(job_id=self.job_id, number=number, params=params, recipe=recipe, **fields)
        live = self._live.pop(number, None)
        self.teller.tell(live or glue.trial_handle(self.study, number), row, self.records.result_update(number, fields))
        self._finished.add(number)
        self._failed += values is None
        if feasible and values is not None:
            self._update_front(number, values)
            row.on_front = number in self._front
        self._emit("trial_finished", trial=trial_dict(row), counts=self.counts())
        self.hooks.optagent_trial_finished(job=self._job_json, trial=trial_dict(row))

    def _skip(self, trial: optuna.trial.Trial, dropped: Dropped) -> None:
        self._skipped += 1
        self.teller.skip(trial, dropped)
        self.warm.told(trial.number, {}, None, None)  # a design point skipped: the design does not wait for it

    def _reuse(self, trial: optuna.trial.Trial, params: dict[str, Any], found: tuple[Trial, str, bool]) -> None:
        """A parameter set measured before (optagent.search.reuse): answered from that result, not run."""
        row = self.reuse.row(self.job_id, trial.number, params, *found)
        self.records.insert(row)
        self.teller.tell(trial, row)
        self.warm.told(trial.number, params, row.metrics.get("speedup"), row.feasible)
        self._finished.add(trial.number)
        self._reused += 1
        self._failed += row.values is None
        self._emit("trial_finished", trial=trial_dict(row), counts=self.counts())

    # -- resume -----------------------------------------------------------------------------------------
    def _resume_in_flight(self) -> None:
        """After a coordinator restart: send again every trial the database says was dispatched."""
        rows = self.records.searched()
        if recovery.recover_unrecorded(self.study, self.records, {r.number for r in rows}, self.space.rebuild,
                                       self.space.recipe):
            rows = self.records.searched()
        found = recovery.survey(self.study, rows)
        for row in found.in_flight:
            self.executor.submit(row.number, self.payload(row.number, row.params).to_json())
        for row in found.finished:
            self._finished.add(row.number)
            self._failed += row.state != "complete"
            self._reused += "reused_from" in row.metrics
            if (row.samples or {}).get("intermediate"):
                self._curves.append(dict(row.samples["intermediate"]))
            self.references.note(row.metrics, row.worker)
            for dropped in self.steering.record(row.number, row.params, row.state, row.values, row.failure_reason):
                self._emit("option_dropped", option=dropped.option, text=dropped.describe())
            if row.feasible and row.values is not None and "reused_from" not in row.metrics:
                self._update_front(row.number, row.values)
        for row in found.untold:  # stored, but the tell was lost: tell now
            self.teller.tell(glue.trial_handle(self.study, row.number), row)

    # -- the job ------------------------------------------------------------------------------------------
    def run(self) -> Job:
        job = self.records.update_job(status=JobStatus.RUNNING, started_at=self.records.job().started_at or utcnow(),
                                      error=None)
        deadline = time.monotonic() + self.cfg.timeout_s if self.cfg.timeout_s else None
        status, error = JobStatus.COMPLETED, None
        try:
            self.hooks.optagent_job_started(job=job_dict(job))
            self._run_baseline()
            self._resume_in_flight()
            self._search(deadline)
            if self.cfg.confirm:
                self._confirm()
        except Cancelled:
            status, error = JobStatus.CANCELLED, "cancelled by `optagent cancel`"
            self._abandon_in_flight()
        except KeyboardInterrupt:  # Ctrl-C, and SIGTERM/SIGHUP (optagent.api turns them into this)
            status, error = JobStatus.INTERRUPTED, f"interrupted; `optagent resume {self.job_name}` continues it"
        except UserError as exc:
            status, error = JobStatus.FAILED, str(exc)
            self._abandon_in_flight()
        except BaseException as exc:  # a bug or a lost server: the job says so instead of staying `running`
            if getattr(exc, "resumable", False):  # e.g. the broker stayed away past --broker-retry-s
                status, error = JobStatus.INTERRUPTED, str(exc)
            else:
                from optagent.security import redact_text

                status, error = JobStatus.FAILED, redact_text(f"{type(exc).__name__}: {exc}")
                self._abandon_in_flight(quiet=True)
                self._finish(status, error)
                raise
        finally:
            self.executor.close()
        job = self._finish(status, error)
        if status == JobStatus.FAILED:
            raise UserError(error or "the job failed")
        return job

    def _finish(self, status: JobStatus, error: str | None) -> Job:
        job = self.records.update_job(status=status, error=error, finished_at=utcnow())
        self._job_json = job_dict(job)
        front = [trial_dict(t) for t in self.records.front_rows()]
        self.hooks.optagent_job_finished(job=self._job_json, pareto=front)
        self._emit("job_finished", job=self._job_json, pareto=front)
        return job

    def _search(self, deadline: float | None) -> None:
        budget = self.cfg.n_trials
        # reused and skipped trials cost nothing, but a space whose every point is measured or dropped would
        # sample them for ever: past this many the search has nothing new to try
        free_limit = max(50, 5 * (budget or 20))
        while True:
            self._beat()
            inflight = self.executor.in_flight()
            out_of_time = deadline is not None and time.monotonic() >= deadline
            exhausted = self._reused + self._skipped >= free_limit
            if exhausted and not inflight:
                self._emit("exhausted", reused=self._reused, skipped=self._skipped)
                return
            if (budget is not None and self.spent() >= budget) or (out_of_time and not inflight):
                return
            while (not out_of_time and not exhausted and len(inflight) < self.executor.capacity
                   and (budget is None or self.spent() + len(inflight) < budget)):
                self._ask()
                inflight = self.executor.in_flight()
                exhausted = self._reused + self._skipped >= free_limit
            for outcome in self.executor.poll(0.5):
                self._tell(outcome.number, outcome.result)

    def _abandon_in_flight(self, quiet: bool = False) -> None:
        """Cancel or fail: stop in-flight trials and fail them in the study. (Interrupted: leave them; Celery
        workers finish them and `optagent resume` collects the results.)"""
        try:
            self.executor.cancel()
            for number in self.records.abandon():
                if number > 0:
                    glue.fail(self.study, self._live.pop(number, None) or glue.trial_handle(self.study, number))
            for trial in self._live.values():  # asked, but the send failed before it had a row
                glue.fail(self.study, trial)
            self._live.clear()
        except Exception:
            if not quiet:
                raise
            log.debug("could not abandon in-flight trials", exc_info=True)

    def _confirm(self) -> None:
        """Re-measure the Pareto trials interleaved with the baseline in fresh processes (optagent.trial.confirm):
        the speedups shown at the end are those ratios with their noise band, and ties are called ties."""
        def run(payload: ConfirmPayload) -> dict[str, Any]:
            self.executor.submit(-1, payload.to_json())
            return self._wait_for(-1)

        confirm_front(self.cfg, self.records, self.references, sorted(self._front), self.payload(-1, {}), run,
                      self._emit)

    def pareto_rows(self) -> list[Trial]:
        return self.records.front_rows()
