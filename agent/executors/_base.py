"""The executor protocol between the coordinator and whatever runs trials.

The coordinator is the only process that talks to Optuna and the database. It hands an executor a
*payload* (plain JSON, see `optagent.pipeline.run_trial`) and later collects *results* (plain JSON):

result = {
    "trial": int,                    # the trial number the payload carried
    "state": "complete" | "failed",
    "metrics": {name: float},        # every evaluation metric and measurement
    "samples": {name: [float]},      # raw latency samples (ms), candidate and interleaved baseline
    "failure_reason": str | None,
    "notes": [str],                  # strategy notes, e.g. "unstructured sparsity saves no latency"
    "duration_s": float,
    "hardware": {...},               # optagent.hardware.fingerprint()
    "worker": {"host": str, "pid": int, "gpu": str | None, "attempt": int},
}
"""

from __future__ import annotations

import os
import socket
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


def worker_identity(attempt: int = 1) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES") or None, "attempt": attempt}


def failed_result(number: int, reason: str, *, duration_s: float = 0.0, worker: dict[str, Any] | None = None,
                  hardware: dict[str, Any] | None = None) -> dict[str, Any]:
    """A result for a trial that produced no measurement (the reason is shown to the user)."""
    return {"trial": number, "state": "failed", "metrics": {}, "samples": {}, "failure_reason": reason,
            "notes": [], "duration_s": duration_s, "hardware": hardware or {},
            "worker": worker or worker_identity()}
