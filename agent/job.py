"""A job: its configuration (validated, the only reader of what is stored), and the states of jobs and trials.

`JobConfig` is everything that defines a search. It is stored as JSON on the job row and read back only
through `JobConfig.of(job)`, so a default lives in one place. `validate()` checks it before a job row
exists, so a bad option never leaves a job behind.
"""

from __future__ import annotations

import difflib
import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from optagent.errors import UserError
from optagent.protocol import JobRef, ModelRef, TrialPayload
from optagent.strategy import Objective

DEFAULT_OBJECTIVES = ("accuracy:max", "latency_ms:min")
SAMPLERS = ("tpe", "nsga2", "random")
DEVICES = ("auto", "cpu", "cuda")
PRUNERS = ("none", "median", "constraint")
EXECUTORS = ("local", "celery")
_QUEUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
NAME_MAX = 100
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class JobStatus(str, enum.Enum):
    """Where a job is. `cancelling` is asked for by `optagent cancel` and seen by the live coordinator."""

    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the coordinator stopped; `optagent resume` continues the job

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class TrialState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    PRUNED = "pruned"  # stopped early: it could not meet the constraint (its reason says why)
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def in_flight(self) -> bool:
        return self in (TrialState.QUEUED, TrialState.RUNNING)

    @property
    def done(self) -> bool:
        return self in (TrialState.COMPLETE, TrialState.FAILED, TrialState.PRUNED)


def parse_objectives(texts: list[str] | tuple[str, ...] | None) -> tuple[Objective, ...]:
    """`NAME:max|min` texts (default accuracy:max, latency_ms:min) as Objectives; each metric at most once."""
    objectives = tuple(Objective.parse(t) for t in (texts or DEFAULT_OBJECTIVES))
    names = [o.metric for o in objectives]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"objective {', '.join(twice)} is given twice; give each metric once")
    return objectives


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' for a near miss of `name` among `known`, else ''."""
    lowered = {k.lower(): k for k in known}
    if name.lower() in lowered:
        return f" (did you mean {lowered[name.lower()]}?)"
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def is_queue_name(name: str) -> bool:
    """Whether `name` can name a Celery queue (a hardware pool): letters, digits, '.', '_', '-'."""
    return bool(_QUEUE.match(name))


def validate_name(name: str) -> str:
    """A job name as given to --name, or UserError: names are shown in terminals, used in file names and
    looked up after ids, so they are letters, digits, '.', '_' and '-' (at most NAME_MAX), start with a
    letter or digit, and are not purely numeric."""
    shown = repr(name[:40] + ("..." if len(name) > 40 else ""))
    fix = "use letters, digits, '.', '_' and '-', starting with a letter or digit, e.g. --name resnet-int8"
    if not name:
        raise UserError(f"--name is empty; {fix}")
    if len(name) > NAME_MAX:
        raise UserError(f"--name {shown} is {len(name)} characters long; use at most {NAME_MAX}")
    if not _NAME.match(name):
        raise UserError(f"--name {shown} has characters a job name cannot hold; {fix}")
    if name.isdigit():
        raise UserError(f"--name {shown} is a number, which `optagent status` would read as a job id; add a "
                        "letter, e.g. --name run-" + name[:20])
    return name


def default_name(model_path: str, stamp: str) -> str:
    """`<model file stem>-<stamp>`, the stem reduced to the characters a job name may hold."""
    from pathlib import Path

    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "-", Path(model_path).stem).strip("-._")[:NAME_MAX - len(stamp) - 1]
    return f"{stem or 'model'}-{stamp}"


