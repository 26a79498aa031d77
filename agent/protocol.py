"""The wire between the coordinator and whatever runs trials: one definition of every message.

The coordinator sends a `TrialPayload` (run one trial) or a `ConfirmPayload` (re-measure the Pareto
candidates); a worker answers with a `TrialResult` or a `ConfirmResult`. They travel as plain JSON (a
pipe to a local process, a Celery message over Redis), so each has `to_json`/`from_json`, and each
carries `version`: a worker refuses a message of a version it does not speak, with a reason that says
which side to upgrade, instead of misreading it.

Both sides import this module; it never imports torch, Optuna or Celery.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

VERSION = 1


class ProtocolError(ValueError):
    """A message that is not one this side can read (unknown version or kind, missing fields)."""


def _build(cls: type, data: dict[str, Any], nested: dict[str, type] | None = None) -> Any:
    """`cls(**data)` keeping only known fields and building nested dataclasses; unknown keys are ignored
    (a newer sender may add optional fields), missing required ones raise ProtocolError."""
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in known}
    for name, kind in (nested or {}).items():
        if isinstance(kwargs.get(name), dict):
            kwargs[name] = _build(kind, kwargs[name])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProtocolError(f"{cls.__name__} message is incomplete: {exc}") from None


def check_version(data: dict[str, Any], what: str) -> None:
    version = data.get("version")
    if version != VERSION:
        raise ProtocolError(f"{what} has protocol version {version!r} and this side speaks {VERSION}; run the same "
                            "optagent version on the coordinator and every worker")


@dataclass(frozen=True)
class JobRef:
    id: int
    name: str


@dataclass(frozen=True)
class ModelRef:
    """The model file: its path on the coordinator, its hash, and its source when it travels to a worker."""

    path: str
    sha256: str
    source_b64: str | None = None


@dataclass(frozen=True)
class WorkerInfo:
    """Where a result was computed."""

    host: str
    pid: int
    gpu: str | None = None
    attempt: int = 1

    @classmethod
    def here(cls, attempt: int = 1) -> WorkerInfo:
        return cls(socket.gethostname(), os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES") or None, attempt)


@dataclass(frozen=True)
class _Payload:
    """What every message to a worker carries: the job, the model file and how to build and measure."""

    trial: int
    job: JobRef
    model: ModelRef
    strategies: list[str]
    objectives: list[str]
    seed: int = 0
    threads: int = 1
    device: str = "auto"
    measure: dict[str, Any] = field(default_factory=dict)  # optagent.trial.measure.MeasureSettings fields
    exclusive_measure: bool = False  # hold the host-wide lock while timing (local workers share cores)
    time_limit_s: float | None = None
    max_attempts: int = 3
    attempt: int = 1
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> version on the coordinator
    constraint: dict[str, Any] = field(default_factory=dict)  # metric, sign, bound (optagent.strategy.Constraint)
    analyses: dict[str, Any] = field(default_factory=dict)  # Strategy.analysis results, by strategy
    analyze: list[str] = field(default_factory=list)  # strategies whose analysis this (baseline) trial runs
    pruner: dict[str, Any] = field(default_factory=dict)  # early stopping: kind, earlier curves (trial.early_stop)
    version: int = VERSION

    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind}

    def replace(self, **changes: Any) -> Any:
        from dataclasses import replace

        return replace(self, **changes)


@dataclass(frozen=True)
class TrialPayload(_Payload):
    """Run trial `trial` (0 = the baseline) with `params` ({strategy: {param: value}}; {} = untouched)."""

    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind: ClassVar[str] = "trial"


@dataclass(frozen=True)
class Candidate:
    """A Pareto trial to re-measure: its params, its seed and its search-time speedup band."""

    params: dict[str, dict[str, Any]]
    seed: int
    speedup_low: float | None = None
    speedup_high: float | None = None


@dataclass(frozen=True)
class ConfirmPayload(_Payload):
    """Re-measure `candidates` (by trial number) against the baseline in `processes` fresh processes,
    `parallel` at a time (see optagent.trial.confirm)."""

    candidates: dict[str, Candidate] = field(default_factory=dict)
    processes: int = 3
    parallel: int = 1
    kind: ClassVar[str] = "confirm"

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "trial": -1}


Payload = TrialPayload | ConfirmPayload


def parse_payload(data: dict[str, Any]) -> Payload:
    """The payload a JSON message holds; ProtocolError for a version or kind this side does not know."""
    if not isinstance(data, dict):
        raise ProtocolError(f"a payload must be a JSON object, not {type(data).__name__}")
    check_version(data, "the payload")
    kind = data.get("kind", "trial")
    nested: dict[str, type] = {"job": JobRef, "model": ModelRef}
    if kind == "trial":
        payload: Payload = _build(TrialPayload, data, nested)
    elif kind == "confirm":
        confirm: ConfirmPayload = _build(ConfirmPayload, data, nested)
        candidates = {str(n): c if isinstance(c, Candidate) else _build(Candidate, c)
                      for n, c in (confirm.candidates or {}).items()}
        payload = confirm.replace(candidates=candidates)
    else:
        raise ProtocolError(f"unknown payload kind {kind!r}; run the same optagent version everywhere")
    if not isinstance(payload.job, JobRef) or not isinstance(payload.model, ModelRef):
        raise ProtocolError("the payload's job or model is malformed")
    return payload


State = Literal["complete", "failed", "pruned"]


@dataclass
class TrialResult:
    """What a worker answers for a trial. `metrics` holds every evaluation metric and measurement;
    `samples` the raw latency samples (ms) of the candidate and its interleaved baseline."""

    trial: int
    state: State
    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    failure_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    hardware: dict[str, Any] = field(default_factory=dict)  # optagent.hardware.fingerprint()
    worker: dict[str, Any] = field(default_factory=dict)  # WorkerInfo fields
    capabilities: dict[str, Any] | None = None  # optagent.hardware.Capabilities of the worker
    model_info: dict[str, Any] | None = None  # what the search space depends on (batch, layer kinds, ...)
    intermediate: dict[str, float] = field(default_factory=dict)  # step -> constraint metric (early stopping)
    analyses: dict[str, Any] = field(default_factory=dict)  # what the baseline trial's `analyze` produced
    version: int = VERSION
    kind: ClassVar[str] = "trial"

    @classmethod
    def failed(cls, number: int, reason: str, *, duration_s: float = 0.0, worker: dict[str, Any] | None = None,
               hardware: dict[str, Any] | None = None, state: State = "failed") -> TrialResult:
        """A result with no measurement (the reason is shown to the user)."""
        return cls(trial=number, state=state, failure_reason=reason, duration_s=duration_s,
                   hardware=hardware or {}, worker=worker or asdict(WorkerInfo.here()))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialResult:
        check_version(data, "the trial result")
        result: TrialResult = _build(cls, data)
        return result


@dataclass
class ConfirmResult:
    """What a worker answers for a confirmation: per candidate number, its confirmed speedup and bands
    (or `{"error": reason}`); see optagent.trial.confirm for the fields."""

    state: State
    confirmations: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: Any = None
    confidence: float = 0.95
    processes: int = 1
    noise: float | None = None
    phase_noise: float | None = None
    failure_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    hardware: dict[str, Any] = field(default_factory=dict)
    worker: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION
    kind: ClassVar[str] = "confirm"
    trial: ClassVar[int] = -1

    @classmethod
    def failed(cls, reason: str, *, duration_s: float = 0.0, worker: dict[str, Any] | None = None) -> ConfirmResult:
        return cls(state="failed", failure_reason=reason, duration_s=duration_s, worker=worker or {})

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind, "trial": -1}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConfirmResult:
        check_version(data, "the confirmation result")
        result: ConfirmResult = _build(cls, data)
        return result


def failed_json(payload: dict[str, Any], reason: str, **kw: Any) -> dict[str, Any]:
    """The JSON failure answer to a raw payload of either kind (e.g. one a worker refuses unread)."""
    if isinstance(payload, dict) and payload.get("kind") == "confirm":
        return ConfirmResult.failed(reason, duration_s=kw.get("duration_s", 0.0), worker=kw.get("worker")).to_json()
    number = payload.get("trial", -1) if isinstance(payload, dict) else -1
    try:
        number = int(number)
    except (TypeError, ValueError):
        number = -1
    return TrialResult.failed(number, reason, **kw).to_json()


def parse_result(data: dict[str, Any]) -> TrialResult | ConfirmResult:
    if data.get("kind") == "confirm":
        return ConfirmResult.from_json(data)
    return TrialResult.from_json(data)
