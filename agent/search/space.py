"""The job's search space as the coordinator sees it: the searched strategies on the worker's hardware.

The space depends on what the baseline trial reported (the worker's capabilities, the model's layer kinds
and batch size), so it is set up from the baseline's result. Strategies that are installed but not
searched sit at their off params, which cross-strategy conditions may read.
"""

from __future__ import annotations

from typing import Any

import optuna

from optagent.hardware import Capabilities
from optagent.registry import Registry
from optagent.strategy import Objective, SpaceContext, Strategy, sample, study_point, suggest_all

Params = dict[str, dict[str, Any]]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def capabilities_of(data: dict[str, Any]) -> Capabilities:
    """Capabilities from their JSON (tuples come back as lists)."""
    return Capabilities(**{**data, "cpu_flags": tuple(data["cpu_flags"]),
                           "quantized_engines": tuple(data["quantized_engines"]),
                           "gpu_capability": tuple(data["gpu_capability"]) if data.get("gpu_capability") else None})


class SearchSpace:
    def __init__(self, registry: Registry, names: list[str], objectives: tuple[Objective, ...]):
        self.strategies = [registry.strategy(name) for name in names]
        self._unsearched = [s for name, s in registry.strategies.items() if name not in names]
        self.objectives = objectives
        self.ctx: SpaceContext | None = None
        self.fixed: Params = {}

    def setup(self, capabilities: dict[str, Any], model_info: dict[str, Any] | None,
              analyses: dict[str, Any] | None = None) -> None:
        info = model_info or {}
        self.ctx = SpaceContext(capabilities=capabilities_of(capabilities), objectives=self.objectives,
                                default_batch_size=int(info.get("default_batch_size", 1)),
                                has_conv=bool(info.get("has_conv", True)),
                                has_linear=bool(info.get("has_linear", True)),
                                model_info=dict(info), analysis=dict(analyses or {}),
                                searched=tuple(s.name for s in self.strategies))
        self.fixed = {s.name: s.off_params(self.ctx) for s in self._unsearched}
        self._check()

    def _check(self) -> None:
        """A space that only breaks on the job's real context (the worker's hardware, this model) fails the
        job before any trial, naming the strategy (the registry checked it on generic contexts at load)."""
        from optagent.checks import cycle_problem, strategy_problems
        from optagent.errors import UserError

        assert self.ctx is not None
        installed = {s.name: s for s in [*self.strategies, *self._unsearched]}
        for strategy in self.strategies:
            problems = strategy_problems(strategy, self.ctx, installed)
            if problems:
                raise UserError(f"{problems[0]}; fix the plugin's search_space or leave the strategy out with "
                                "--strategies")
        cycle = cycle_problem(installed.values(), self.ctx)
        if cycle:
            raise UserError(cycle)

    @property
    def ready(self) -> bool:
        return self.ctx is not None

    def _context(self) -> SpaceContext:
        assert self.ctx is not None, "the space is set up from the baseline's result"
        return self.ctx

    def suggest(self, trial: optuna.Trial) -> Params:
        return suggest_all(trial, self.strategies, self._context(), self.fixed)

    def rebuild(self, frozen: optuna.trial.FrozenTrial) -> Params:
        """The params a trial was sampled with, from the study (KeyError if it was not fully sampled)."""
        return sample(self.strategies, self._context(), lambda key, _d: frozen.params[key], self.fixed)

    def analysed(self) -> list[Any]:
        """The searched strategies that analyse the model before the search (`Strategy.analysis`)."""
        return [s for s in self.strategies if type(s).analysis is not Strategy.analysis]

    def full(self, params: Params) -> Params:
        """`params` with every installed strategy it leaves out at its off params (how two jobs that searched
        different strategies name the same recipe)."""
        off = {s.name: s.off_params(self._context()) for s in self.strategies}
        return {**self.fixed, **off, **{k: v for k, v in params.items() if v}}

    def off(self) -> Params:
        return {s.name: s.off_params(self._context()) for s in self.strategies}

    def point(self, params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
        """Optuna params and distributions of a known point (the baseline's off params)."""
        return study_point(self.strategies, self._context(), params, self.fixed)

    def recipe(self, params: Params) -> str:
        """A human summary of the strategies that are on, e.g. "pruning(method=structured, amount=0.5)"."""
        if self.ctx is None or not params:
            return "baseline"
        parts = []
        for strategy in self.strategies:
            p = params.get(strategy.name)
            if p and not strategy.is_off(p, self.ctx):
                parts.append(f"{strategy.name}({', '.join(f'{k}={_short(v)}' for k, v in p.items())})")
        return " + ".join(parts) or "baseline"
