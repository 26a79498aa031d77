"""The strategy interface: what a built-in or third-party optimization strategy implements.

A strategy owns one slice of the search space (its parameters, with an "off" setting) and one step of
the trial pipeline (how it transforms the model). The pipeline runs strategies stage by stage:

    configure (all strategies) -> COMPRESS -> FINETUNE -> QUANTIZE -> DEPLOY -> measure

Parameters are plain JSON values, so a trial's recipe can be stored, sent to a worker and replayed.
"""

from __future__ import annotations

import contextlib
import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
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

    `when` makes the parameter conditional: it is sampled only when the named parameters take one of the
    listed values. A plain name is a sibling of the same strategy (``when={"method": ["structured"]}``);
    ``"<strategy>.<param>"`` is another strategy's parameter (``when={"runtime.engine": ["onnxruntime"]}``),
    and strategies are sampled parameter by parameter in dependency order, so conditions may cross
    strategies in both directions as long as they form no cycle. A strategy that is installed but not
    searched counts as its `off_params()`; one that is not installed (or a parameter that is not active)
    has the value None, which a `when` list may name. A parameter that is not active is absent from the
    trial's params.

    `variant` declares the same parameter again with a different distribution under a different `when`
    (Optuna cannot change a parameter's choices from trial to trial): e.g. `mode` for eager PyTorch and
    `mode` with variant "onnxruntime" for ONNX Runtime. At most one variant may be active at a time; the
    trial's params hold `mode` either way, and the study names the variant ``quantization.mode@onnxruntime``.
    """

    name: str
    distribution: BaseDistribution
    when: Mapping[str, Sequence[Any]] | None = None
    help: str = ""
    variant: str = ""

    @property
    def key(self) -> str:
        """The name in the Optuna study after the strategy prefix: `name`, or `name@variant`."""
        return f"{self.name}@{self.variant}" if self.variant else self.name

    def active(self, chosen: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]] | None = None) -> bool:
        """Whether `when` holds, given this strategy's chosen params and the other strategies' (by name)."""
        if not self.when:
            return True
        for key, values in self.when.items():
            owner, dot, name = key.rpartition(".")
            value = (others or {}).get(owner, {}).get(name) if dot else chosen.get(key)
            if value not in tuple(values):
                return False
        return True

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
        if self.variant:
            out["variant"] = self.variant
        return out


def categorical(name: str, choices: Sequence[Any], when: Mapping[str, Sequence[Any]] | None = None,
                help: str = "", variant: str = "") -> Param:
    return Param(name, CategoricalDistribution(tuple(choices)), when, help, variant)


def integer(name: str, low: int, high: int, *, step: int = 1, log: bool = False,
            when: Mapping[str, Sequence[Any]] | None = None, help: str = "", variant: str = "") -> Param:
    return Param(name, IntDistribution(low, high, log=log, step=step), when, help, variant)


def real(name: str, low: float, high: float, *, step: float | None = None, log: bool = False,
         when: Mapping[str, Sequence[Any]] | None = None, help: str = "", variant: str = "") -> Param:
    return Param(name, FloatDistribution(low, high, log=log, step=step), when, help, variant)


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
    # what the baseline trial found out about the model (layer kinds, attention heads, input dtypes, ...)
    model_info: dict[str, Any] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)  # each strategy's `Strategy.analysis`, by name
    searched: tuple[str, ...] = ()  # the strategies the job searches (others sit at their off params)


LossFn = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class Constraint:
    """The job's constraint as a trial sees it: `metric` must stay at or better than `bound`."""

    metric: str
    sign: float = 1.0  # +1: higher is better; -1: lower is better (perplexity)
    bound: float | None = None

    def violated_by(self, value: float) -> bool:
        return self.bound is not None and self.sign * (value - self.bound) < 0

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "sign": self.sign, "bound": self.bound}


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
    # wrap each unit of heavy compute (a training step) in `with trial.compute():` so that a trial timing
    # on the same host does not share cores with it; the pipeline does so around other stages' `apply`
    compute: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    analysis: dict[str, Any] = field(default_factory=dict)  # each strategy's `Strategy.analysis`, by name
    # the job's constraint: the metric, +1 when higher is better (-1 lower), and the worst value allowed
    # (None in the baseline trial, which measures what the bound is relative to)
    constraint: Constraint | None = None
    # early stopping: call `report(step, value_of_the_constraint_metric)` during training; it raises
    # optagent.errors.TrialPruned when the trial cannot meet the constraint (see optagent.trial.early_stop)
    should_stop: Callable[[int, float], str | None] = field(default=lambda step, value: None)
    intermediate: dict[int, float] = field(default_factory=dict)

    def report(self, step: int, value: float) -> None:
        """Record the constraint metric at a training step; stop the trial if it cannot meet the constraint."""
        from optagent.errors import TrialPruned

        self.intermediate[int(step)] = float(value)
        reason = self.should_stop(int(step), float(value))
        if reason:
            raise TrialPruned(reason, self.intermediate)

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

    # -- optional: a one-off analysis of the model, before the search --------------------------------------
    analysis_version: ClassVar[str] = "1"

    def analysis(self, trial: TrialContext) -> dict[str, Any] | None:
        """A study of the baseline this strategy's space or trials depend on (e.g. each layer's sensitivity
        to quantization), run once per model file in the baseline trial, on a worker, when the strategy is
        searched. Return JSON (or None: nothing to analyse). The result is stored in the database, keyed by
        the model file's hash, `analysis_version` and the job's constraint, so later jobs reuse it; every
        trial sees it as `trial.analysis[self.name]` and `search_space` as `ctx.analysis[self.name]`.
        """
        return None

    def describe(self, ctx: SpaceContext) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage.name.lower(),
            "description": self.description,
            "off": self.off_params(ctx),
            "space": [p.describe() for p in self.search_space(ctx)],
        }


