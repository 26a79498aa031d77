"""Every built-in strategy and metric passes the conformance suite shipped to plugin authors.

One test class per built-in, generated from the registry (entry points off), so a new built-in is checked
without editing this file. The suite also catches broken strategies (the last tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from optagent.metrics import Metric
from optagent.registry import build_registry, get_plugin_manager
from optagent.strategy import Params, SpaceContext, Stage, Strategy, TrialContext, categorical
from optagent.testing import MetricConformance, StrategyConformance

_BUILTINS = build_registry(get_plugin_manager(load_entry_points=False))
# Strategies whose sampled points compile or export models (tens of seconds each on 2 cores): fewer points,
# and marked slow so a quick run can deselect them with -m "not slow".
_SLOW = {"runtime": (0, 1, 2)}
# Strategies with parameters conditional on another strategy's: that strategy's params while sampling, so the
# sampled points exercise them (batch_size.train is searched only in trials that fine-tune).
_CONTEXT = {"batch_size": {"finetune": {"epochs": 1}}}


def _conformance_class(strategy: Strategy) -> type:
    def fixture(self: Any) -> Strategy:
        return strategy

    name = "Test" + "".join(part.title() for part in strategy.name.split("_"))
    body: dict[str, Any] = {"strategy": pytest.fixture(fixture), "__module__": __name__}
    if strategy.name in _SLOW:
        body.update(sample_seeds=_SLOW[strategy.name], pytestmark=[pytest.mark.slow])
    if strategy.name in _CONTEXT:
        body.update(sampling_context=_CONTEXT[strategy.name])
    return type(name, (StrategyConformance,), body)


for _strategy in _BUILTINS.strategies.values():
    _cls = _conformance_class(_strategy)
    globals()[_cls.__name__] = _cls


class TestBuiltinMetrics(MetricConformance):
    @pytest.fixture(params=list(_BUILTINS.metrics.values()), ids=lambda m: m.name)
    def metric(self, request: pytest.FixtureRequest) -> Metric:
        return request.param


def test_every_builtin_has_a_conformance_class() -> None:
    classes = {v.__name__ for v in globals().values()
               if isinstance(v, type) and issubclass(v, StrategyConformance) and v is not StrategyConformance}
    assert len(classes) == len(_BUILTINS.strategies) >= 4


# -- the suite fails strategies that break the contract ------------------------------------------------------
class _Noisy(Strategy):
    """Breaks three rules: "off" changes weights, a condition names an unknown param, it is unseeded."""

    name = "noisy"
    stage = Stage.COMPRESS
    description = "adds noise"

    def search_space(self, ctx: SpaceContext) -> list:
        return [categorical("level", ("none", "some")), categorical("kind", ("a", "b"), when={"levle": ["some"]})]

    def off_params(self, ctx: SpaceContext) -> Params:
        return {"level": "none"}

    def apply(self, model: Any, params: Params, trial: TrialContext) -> Any:
        import torch

        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * 0.01)  # no generator seeded from trial.seed
        return model


@pytest.fixture
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[StrategyConformance, Any, SpaceContext]:
    from optagent import hardware
    from optagent.contract import ModelFile
    from optagent.testing import DEFAULT_MODEL_SOURCE

    path: Path = tmp_path_factory.getbasetemp() / "optagent-conformance" / "conformance_model.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(DEFAULT_MODEL_SOURCE)
    return StrategyConformance(), ModelFile.from_path(path), SpaceContext(capabilities=hardware.detect("cpu"))


def test_the_suite_rejects_an_off_point_that_changes_the_model(suite: Any) -> None:
    checks, model_file, ctx = suite
    with pytest.raises(AssertionError, match="changed the model's outputs"):
        checks.test_off_leaves_the_model_unchanged(_Noisy(), model_file, ctx)


def test_the_suite_rejects_a_condition_on_an_unknown_parameter(suite: Any) -> None:
    checks, _, ctx = suite
    with pytest.raises(AssertionError, match="refers to 'levle'"):
        checks.test_search_space_is_valid(_Noisy(), ctx)


def test_the_suite_rejects_an_unseeded_strategy(suite: Any) -> None:
    checks, model_file, ctx = suite
    with pytest.raises(AssertionError, match="different models under the same seed"):
        checks.test_deterministic_under_a_seed(_Noisy(), model_file, ctx)
