"""Resume: what a new coordinator finds of the job an earlier one left, and how it picks the job up.

The earlier coordinator may have stopped anywhere: between asking a trial and sending it, between sending
it and writing its row (`ask` sends first), or after storing a result whose tell was lost. Everything
needed is in the database: the rows say what was sent and what finished, the study what was asked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from optagent.job import TrialState
from optagent.search import study as glue
from optagent.search.records import Records
from optagent.storage import Trial

log = logging.getLogger(__name__)

Params = dict[str, dict[str, Any]]


@dataclass
class Found:
    """The searched trials of a job as its rows have them."""

    in_flight: list[Trial] = field(default_factory=list)  # sent, no result yet: send again (same task id)
    finished: list[Trial] = field(default_factory=list)  # complete, failed or pruned
    untold: list[Trial] = field(default_factory=list)  # finished in the rows but RUNNING in the study


def recover_unrecorded(study: optuna.Study, records: Records, recorded: set[int],
                       rebuild: Callable[[optuna.trial.FrozenTrial], Params], recipe: Callable[[Params], str]) -> bool:
    """Trials an earlier coordinator asked and perhaps sent, but did not record. Their params are rebuilt
    from the study, exactly as they were sampled, and the row written; the resubmission that follows reuses
    the trial's task id, so a trial that did go out runs once. A trial asked but not fully sampled never
    went out: it is failed in Optuna, with the reason. Returns whether any row was written."""
    recovered = False
    for t in glue.running_trials(study):
        if t.number == 0 or t.number in recorded:
            continue
        try:
            params = rebuild(t)
        except KeyError:
            log.warning("trial %s was asked but never sent (the coordinator stopped while sampling it); failing it",
                        t.number)
            reason = "the coordinator stopped before the trial was sent"
            glue.study_storage(study).stage(t._trial_id, system={}, user={
                "optagent": {"optagent_number": t.number, "failure_reason": reason}})
            glue.tell(study, t.number, None)
            continue
        records.dispatched(t.number, params, recipe(params), new=True)
        recovered = True
    return recovered


def survey(study: optuna.Study, rows: list[Trial]) -> Found:
    """Sort the rows into what must be sent again, what is finished, and what is finished but untold."""
    found = Found()
    running = {t.number for t in glue.running_trials(study)}
    for row in rows:
        state = TrialState(row.state)
        if state.in_flight:
            found.in_flight.append(row)
        elif state.done:
            found.finished.append(row)
            if row.number in running:
                found.untold.append(row)
    return found