def ordered_space(strategies: Sequence[Strategy], ctx: SpaceContext) -> list[tuple[Strategy, Param]]:
    """Every strategy's params in sampling order: declaration order, except that a param comes after
    every param its `when` names (siblings or other strategies'). A cycle is a plugin bug: UserError."""
    from optagent.errors import UserError

    nodes = [(s, p) for s in strategies for p in s.search_space(ctx)]
    where: dict[tuple[str, str], set[int]] = {}
    for i, (s, p) in enumerate(nodes):
        where.setdefault((s.name, p.name), set()).add(i)
    needs: list[set[int]] = []
    for i, (s, p) in enumerate(nodes):
        deps: set[int] = set()
        for key in p.when or {}:
            owner, dot, name = key.rpartition(".")
            deps |= where.get((owner if dot else s.name, name), set())
        needs.append(deps - {i})
    order: list[int] = []
    done: set[int] = set()
    while len(order) < len(nodes):
        ready = next((i for i in range(len(nodes)) if i not in done and needs[i] <= done), None)
        if ready is None:
            stuck = sorted({f"{s.name}.{p.key}" for i, (s, p) in enumerate(nodes) if i not in done})
            raise UserError(f"the `when` conditions of {', '.join(stuck)} form a cycle; a parameter cannot depend "
                            "on itself through other parameters (fix the plugins' search_space)")
        order.append(ready)
        done.add(ready)
    return [nodes[i] for i in order]


Pick = Callable[[str, BaseDistribution], Any]


def sample(strategies: Sequence[Strategy], ctx: SpaceContext, pick: Pick,
           fixed: Mapping[str, Params] | None = None) -> dict[str, Params]:
    """Choose every active param of `strategies` with `pick(study_key, distribution)`, in dependency order.

    `fixed` holds the params of strategies outside this set (usually their off params), which cross-strategy
    conditions read.
    """
    chosen: dict[str, Params] = {s.name: {} for s in strategies}
    context: dict[str, Params] = {**(fixed or {}), **chosen}  # the same dicts: conditions see new choices
    for strategy, p in ordered_space(strategies, ctx):
        mine = chosen[strategy.name]
        if p.name in mine or not p.active(mine, context):
            continue
        mine[p.name] = pick(f"{strategy.name}.{p.key}", p.distribution)
    return chosen


def _suggest_one(trial: optuna.Trial, key: str, d: BaseDistribution) -> Any:
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(key, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
    if isinstance(d, FloatDistribution):
        return trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    raise TypeError(f"unsupported distribution {d!r} for {key}")  # pragma: no cover


def suggest_all(trial: optuna.Trial, strategies: Sequence[Strategy], ctx: SpaceContext,
                fixed: Mapping[str, Params] | None = None) -> dict[str, Params]:
    """Sample every strategy's params on an Optuna trial, honouring conditions within and across strategies.

    Parameters are named ``<strategy>.<param>`` in the study so optuna-dashboard shows where they belong.
    """
    return sample(strategies, ctx, lambda key, d: _suggest_one(trial, key, d), fixed)


def suggest(trial: optuna.Trial, strategy: Strategy, ctx: SpaceContext,
            fixed: Mapping[str, Params] | None = None) -> Params:
    """Sample one strategy's params (other strategies' params, for its conditions, come from `fixed`)."""
    return suggest_all(trial, [strategy], ctx, fixed)[strategy.name]


def study_point(strategies: Sequence[Strategy], ctx: SpaceContext, params: Mapping[str, Params],
                fixed: Mapping[str, Params] | None = None) -> tuple[dict[str, Any], dict[str, BaseDistribution]]:
    """The Optuna params and distributions of a known point (the baseline's off params, say), keyed as
    `suggest_all` would key them, for `optuna.trial.create_trial`."""
    flat: dict[str, Any] = {}
    dists: dict[str, BaseDistribution] = {}

    def pick(key: str, d: BaseDistribution) -> Any:
        strategy, _, name = key.partition(".")
        value = params.get(strategy, {}).get(name.partition("@")[0])
        if value is not None:
            flat[key], dists[key] = value, d
        return value

    sample(strategies, ctx, pick, fixed)
    return flat, dists


def flatten(params: Mapping[str, Params]) -> dict[str, Any]:
    """{"pruning": {"method": "none"}} -> {"pruning.method": "none"} (Optuna's naming)."""
    return {f"{s}.{k}": v for s, p in params.items() for k, v in p.items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Params]:
    out: dict[str, Params] = {}
    for key, value in flat.items():
        strategy, _, name = key.partition(".")
        out.setdefault(strategy, {})[name] = value
    return out
