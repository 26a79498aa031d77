"""The strategy interface: what a built-in or third-party optimization strategy implements.

A strategy owns one slice of the search space (its parameters, with an "off" setting) and one step of
the trial pipeline (how it transforms the model). The pipeline runs strategies stage by stage:

    configure (all strategies) -> COMPRESS -> FINETUNE -> QUANTIZE -> DEPLOY -> measure

Parameters are plain JSON values, so a trial's recipe can be stored, sent to a worker and replayed.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

if TYPE_CHECKING:
    import optuna
    import torch

    from optagent.contract import ModelFile
    from optagent.hardware import Capabilities

Params = dict[str, Any]


class Stage(enum.IntEnum):
    """Where in the trial pipeline a strategy transforms the model (lower runs first)."""

    COMPRESS = 100  # structural changes to the fp32 model: pruning
    FINETUNE = 300  # recovery training of the compressed model
    QUANTIZE = 400  # precision changes: int8, fp16, bf16
    DEPLOY = 500  # serving settings: batch size, runtime


@dataclass(frozen=True)
class Param:
    """One searched parameter of a strategy.

    `when` makes the parameter conditional: it is sampled only when the named sibling parameters
    (of the same strategy) take one of the listed values, e.g. ``when={"method": ["structured"]}``.
    A parameter that is not active is absent from the trial's params.
    """

    name: str
    distribution: BaseDistribution
    when: Mapping[str, Sequence[Any]] | None = None
    help: str = ""

    def active(self, chosen: Mapping[str, Any]) -> bool:
        if not self.when:
            return True
        return all(chosen.get(k) in tuple(v) for k, v in self.when.items())

    def describe(self) -> dict[str, Any]:
        """A JSON description for `optagent plugins`."""
        d = self.distribution
        out: dict[str, Any] = {"name": self.name, "help": self.help}
        if isinstance(d, CategoricalDistribution):
            out.update(type="categorical", choices=list(d.choices))
        elif isinstance(d, IntDistribution):
            out.update(type="int", low=d.low, high=d.high, step=d.step, log=d.log)
        elif isinstance(d, FloatDistribution):
            out.update(type="float", low=d.low, high=d.high, step=d.step, log=d.log)
        else:  # pragma: no cover - optuna has no other public kinds
            out.update(type=type(d).__name__)
        if self.when:
            out["when"] = {k: list(v) for k, v in self.when.items()}
        return out


def categorical(name: str, choices: Sequence[Any], when: Mapping[str, Sequence[Any]] | None = None,
                help: str = "") -> Param:
    return Param(name, CategoricalDistribution(tuple(choices)), when, help)


def integer(name: str, low: int, high: int, *, step: int = 1, log: bool = False,
            when: Mapping[str, Sequence[Any]] | None = None, help: str = "") -> Param:
    return Param(name, IntDistribution(low, high, log=log, step=step), when, help)


def real(name: str, low: float, high: float, *, step: float | None = None, log: bool = False,
         when: Mapping[str, Sequence[Any]] | None = None, help: str = "") -> Param:
    return Param(name, FloatDistribution(low, high, log=log, step=step), when, help)


@dataclass(frozen=True)
class Objective:
    """A metric to optimise and its direction (``accuracy:max``, ``latency_ms:min``)."""

    metric: str
    direction: str  # "maximize" | "minimize"

    @classmethod
    def parse(cls, text: str) -> Objective:
        from optagent.errors import UserError

        name, _, way = text.partition(":")
        way = (way or "").strip().lower()
        aliases = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
        if not name.strip() or way not in aliases:
            raise UserError(f"objective {text!r} is not NAME:max or NAME:min; write e.g. --objective accuracy:max")
        return cls(name.strip(), aliases[way])

    def __str__(self) -> str:
        return f"{self.metric}:{'max' if self.direction == 'maximize' else 'min'}"


@dataclass
class SpaceContext:
    """What a strategy may look at when it declares its search space."""

    capabilities: Capabilities
    objectives: tuple[Objective, ...] = ()
    default_batch_size: int = 1
    has_conv: bool = True
    has_linear: bool = True


LossFn = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass
class TrialContext:
    """Everything a strategy may use while it transforms a model in one trial.

    `settings` is where `configure` leaves decisions that later stages read (e.g. the training batch
    size chosen by the batch-size strategy). `notes` are short messages stored with the trial and shown
    to the user (e.g. that unstructured sparsity saves no time on dense kernels).
    """

    model_file: ModelFile
    baseline: torch.nn.Module  # the trained baseline; never modify it (it is also the teacher)
    device: torch.device
    capabilities: Capabilities
    params: dict[str, Params]  # every strategy's params in this trial, by strategy name
    seed: int = 0
    threads: int = 1
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    loss_fn: LossFn | None = None  # training loss (outputs, targets, inputs); None = model file's / CE
    extra_metrics: dict[str, float] = field(default_factory=dict)  # e.g. compile_time_s, stored with the trial

    @property
    def train_batch_size(self) -> int:
        return int(self.settings.get("train_batch_size", 64))

    @property
    def infer_batch_size(self) -> int:
        return int(self.settings.get("infer_batch_size", self.model_file.default_batch_size))


class Strategy(ABC):
    """Base class for strategies. Subclasses set `name`, `stage`, and implement the three methods.

    The contract every strategy keeps (checked by `optagent.testing.StrategyConformance`):
    - `search_space` contains `off_params()` as a valid point;
    - `apply` with `off_params()` returns a model that computes the same function;
    - `apply` keeps the model runnable on the example input with the same output shape;
    - params are JSON-serialisable and `apply` is deterministic under `TrialContext.seed`.
    """

    name: ClassVar[str]
    stage: ClassVar[Stage]
    description: ClassVar[str] = ""

    @abstractmethod
    def search_space(self, ctx: SpaceContext) -> list[Param]:
        """The parameters searched for this strategy, given the hardware and the job's objectives."""

    @abstractmethod
    def off_params(self, ctx: SpaceContext) -> Params:
        """The point of the search space that means "leave the model alone"."""

    def is_off(self, params: Params, ctx: SpaceContext) -> bool:
        return dict(params) == self.off_params(ctx)

    def configure(self, params: Params, trial: TrialContext) -> None:  # noqa: B027 - optional step
        """Called for every strategy before any stage runs; publish settings for later stages here."""

    @abstractmethod
    def apply(self, model: torch.nn.Module, params: Params, trial: TrialContext) -> torch.nn.Module:
        """Transform the model (in place or by returning a new one) according to `params`."""

    def describe(self, ctx: SpaceContext) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage.name.lower(),
            "description": self.description,
            "off": self.off_params(ctx),
            "space": [p.describe() for p in self.search_space(ctx)],
        }


def suggest(trial: optuna.Trial, strategy: Strategy, ctx: SpaceContext) -> Params:
    """Sample a strategy's params on an Optuna trial, honouring conditional parameters.

    Parameters are named ``<strategy>.<param>`` in the study so optuna-dashboard shows where they belong.
    """
    chosen: Params = {}
    for p in strategy.search_space(ctx):
        if not p.active(chosen):
            continue
        key = f"{strategy.name}.{p.name}"
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            chosen[p.name] = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, IntDistribution):
            chosen[p.name] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
        elif isinstance(d, FloatDistribution):
            chosen[p.name] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
        else:  # pragma: no cover
            raise TypeError(f"unsupported distribution {d!r} in strategy {strategy.name}")
    return chosen


def flatten(params: Mapping[str, Params]) -> dict[str, Any]:
    """{"pruning": {"method": "none"}} -> {"pruning.method": "none"} (Optuna's naming)."""
    return {f"{s}.{k}": v for s, p in params.items() for k, v in p.items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Params]:
    out: dict[str, Params] = {}
    for key, value in flat.items():
        strategy, _, name = key.partition(".")
        out.setdefault(strategy, {})[name] = value
    return out
