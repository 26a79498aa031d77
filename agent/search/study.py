"""The Optuna glue: the study, its storage and sampler, and every use of Optuna's private API, in one place.

optagent uses ask/tell from a single coordinator. Three things Optuna's public API does not offer are
needed, each pinned by tests/test_optuna_glue.py against the installed Optuna:

- a finished trial's result row, constraint and dashboard attributes written in the transaction of the
  tell itself (`StudyStorage.stage`), instead of three transactions on the coordinator's critical path;
- a tell without `Study.tell`'s read-back and deep copy of the finished trial (`tell`);
- a handle on a RUNNING trial asked by an earlier coordinator, by trial number (`trial_handle`).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import optuna
import sqlalchemy as sa

from optagent.errors import UserError
from optagent.job import JobConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONSTRAINT = "accuracy_drop"  # <= 0 when the trial keeps the constraint metric within the allowed drop
CONSTRAINT_ATTR = f"constraints:{CONSTRAINT}"  # the system attribute Trial.set_constraint writes


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


def tell(study: optuna.Study, trial: optuna.trial.Trial | int, values: list[float] | None,
         state: optuna.trial.TrialState | None = None) -> None:
    """`study.tell(trial, values)` (FAIL when `values` is None), skipped if the trial is finished, and
    without what `Study.tell` does after telling: read the finished trial back with all its relations and
    deep-copy it for a return value the coordinator does not use (about a millisecond per trial)."""
    if state is None:
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


def trial_id(trial: optuna.trial.Trial) -> int:
    """The storage id of a live trial (Optuna keeps it private)."""
    return int(trial._trial_id)


def trial_handle(study: optuna.Study, number: int) -> optuna.trial.Trial:
    """A handle on a RUNNING trial asked by an earlier coordinator (resume). Optuna has no public lookup
    from trial number to a Trial, so this uses the storage's id mapping."""
    storage = study._storage
    tid = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.trial.Trial(study, tid)


def stage_and_tell(study: optuna.Study, trial: optuna.trial.Trial, values: list[float] | None, *,
                   statements: tuple[Any, ...] = (), system: dict[str, Any] | None = None,
                   user: dict[str, Any] | None = None, state: optuna.trial.TrialState | None = None) -> bool:
    """Tell `trial` with `statements` and attributes written in the tell's transaction. Returns False when
    Optuna had the trial finished already (nothing written): the caller stores the statements alone."""
    storage = study_storage(study)
    storage.stage(trial_id(trial), statements=statements, system=system or {}, user=user or {})
    tell(study, trial, values, state)
    return not storage.unstage(trial_id(trial))


def make_sampler(cfg: JobConfig, resumed_at: int = 0) -> optuna.samplers.BaseSampler:
    """A fresh sampler (Optuna does not persist samplers, so resume rebuilds it from the config).

    Feasibility reaches the sampler through each trial's constraint (`Trial.set_constraint`), so TPE
    and NSGA-II both search with the accuracy constraint rather than a weighted sum. A resumed job's
    sampler is seeded past the trials the study already has (`resumed_at`): seeded as at the start, its
    random draws would repeat the proposals the earlier coordinator already made.
    """
    seed = cfg.seed + 7919 * resumed_at  # a prime stride keeps resumed seeds apart from other jobs' seeds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cfg.sampler == "tpe":
            startup = max(4, min(10, (cfg.n_trials or 40) // 4))
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                              group=True, constant_liar=True)
        if cfg.sampler == "nsga2":
            population = max(8, min(50, (cfg.n_trials or 200) // 4))
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
        if cfg.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"unknown sampler {cfg.sampler!r}; use tpe, nsga2 or random")


def optuna_storage(url: str) -> StudyStorage:
    from optagent.storage import sqlite_creator

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"creator": sqlite_creator(url)}
    return StudyStorage(url, engine_kwargs=kwargs)


def open_study(url: str, name: str, cfg: JobConfig, attrs: dict[str, Any]) -> optuna.Study:
    """Create or load the job's study (same name, same directions), with a fresh sampler and the job's
    description as user attributes (what optuna-dashboard shows)."""
    objectives = cfg.parsed_objectives
    study = optuna.create_study(storage=optuna_storage(url), study_name=name, load_if_exists=True,
                                directions=[o.direction for o in objectives], sampler=make_sampler(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.metric for o in objectives])
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    existing = len(study.get_trials(deepcopy=False))
    if existing:
        study.sampler = make_sampler(cfg, resumed_at=existing)
    return study


def add_known_trial(study: optuna.Study, params: dict[str, Any], distributions: dict[str, Any],
                    values: list[float], user_attrs: dict[str, Any], constraint: float = 0.0) -> None:
    """Add a trial measured outside ask/tell (the baseline) with its constraint."""
    frozen = optuna.trial.create_trial(params=params, distributions=distributions, values=values,
                                       user_attrs=user_attrs)
    frozen.set_constraint(CONSTRAINT, constraint)
    study.add_trial(frozen)


def fail(study: optuna.Study, trial: optuna.trial.Trial | int) -> None:
    """Mark a trial failed (cancelled or never sent); a finished one is left as it is."""
    study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def running_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
