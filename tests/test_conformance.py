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
# Strategies whose every point that is not off changes the model's outputs (the others act through
# trial.settings or trial.loss_fn, or train in ways a sampled point may leave unchanged).
_CHANGES = {"pruning", "quantization"}


def _conformance_class(strategy: Strategy) -> type:
    def fixture(self: Any) -> Strategy:
        return strategy

    name = "Test" + "".join(part.title() for part in strategy.name.split("_"))
    body: dict[str, Any] = {"strategy": pytest.fixture(fixture), "__module__": __name__}
    if strategy.name in _SLOW:
        body.update(sample_seeds=_SLOW[strategy.name], pytestmark=[pytest.mark.slow])
    if strategy.name in _CONTEXT:
        body.update(sampling_context=_CONTEXT[strategy.name])
    if strategy.name in _CHANGES:
        body.update(check_changes_model=True)
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
    from optagent.testing import default_model_file

    path: Path = default_model_file(tmp_path_factory.getbasetemp() / "optagent-conformance")
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


class _ReturnsNone(_Noisy):
    """Changes the model in place and forgets to return it (the guide once said "in place or return")."""

    name = "returns_none"

    def apply(self, model: Any, params: Params, trial: TrialContext) -> Any:
        return None


def test_the_suite_says_apply_returned_none(suite: Any) -> None:
    checks, model_file, ctx = suite
    with pytest.raises(TypeError, match=r"returns_none: apply\(\) returned None; return the model"):
        checks.test_off_leaves_the_model_unchanged(_ReturnsNone(), model_file, ctx)


class _DoesNothing(_Noisy):
    """A strategy whose points that are not off leave the model as it is."""

    name = "does_nothing"

    def search_space(self, ctx: SpaceContext) -> list:
        return [categorical("level", ("none", "some"))]

    def apply(self, model: Any, params: Params, trial: TrialContext) -> Any:
        return model


def test_the_opt_in_check_catches_a_strategy_that_changes_nothing(suite: Any) -> None:
    _, model_file, ctx = suite
    opted_in = type("Checks", (StrategyConformance,), {"check_changes_model": True})()
    with pytest.raises(AssertionError, match="apply\\(\\) changed nothing"):
        opted_in.test_changes_the_model(_DoesNothing(), model_file, ctx)
    with pytest.raises(pytest.skip.Exception, match="check_changes_model is False"):
        StrategyConformance().test_changes_the_model(_DoesNothing(), model_file, ctx)


class _TouchesBaseline(_DoesNothing):
    """Trains the teacher instead of the student."""

    name = "touches_baseline"

    def apply(self, model: Any, params: Params, trial: TrialContext) -> Any:
        import torch

        if params.get("level") == "some":
            with torch.no_grad():
                next(trial.baseline.parameters()).mul_(0.5)
        return model


def test_the_suite_catches_a_strategy_that_modifies_the_baseline(suite: Any) -> None:
    checks, model_file, ctx = suite
    with pytest.raises(AssertionError, match="modified trial.baseline"):
        checks.test_sampled_points_keep_the_model_runnable(_TouchesBaseline(), model_file, ctx)


def _mutating_metric(model: Any, trial: Any, batch: Any) -> float:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return 1.0


def test_the_metric_suite_catches_a_metric_that_changes_the_model(suite: Any) -> None:
    _, model_file, _ = suite
    metric = Metric("zeroes_weights", "max", "", "zeroes the model it measures", _mutating_metric)
    with pytest.raises(AssertionError, match="compute\\(\\) changed the model it measures"):
        MetricConformance().test_leaves_the_model_and_the_baseline_alone(metric, model_file)


def test_make_trial_gives_a_real_trial_context_without_internal_imports(tmp_path: Path) -> None:
    import torch

    from optagent.plugins.pruning import PruningStrategy
    from optagent.testing import apply_strategy, default_model_file, make_trial

    trial = make_trial(default_model_file(tmp_path), {"finetune": {"epochs": 1}}, seed=3,
                       settings={"train_batch_size": 32})
    assert isinstance(trial, TrialContext) and isinstance(trial.baseline, torch.nn.Module)
    assert (trial.seed, trial.train_batch_size, trial.device.type) == (3, 32, "cpu")
    assert trial.infer_batch_size == 4 and trial.params == {"finetune": {"epochs": 1}}
    trial.report(0, 0.5)  # never stops here
    assert trial.intermediate == {0: 0.5}
    params = {"method": "unstructured", "amount": 0.5}
    model, trial = apply_strategy(PruningStrategy(), params, trial)
    assert trial.params["pruning"] == params
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert zeros > 0 and all(int((p == 0).sum()) == 0 for p in trial.baseline.parameters() if p.dim() > 1)
