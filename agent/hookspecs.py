"""Every hook optagent calls, in one module. Built-in plugins implement exactly these hooks.

A plugin is a module or object with functions decorated by ``optagent.hookimpl`` whose names match the
specs below. Plugins are found through the ``optagent`` entry-point group (see docs/plugins.md).
Hooks that receive job or trial data receive plain JSON-compatible dicts, so a plugin never depends on
optagent's storage classes.

The lifecycle hooks (job/trial started/finished) run in the coordinator process only; an exception in one
is logged as a warning naming the plugin and never stops the job (see `optagent.lifecycle`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from optagent.metrics import Metric
    from optagent.strategy import Strategy

PROJECT = "optagent"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def optagent_register_strategies(register: Callable[[Strategy], None]) -> None:
    """Register optimization strategies.

    Called once whenever a registry is built (in the CLI, the coordinator and every trial process). Call
    ``register(strategy)`` once per `optagent.Strategy` instance the plugin provides. Registrations count
    only once the hook returns and each strategy passed the registry's checks (`optagent.checks`: search
    space, off point, no cycle); if the hook raises or a check fails, the whole plugin is skipped with a
    warning naming it and the check. A name another plugin registered first (built-ins come first) skips
    that strategy, with a warning naming both plugins. Returns nothing.
    """


@hookspec
def optagent_register_metrics(register: Callable[[Metric], None]) -> None:
    """Register metrics measured on every trial's final model (and usable as objectives).

    Called once whenever a registry is built. Call ``register(metric)`` with an `optagent.Metric`: a
    name, a direction ("maximize"/"minimize", or "max"/"min"), a unit, a description and
    ``compute(model, trial, batch)`` returning a float. `batch` is one eval batch at the trial's inference
    batch size, on ``trial.device``, in the model file's input form; compute runs under the host's shared
    compute lock. The same commit rule as for strategies applies. A name in `optagent.metrics.RESERVED`
    or another plugin's skips that metric with a warning; one the model file's evaluate() returns is not
    computed in that trial (a note says so). Returns nothing.
    """


@hookspec
def optagent_job_started(job: dict[str, Any]) -> None:
    """Called by the coordinator once a job's study is set up, before the baseline trial runs.

    `job` holds ``id``, ``name``, ``model_path``, ``model_hash`` and ``config`` (objectives,
    constraints, strategies, budget). Use it to open a run in an experiment tracker. Returns nothing.
    """


@hookspec
def optagent_trial_started(job: dict[str, Any], trial: dict[str, Any]) -> None:
    """Called by the coordinator when a trial is dispatched to a worker.

    `trial` holds ``number`` and ``params`` (by strategy name). Returns nothing; must be quick, since
    the coordinator waits for it.
    """


@hookspec
def optagent_trial_finished(job: dict[str, Any], trial: dict[str, Any]) -> None:
    """Called by the coordinator after a trial's result is stored.

    `trial` holds ``number``, ``state`` (``complete`` or ``failed``), ``params``, ``metrics``,
    ``feasible``, ``failure_reason``, ``duration_s`` and ``worker``. Returns nothing.
    """


@hookspec
def optagent_job_finished(job: dict[str, Any], pareto: list[dict[str, Any]]) -> None:
    """Called by the coordinator when a job ends (completed, failed or cancelled).

    `job` includes its final ``status``; `pareto` lists the Pareto-optimal trials as in
    ``optagent pareto --json``. Returns nothing.
    """
