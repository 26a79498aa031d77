"""Pareto dominance over objective vectors (signs: +1 maximise, -1 minimise)."""

from __future__ import annotations

from collections.abc import Sequence


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
