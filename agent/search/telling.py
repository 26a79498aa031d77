"""Telling Optuna: a finished trial's values, its constraint and what optuna-dashboard shows, in one write.

A complete trial is told its objective values and its constraint (<= 0 when feasible). A trial without
values (failed, stopped early, or sampled with a dropped option) is told as a violated constraint with the
worst values seen, so the samplers learn to avoid it (optagent.search.steering). The result row's update
goes into the same transaction as the tell (optagent.search.study.stage_and_tell).
"""

from __future__ import annotations

from typing import Any

import optuna
from sqlalchemy.engine import Engine

from optagent.search import study as glue
from optagent.search.front import Goal
from optagent.search.steering import FAILED_VIOLATION, Dropped, Steering
from optagent.storage import Trial

SHOWN = ("speedup", "model_size_mb")  # figures optuna-dashboard shows with each trial


class Teller:
    def __init__(self, study: optuna.Study, goal: Goal, steering: Steering, engine: Engine):
        self.study, self.goal, self.steering, self.engine = study, goal, steering, engine

    def tell(self, trial: optuna.trial.Trial, row: Trial, *statements: Any) -> None:
        """Tell Optuna a result row, in one transaction with `statements` (the row's own update)."""
        shown: dict[str, Any] = {"optagent_number": row.number, "recipe": row.recipe}
        values = row.values
        if values is not None:
            c = self.goal.constraint(row.metrics)
            shown.update(feasible=c <= 0, **{glue.CONSTRAINT: c}, **{k: row.metrics[k] for k in SHOWN
                                                                      if k in row.metrics})
        else:
            c, values = self.violation(row), self.steering.penalty()
            shown.update(failed=True, state=str(row.state), failure_reason=str(row.failure_reason)[:1000])
        system = {glue.CONSTRAINT_ATTR: c}  # what Trial.set_constraint stores (it re-reads all attrs)
        written = glue.stage_and_tell(self.study, trial, values, statements=statements, system=system,
                                      user={"optagent": shown})
        if not written and statements:  # Optuna had it finished already: store it alone
            with self.engine.begin() as conn:
                for statement in statements:
                    conn.execute(statement)

    def violation(self, row: Trial) -> float:
        """The constraint a trial without objective values is told with: a trial stopped early for missing
        the constraint by its own measured margin, any other failure as worse than every real violation."""
        if row.state == "pruned" and self.goal.metric in (row.metrics or {}):
            return max(self.goal.constraint(row.metrics), 1e-6)
        return FAILED_VIOLATION

    def skip(self, trial: optuna.trial.Trial, dropped: Dropped) -> None:
        """A trial sampled with a dropped option: told as failed at once; it does not run and has no row."""
        glue.stage_and_tell(self.study, trial, self.steering.penalty(),
                            system={glue.CONSTRAINT_ATTR: FAILED_VIOLATION},
                            user={"optagent": {"skipped": True, "failure_reason": dropped.describe()}})