@dataclass
class JobConfig:
    """Everything that defines a job; stored as JSON on the job row (secrets never included)."""

    model_path: str
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    strategies: list[str] = field(default_factory=list)
    n_trials: int | None = 20
    timeout_s: float | None = None
    max_accuracy_drop: float | None = 0.01
    constraint_metric: str = "accuracy"  # NAME, or NAME:min for a metric that must not rise (perplexity:min)
    max_relative_drop: float | None = None  # the allowed change as a fraction of the baseline (wins if set)
    sampler: str = "tpe"
    seed: int = 0
    workers: int = 1
    threads: int = 1
    device: str = "auto"
    measure: dict[str, Any] = field(default_factory=dict)
    trial_timeout_s: float | None = 1800.0
    executor: str = "local"  # "local" | "celery"
    queue: str = "optagent"
    max_attempts: int = 3
    confirm: bool = True  # re-measure the Pareto trials interleaved with the baseline when the search ends
    confirm_processes: int = 3  # fresh processes the confirmation runs in (their spread is the noise band)
    pruner: str = "constraint"  # early stopping of recovery fine-tuning: none | median | constraint
    warm_start: bool = True  # single-strategy trials first, then the sampler
    reuse: bool = False  # answer a parameter set measured by an earlier job (same model and hardware)
    dedup: bool = True  # answer a parameter set measured earlier in the job from its result (not run again)
    broker_retry_s: float = 120.0  # how long a lost broker is waited for before the job is interrupted

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def of(cls, job: Any) -> JobConfig:
        """The config stored on a job row."""
        return cls.from_json(dict(job.config or {}))

    @property
    def parsed_objectives(self) -> tuple[Objective, ...]:
        return parse_objectives(self.objectives)

    @property
    def constraint_name(self) -> str:
        """The constraint metric's name (without a :min suffix)."""
        return self.constraint_metric.partition(":")[0].strip()

    @property
    def objective_names(self) -> list[str]:
        return [o.metric for o in self.parsed_objectives]

    def validate(self) -> JobConfig:
        """Raise UserError naming the first bad setting and its fix; returns self."""
        if self.n_trials is not None and (isinstance(self.n_trials, bool) or self.n_trials < 1):
            raise UserError(f"--trials must be at least 1 (got {self.n_trials})")
        if self.n_trials is None and self.timeout_s is None:
            raise UserError("give a budget: --trials N and/or --timeout SECONDS")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise UserError(f"--timeout must be positive seconds (got {self.timeout_s})")
        if self.trial_timeout_s is not None and not self.trial_timeout_s > 0:
            raise UserError(f"--trial-timeout must be positive seconds (got {self.trial_timeout_s})")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers})")
        if self.threads < 1:
            raise UserError(f"--threads must be at least 1 (got {self.threads})")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 1:
            raise UserError(f"--max-accuracy-drop is a fraction between 0 and 1 (got {self.max_accuracy_drop}); "
                            "0.01 means one percentage point")
        budget = self.measure.get("max_time_s")
        if budget is not None and not (isinstance(budget, int | float) and 0 < budget <= 600):
            raise UserError(f"--measure-seconds must be more than 0 and at most 600 seconds (got {budget}); 4 is "
                            "the default")
        if self.confirm_processes < 1:
            raise UserError(f"--confirm-processes must be at least 1 (got {self.confirm_processes})")
        if self.max_attempts < 1:
            raise UserError(f"max attempts must be at least 1 (got {self.max_attempts})")
        if not self.broker_retry_s >= 0:
            raise UserError(f"--broker-retry-s must be zero or more seconds (got {self.broker_retry_s})")
        for option, value, known in (("--sampler", self.sampler, SAMPLERS), ("--device", self.device, DEVICES),
                                     ("--pruner", self.pruner, PRUNERS), ("executor", self.executor, EXECUTORS)):
            if value not in known:
                raise UserError(f"{option} {value!r} is unknown{did_you_mean(value, known)}; use "
                                f"{', '.join(known)}")
        if not _QUEUE.match(self.queue or ""):
            raise UserError(f"--queue {self.queue!r} is not a valid queue name; use letters, digits, '.', '_' "
                            "and '-' (at most 100), e.g. --queue gpu-a100")
        if not self.strategies:
            raise UserError("no strategy to search; name at least one with --strategies (see `optagent plugins`)")
        if len(set(self.strategies)) != len(self.strategies):
            raise UserError("a strategy is named twice in --strategies; name each once")
        self.parsed_objectives  # noqa: B018 - parses and checks each objective
        name, _, way = (self.constraint_metric or "").partition(":")
        if not name.strip() or way.strip().lower() not in ("", "max", "min", "maximize", "minimize"):
            raise UserError(f"--constraint-metric {self.constraint_metric!r} is not NAME or NAME:min; write e.g. "
                            "--constraint-metric accuracy or --constraint-metric perplexity:min")
        if self.max_relative_drop is not None and not 0 <= self.max_relative_drop <= 1:
            raise UserError(f"--max-relative-drop is a fraction of the baseline between 0 and 1 (got "
                            f"{self.max_relative_drop}); 0.02 means 2%")
        return self


def make_payload(cfg: JobConfig, job: JobRef, model: ModelRef, number: int, params: dict[str, dict[str, Any]],
                 plugins: dict[str, str] | None = None) -> TrialPayload:
    """The message a worker needs to run (or rebuild) trial `number` of a job.

    Trial seeds are derived from the job seed and the trial number, so any trial can be rebuilt exactly
    (`optagent export`, `apply`, `profile`, the confirmation pass).
    """
    return TrialPayload(
        trial=number, job=job, model=model, params=params, strategies=list(cfg.strategies),
        objectives=list(cfg.objectives), seed=cfg.seed + number, threads=cfg.threads, device=cfg.device,
        measure=dict(cfg.measure), exclusive_measure=cfg.executor == "local" and cfg.workers > 1,
        time_limit_s=cfg.trial_timeout_s, max_attempts=cfg.max_attempts, plugins=dict(plugins or {}))


def payload_for(job: Any, trial: Any) -> TrialPayload:
    """Rebuild the payload of a stored trial (the model file must still match the job's hash)."""
    return make_payload(JobConfig.of(job), JobRef(job.id, job.name), ModelRef(job.model_path, job.model_hash),
                        trial.number, trial.params)
