"""Early stopping of recovery fine-tuning, through Optuna's pruner interface, on the worker.

Fine-tuning reports the constraint metric before training and after each epoch (more often on long
epochs). The trial's own Optuna trial lives in the coordinator, which would cost a round trip per report;
so the worker builds a single-objective in-memory study of the constraint metric holding the job's
earlier fine-tuning curves (sent in the payload), asks one trial, and reports to it. Its pruner decides:

- `constraint` (default): stop when even an optimistic continuation cannot reach the constraint: the best
  improvement per step seen so far, doubled, over the remaining steps, still ends on the wrong side of
  the bound (a trial at accuracy 0.27 after its first epoch against a 0.98 bound stops there);
- `median`: Optuna's MedianPruner over the earlier curves (stop when worse than their median at the step);
- `none`: never stop.

A stopped trial is recorded as `pruned` with the reason and told to the sampler as a violated
constraint (optagent.search.steering).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from optagent.strategy import Constraint

OPTIMISM = 2.0  # an improvement rate this many times the best seen still would not reach the bound: stop
MEDIAN_STARTUP = 3  # earlier curves the median pruner needs before it stops anything

Check = Callable[[int, float], "str | None"]


def _never(step: int, value: float) -> str | None:
    return None


def checker(spec: dict[str, Any], constraint: Constraint | None, total_steps: int) -> Check:
    """A function fine-tuning calls with (step, constraint metric); it returns why to stop, or None."""
    kind = str(spec.get("kind") or "none")
    if kind == "none" or constraint is None or constraint.bound is None:
        return _never
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sign, bound = constraint.sign, constraint.bound
    direction = optuna.study.StudyDirection.MAXIMIZE if sign > 0 else optuna.study.StudyDirection.MINIMIZE
    pruner: optuna.pruners.BasePruner
    if kind == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP, n_warmup_steps=1)
    else:
        pruner = ConstraintPruner(bound, sign, total_steps)
    study = optuna.create_study(direction=direction, pruner=pruner)
    for curve in spec.get("history") or []:
        steps = {int(k): float(v) for k, v in dict(curve).items()}
        if steps:
            last = steps[max(steps)]
            study.add_trial(optuna.trial.create_trial(value=last, intermediate_values=steps))
    trial = study.ask()

    def check(step: int, value: float) -> str | None:
        trial.report(value, step)
        if not trial.should_prune():
            return None
        if kind == "median":
            return (f"stopped early at step {step}: {constraint.metric} {value:.4g} is worse than the median of "
                    f"earlier trials at that step")
        return (f"stopped early at step {step} of {total_steps}: {constraint.metric} {value:.4g} cannot reach "
                f"the constraint ({bound:.4g}) at the best rate of improvement seen")

    return check


class ConstraintPruner(optuna.pruners.BasePruner):
    """Prune when an optimistic extrapolation of the curve misses the constraint."""

    def __init__(self, bound: float, sign: float, total_steps: int):
        self.bound, self.sign, self.total = bound, sign, max(1, total_steps)

    def prune(self, study: Any, trial: Any) -> bool:
        values = sorted(trial.intermediate_values.items())
        if len(values) < 2:
            return False  # before training: pruning alone may be all the harm, recovery has not started
        step, value = values[-1]
        if self.sign * (value - self.bound) >= 0 or step >= self.total:
            return False
        pairs = zip(values, values[1:], strict=False)
        rates = [self.sign * (v1 - v0) / max(s1 - s0, 1) for (s0, v0), (s1, v1) in pairs]
        best = max(0.0, *rates)
        reachable = value + self.sign * OPTIMISM * best * (self.total - step)
        return self.sign * (reachable - self.bound) < 0
