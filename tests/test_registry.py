"""The plugin registry: built-ins register through the public hooks, and bad plugins are handled."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from optagent.errors import UserError
from optagent.hookspecs import hookimpl
from optagent.metrics import Metric
from optagent.plugins.pruning import PruningStrategy
from optagent.registry import build_registry, get_plugin_manager
from optagent.strategy import Stage, Strategy

BUILTIN_STRATEGIES = {"pruning": Stage.COMPRESS, "finetune": Stage.FINETUNE, "quantization": Stage.QUANTIZE,
                      "batch_size": Stage.DEPLOY, "runtime": Stage.DEPLOY}
BUILTIN_METRICS = {"model_size_mb", "param_count", "nonzero_params", "flops", "peak_memory_mb"}


def registry_with(*extra: object, warnings: list[str] | None = None):  # noqa: ANN201
    warnings = warnings if warnings is not None else []
    pm = get_plugin_manager(load_entry_points=False, extra=list(extra), warnings=warnings)
    return pm, build_registry(pm, warnings=warnings)


def test_builtins_register_their_strategies_and_metrics():
    _, registry = registry_with()
    assert {name: s.stage for name, s in registry.strategies.items()} == BUILTIN_STRATEGIES
    assert set(registry.metrics) == BUILTIN_METRICS
    assert all(m.direction in ("minimize", "maximize") for m in registry.metrics.values())
    assert registry.plugins["optagent.plugins.pruning"].strategies == ["pruning"]
    assert set(registry.plugins["optagent.plugins.metrics"].metrics) == BUILTIN_METRICS
    assert registry.warnings == []


class DuplicatePruning:
    """A third-party plugin that reuses a built-in strategy name."""

    @hookimpl
    def optagent_register_strategies(self, register: Callable[[Strategy], None]) -> None:
        register(PruningStrategy())


def test_a_duplicate_strategy_name_is_an_error_naming_both_plugins():
    plugin = DuplicatePruning()
    pm = get_plugin_manager(load_entry_points=False, extra=[plugin])
    with pytest.raises(UserError) as err:
        build_registry(pm)
    message = str(err.value)
    assert "'pruning'" in message
    assert "optagent.plugins.pruning" in message and repr(pm.get_name(plugin)) in message


class Broken:
    """A plugin whose registration hooks crash."""

    @hookimpl
    def optagent_register_strategies(self, register: Callable[[Strategy], None]) -> None:
        raise RuntimeError("boom in strategies")

    @hookimpl
    def optagent_register_metrics(self, register: Callable[[Metric], None]) -> None:
        raise RuntimeError("boom in metrics")


def test_a_plugin_whose_register_hook_raises_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture):
    warnings: list[str] = []
    plugin = Broken()
    with caplog.at_level(logging.WARNING, logger="optagent.registry"):
        pm, registry = registry_with(plugin, warnings=warnings)
    assert set(registry.strategies) == set(BUILTIN_STRATEGIES)
    assert set(registry.metrics) == BUILTIN_METRICS
    name = pm.get_name(plugin)
    assert len(warnings) == 2 and all(name in w for w in warnings)
    assert any("boom in strategies" in w for w in warnings) and any("boom in metrics" in w for w in warnings)
    assert "boom in strategies" in caplog.text


def test_registering_a_non_strategy_is_an_error():
    class Wrong:
        @hookimpl
        def optagent_register_strategies(self, register: Callable[[Strategy], None]) -> None:
            register("pruning")  # type: ignore[arg-type]

    with pytest.raises(UserError, match="not an optagent.Strategy instance"):
        registry_with(Wrong())
