"""What the search learns from trials that did not give a measurement, and what it need not run.

- A failed trial is told to Optuna as a *violated constraint* (with the worst objective values seen), not as
  missing data: TPE puts it among its bad trials and NSGA-II's constrained domination ranks it last, so the
  samplers move away from what failed instead of proposing it again. optagent's own row says `failed`.
- A parameter set already measured in the job is not run again: the stored result is reused and the new
  trial says so (`Steering.seen`).
- An option that failed with the same error three times, and never in a trial that worked, is dropped for
  the rest of the job (`Steering.blocked`): a trial sampled with it is told as failed without running.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from optagent.strategy import flatten

FAILED_VIOLATION = 1000.0  # the constraint a failed trial is told with: worse than any real violation
DROP_AFTER = 3  # failures with the same error before the option they share is dropped

Params = dict[str, dict[str, Any]]


def params_key(params: Params) -> str:
    """A canonical text of a parameter set (floats to 6 significant digits), equal for equal trials."""
    def norm(v: Any) -> Any:
        return float(f"{v:.6g}") if isinstance(v, float) else v

    return json.dumps({k: norm(v) for k, v in sorted(flatten(params).items())}, sort_keys=True)


def _options(params: Params) -> set[str]:
    return {f"{k}={json.dumps(v)}" for k, v in flatten(params).items()}


def error_signature(reason: str) -> str:
    """A failure reason without the parts that change between trials of the same error (numbers, paths)."""
    text = re.sub(r"(/[\w.\-]+)+", "<path>", reason or "")
    text = re.sub(r"\d+(\.\d+)?", "#", text)
    return text[:160]


@dataclass
class Dropped:
    option: str  # "runtime.engine=\"onnxruntime\""
    reason: str  # the failure reason of the first of the failures
    failures: list[int] = field(default_factory=list)

    def describe(self) -> str:
        name, _, value = self.option.partition("=")
        return (f"{name}={json.loads(value)!s} dropped for the rest of the job after {len(self.failures)} failures "
                f"with the same error (trials {', '.join(map(str, self.failures))}): {self.reason}")


class Steering:
    def __init__(self, signs: list[float]):
        self.signs = signs
        self._measured: dict[str, int] = {}  # params key -> trial number with a result (complete or failed)
        self._worked: set[str] = set()  # options seen in a complete trial
        self._failures: dict[str, list[tuple[int, set[str], str]]] = defaultdict(list)
        self._worst: list[float] | None = None
        self.dropped: dict[str, Dropped] = {}

    # -- what has been measured ----------------------------------------------------------------------------
    def record(self, number: int, params: Params, state: str, values: list[float] | None,
               reason: str | None = None) -> list[Dropped]:
        """Note a finished trial; returns the options this failure made the search drop (usually none)."""
        self._measured.setdefault(params_key(params), number)
        if values is not None:
            self._note_values(values)
        if state == "complete":
            self._worked |= _options(params)
            return []
        if state != "failed" or not reason:
            return []
        signature = error_signature(reason)
        group = self._failures[signature]
        group.append((number, _options(params), reason))
        if len(group) < DROP_AFTER:
            return []
        shared = set.intersection(*(options for _, options, _ in group)) - self._worked - set(self.dropped)
        new = [Dropped(option, group[0][2], [n for n, _, _ in group]) for option in sorted(shared)]
        self.dropped.update({d.option: d for d in new})
        return new

    def seen(self, params: Params) -> int | None:
        """The number of a trial that already measured exactly these params, if any."""
        return self._measured.get(params_key(params))

    def blocked(self, params: Params) -> Dropped | None:
        """The dropped option these params use, if any."""
        return next((self.dropped[o] for o in sorted(_options(params)) if o in self.dropped), None)

    # -- what a failure is told as ----------------------------------------------------------------------------
    def _note_values(self, values: list[float]) -> None:
        if not all(math.isfinite(v) for v in values):
            return
        if self._worst is None:
            self._worst = list(values)
        else:  # the worst in each objective: the lowest maximised, the highest minimised
            self._worst = [min(w, v) if s > 0 else max(w, v) for w, v, s in zip(self._worst, values, self.signs,
                                                                                   strict=True)]

    def penalty(self) -> list[float]:
        """Objective values a failed trial is told with: the worst seen in each objective (the baseline's
        before any trial); the violated constraint, not these, is what keeps samplers away."""
        return list(self._worst) if self._worst is not None else [0.0] * len(self.signs)
