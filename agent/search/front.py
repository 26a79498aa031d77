"""The Pareto front and its hypervolume (objective signs: +1 maximise, -1 minimise).

Hypervolume. Each objective is scaled by the baseline's value (so the figure is unitless) and the
reference point is the baseline itself, except for the constrained metric (accuracy by default), whose
reference is the lowest value the constraint allows (baseline - max drop). Only feasible trials count.
So the hypervolume is 0 until a trial beats the baseline on every non-constrained objective (e.g. is
faster) within the allowed drop, and it grows as the front improves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optagent.job import JobConfig


def dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[float]) -> bool:
    """True if `a` is at least as good as `b` everywhere and strictly better somewhere."""
    better = False
    for x, y, s in zip(a, b, signs, strict=True):
        if s * x < s * y:
            return False
        if s * x > s * y:
            better = True
    return better


def insert(front: dict[int, list[float]], number: int, values: list[float], signs: Sequence[float]) -> set[int]:
    """Add a point to a front in place; return the numbers whose membership changed.

    Cost is linear in the front's size, not in the number of trials, so a long search stays cheap.
    """
    if any(dominates(v, values, signs) for v in front.values()):
        return set()
    beaten = {n for n, v in front.items() if dominates(values, v, signs)}
    for n in beaten:
        del front[n]
    front[number] = list(values)
    return beaten | {number}


def front_of(points: dict[int, list[float]], signs: Sequence[float]) -> set[int]:
    """The non-dominated subset of `points` (quadratic; for checks and small sets)."""
    return {n for n, v in points.items()
            if not any(dominates(w, v, signs) for m, w in points.items() if m != n)}


# -- hypervolume -----------------------------------------------------------------------------------------
def _hv_min(points: list[list[float]], ref: list[float]) -> float:
    """Hypervolume dominated by `points` (minimisation) up to `ref`, by slicing the last dimension."""
    pts = [p for p in points if all(x < r for x, r in zip(p, ref, strict=True))]
    if not pts:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in pts)
    pts.sort(key=lambda p: p[-1])
    volume = 0.0
    for i, p in enumerate(pts):
        top = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
        if top > p[-1]:
            volume += (top - p[-1]) * _hv_min([q[:-1] for q in pts[: i + 1]], ref[:-1])
    return volume


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float], signs: Sequence[float]) -> float:
    """Hypervolume of `points` against `ref`; signs are +1 for maximised and -1 for minimised objectives."""
    flip = [[-s * x for x, s in zip(p, signs, strict=True)] for p in points]
    return _hv_min(flip, [-s * r for r, s in zip(ref, signs, strict=True)])


def _objectives(cfg: JobConfig) -> list[tuple[str, float]]:
    return [(o.metric, 1.0 if o.direction == "maximize" else -1.0) for o in cfg.parsed_objectives]


def hypervolume_history(job: Any, trials: list[Any]) -> tuple[list[int], list[float], list[float]] | None:
    """(trial numbers, hypervolume after each, scaled reference point), or None without a baseline."""
    base = next((t for t in trials if t.number == 0 and t.state == "complete"), None)
    cfg = JobConfig.of(job)
    objectives = _objectives(cfg)
    if base is None or any(name not in base.metrics for name, _ in objectives):
        return None
    scale = [abs(float(base.metrics[n])) or 1.0 for n, _ in objectives]
    goal = Goal(cfg)
    goal.baseline = {k: float(v) for k, v in base.metrics.items() if isinstance(v, int | float)}
    bound = goal.bound() if goal.metric in base.metrics else None
    ref = []
    for (name, _sign), k in zip(objectives, scale, strict=True):
        value = float(base.metrics[name])
        if name == goal.metric and bound is not None:
            value = bound
        ref.append(value / k)
    signs = [s for _, s in objectives]
    numbers: list[int] = []
    volumes: list[float] = []
    points: list[list[float]] = []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == "complete" and t.feasible and all(n in t.metrics for n, _ in objectives):
            points.append([float(t.metrics[n]) / k for (n, _), k in zip(objectives, scale, strict=True)])
        if t.state in ("complete", "failed", "pruned"):
            numbers.append(t.number)
            # a point never takes volume away; max() keeps float rounding (order of the sums) from doing so
            volumes.append(max(hypervolume(points, ref, signs), volumes[-1] if volumes else 0.0))
    return numbers, volumes, ref


class Goal:
    """The job's objectives and its constraint, against the measured baseline.

    The constraint metric is maximised unless written NAME:min (perplexity:min, loss:min); it may move
    the wrong way by at most `max_accuracy_drop` (absolute) or `max_relative_drop` (a fraction of the
    baseline's value, which wins when both are given).
    """

    def __init__(self, cfg: JobConfig):
        self.objectives = cfg.parsed_objectives
        self.signs = [1.0 if o.direction == "maximize" else -1.0 for o in self.objectives]
        self.metric, self.sign = constraint_of(cfg)
        self.max_drop, self.max_relative = cfg.max_accuracy_drop, cfg.max_relative_drop
        self.baseline: dict[str, float] | None = None

    @property
    def constrained(self) -> bool:
        return self.max_drop is not None or self.max_relative is not None

    def missing(self, metrics: dict[str, Any]) -> list[str]:
        """Objective and constraint metrics that `metrics` lacks."""
        names = [o.metric for o in self.objectives] + ([self.metric] if self.constrained else [])
        return [n for n in dict.fromkeys(names) if n not in metrics]

    def values(self, metrics: dict[str, Any]) -> list[float] | None:
        try:
            return [float(metrics[o.metric]) for o in self.objectives]
        except KeyError:
            return None

    def bound(self) -> float | None:
        """The worst constraint-metric value a trial may have (None: no constraint)."""
        if not self.constrained or self.baseline is None:
            return None
        base = self.baseline[self.metric]
        tolerance = abs(base) * self.max_relative if self.max_relative is not None else float(self.max_drop or 0.0)
        return base - self.sign * tolerance

    def constraint(self, metrics: dict[str, Any]) -> float:
        """<= 0 when feasible: the constraint metric moved the wrong way by at most the allowed amount."""
        bound = self.bound()
        return 0.0 if bound is None else self.sign * (bound - float(metrics[self.metric]))

    def describe(self) -> str:
        if not self.constrained:
            return "none"
        way = ">=" if self.sign > 0 else "<="
        op = "-" if self.sign > 0 else "+"
        amount = (f"{self.max_relative:.1%} of baseline" if self.max_relative is not None else f"{self.max_drop}")
        return f"{self.metric} {way} baseline {op} {amount}"


def constraint_of(cfg: JobConfig) -> tuple[str, float]:
    """(metric, +1 maximised / -1 minimised) of the job's constraint."""
    name, _, way = cfg.constraint_metric.partition(":")
    return name.strip(), -1.0 if way.strip().lower() in ("min", "minimize") else 1.0
