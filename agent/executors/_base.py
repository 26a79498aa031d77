"""The executor protocol between the coordinator and whatever runs trials.

The coordinator is the only process that talks to Optuna and the database. It hands an executor a
*payload* and later collects *results*, both plain JSON as defined in `optagent.protocol`; a worker
runs the payload with `optagent.trial.run_trial`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Outcome:
    """A finished trial as reported by an executor."""

    number: int
    result: dict[str, Any]


class Executor(Protocol):
    """Runs trial payloads somewhere and reports them back. Used from the coordinator thread only."""

    capacity: int  # how many trials the coordinator should keep in flight

    def submit(self, number: int, payload: dict[str, Any]) -> None:
        """Start trial `number`. Must be idempotent per number (a resubmission runs the same trial)."""

    def poll(self, timeout: float) -> list[Outcome]:
        """Wait up to `timeout` seconds and return trials that finished since the last poll."""

    def in_flight(self) -> set[int]:
        """Trial numbers submitted and not yet reported."""

    def cancel(self) -> None:
        """Stop every queued or running trial; their outcomes are not reported."""

    def close(self) -> None:
        """Release processes and connections."""
