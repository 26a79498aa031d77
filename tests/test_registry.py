"""The plugin registry: built-ins register through the public hooks; a broken plugin is skipped whole, with a
warning naming it and the check it failed, and can never change another plugin's or the model's figures."""

from __future__ import annotations

import importlib
import logging
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from optagent import __version__
from optagent.errors import UserError
from optagent.hookspecs import hookimpl
from optagent.metrics import RESERVED, Metric
from optagent.plugins.pruning import PruningStrategy
from optagent.registry import build_registry, get_plugin_manager
from optagent.strategy import Params, SpaceContext, Stage, Strategy, TrialContext, categorical

BUILTIN_STRATEGIES = {"pruning": Stage.COMPRESS, "finetune": Stage.FINETUNE, "quantization": Stage.QUANTIZE,
                      "mixed_precision": Stage.QUANTIZE, "batch_size": Stage.DEPLOY, "runtime": Stage.DEPLOY}
BUILTIN_METRICS = {"model_size_mb", "param_count", "nonzero_params", "flops", "peak_memory_mb"}


def registry_with(*extra: object, warnings: list[str] | None = None):  # noqa: ANN201
    warnings = warnings if warnings is not None else []
    pm = get_plugin_manager(load_entry_points=False, extra=list(extra), warnings=warnings)
    return pm, build_registry(pm, warnings=warnings)


def _value(model: Any, trial: Any, batch: Any) -> float:
    return 0.123


class Toy(Strategy):
    """A valid strategy; subclasses break one rule each."""

    name = "toy"
    stage = Stage.COMPRESS
    description = "does nothing"

    def search_space(self, ctx: SpaceContext) -> list:
        return [categorical("mode", ("off", "on")), categorical("level", (1, 2), when={"mode": ["on"]})]

    def off_params(self, ctx: SpaceContext) -> Params:
        return {"mode": "off"}

    def apply(self, model: Any, params: Params, trial: TrialContext) -> Any:
        return model


def plugin(*strategies: Strategy, metrics: tuple[Metric, ...] = (), fail: str | None = None) -> object:
    """A plugin object registering `strategies` and `metrics`, then raising `fail` if given."""

    class Plugin:
        @hookimpl
        def optagent_register_strategies(self, register: Callable[[Strategy], None]) -> None:
            for s in strategies:
                register(s)

        @hookimpl
        def optagent_register_metrics(self, register: Callable[[Metric], None]) -> None:
            for m in metrics:
                register(m)
            if fail:
                raise RuntimeError(fail)

    return Plugin()


def test_builtins_register_their_strategies_and_metrics() -> None:
    _, registry = registry_with()
    assert {name: s.stage for name, s in registry.strategies.items()} == BUILTIN_STRATEGIES
    assert set(registry.metrics) == BUILTIN_METRICS
    assert all(m.direction in ("minimize", "maximize") for m in registry.metrics.values())
    assert registry.plugins["optagent.plugins.pruning"].strategies == ["pruning"]
    assert set(registry.plugins["optagent.plugins.metrics"].metrics) == BUILTIN_METRICS
    assert registry.warnings == [] and registry.skipped == {}


# -- bug 1: a metric plugin cannot overwrite the built-in figures or another plugin's -----------------------
def test_a_metric_named_like_a_measurement_is_skipped_with_a_warning_and_the_rest_kept() -> None:
    thief = plugin(metrics=(Metric("latency_ms", "min", "ms", "steals the latency", _value),
                            Metric("speedup", "max", "x", "steals the speedup", _value),
                            Metric("own_figure", "max", "", "a figure of its own", _value)))
    warnings: list[str] = []
    pm, registry = registry_with(thief, warnings=warnings)
    name = pm.get_name(thief)
    assert "latency_ms" not in registry.metrics and "speedup" not in registry.metrics
    assert "own_figure" in registry.metrics  # only the clashing metrics are skipped, not the plugin
    assert registry.plugins[name].metrics == ["own_figure"]
    assert len(warnings) == 2 and all(name in w and "reserved" in w for w in warnings)
    assert "'latency_ms'" in warnings[0] and "'speedup'" in warnings[1]
    assert {"latency_ms", "latency_p99_ms", "speedup", "accuracy"} - RESERVED == {"accuracy"}


def test_a_metric_named_like_another_plugins_metric_leaves_the_first_one_in_place() -> None:
    copy = plugin(metrics=(Metric("model_size_mb", "minimize", "MiB", "a rival size", _value),))
    warnings: list[str] = []
    pm, registry = registry_with(copy, warnings=warnings)
    assert registry.metrics["model_size_mb"].compute is not _value  # still the built-in's
    assert registry.owner("metric", "model_size_mb") == "optagent.plugins.metrics"
    [warning] = warnings
    assert pm.get_name(copy) in warning and "'optagent.plugins.metrics' registered that name first" in warning


# -- bug 2: registrations are committed only when the plugin's hooks return ---------------------------------
class _Halfway(Toy):
    name = "halfway"


def test_a_plugin_that_registers_then_raises_leaves_nothing_registered(caplog: pytest.LogCaptureFixture) -> None:
    called: list[str] = []

    class Tracker:
        @hookimpl
        def optagent_job_started(self, job: dict[str, Any]) -> None:
            called.append("job_started")

    broken = plugin(_Halfway(), metrics=(Metric("half_metric", "max", "", "registered before the crash", _value),),
                    fail="boom after registering")
    broken.optagent_job_started = Tracker().optagent_job_started  # type: ignore[attr-defined]
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING, logger="optagent.registry"):
        pm, registry = registry_with(broken, warnings=warnings)
    assert "halfway" not in registry.strategies and "half_metric" not in registry.metrics
    name = next(iter(registry.skipped))
    assert name not in registry.plugins  # `optagent plugins --json` does not list it
    assert not pm.has_plugin(name)  # nor do its lifecycle hooks run (has_plugin takes the name)
    pm.hook.optagent_job_started(job={"id": 1})
    assert called == []
    [warning] = warnings
    assert f"plugin {name!r} was skipped" in warning and "RuntimeError: boom after registering" in warning
    assert warning in caplog.text
    with pytest.raises(UserError, match="strategy 'halfway' is not available"):
        registry.strategy("halfway")


def test_search_refuses_the_strategy_of_a_plugin_that_raised() -> None:
    from optagent import api

    _, registry = registry_with(plugin(_Halfway(), fail="boom"))
    with pytest.raises(UserError, match="halfway"):
        api.search("no_such_model.py", strategies=["pruning", "halfway"], registry=registry)


def test_both_registration_hooks_failing_is_one_warning_with_both_errors() -> None:
    class Broken:
        @hookimpl
        def optagent_register_strategies(self, register: Callable[[Strategy], None]) -> None:
            raise RuntimeError("boom in strategies")

        @hookimpl
        def optagent_register_metrics(self, register: Callable[[Metric], None]) -> None:
            raise RuntimeError("boom in metrics")

    warnings: list[str] = []
    _, registry = registry_with(Broken(), warnings=warnings)
    assert set(registry.strategies) == set(BUILTIN_STRATEGIES) and set(registry.metrics) == BUILTIN_METRICS
    [warning] = warnings
    assert "boom in strategies" in warning and "boom in metrics" in warning


def test_registering_something_else_than_a_strategy_skips_the_plugin() -> None:
    warnings: list[str] = []
    _, registry = registry_with(plugin("pruning"), warnings=warnings)  # type: ignore[arg-type]
    [warning] = warnings
    assert "'pruning' is not an optagent.Strategy instance" in warning
    assert set(registry.strategies) == set(BUILTIN_STRATEGIES)


# -- bug 3: spaces are checked when the registry loads --------------------------------------------------------
class _OffOutside(Toy):
    name = "off_outside"

    def search_space(self, ctx: SpaceContext) -> list:
        return [categorical("mode", ("a", "b"))]

    def off_params(self, ctx: SpaceContext) -> Params:
        return {"mode": "off"}


class _UnknownWhen(Toy):
    name = "unknown_when"

    def search_space(self, ctx: SpaceContext) -> list:
        return [categorical("mode", ("off", "on")), categorical("level", (1, 2), when={"mdoe": ["on"]})]


class _UnknownCrossWhen(Toy):
    name = "unknown_cross_when"

    def search_space(self, ctx: SpaceContext) -> list:
        return [categorical("mode", ("off", "on"), when={"runtime.engin": ["eager"]})]

    def off_params(self, ctx: SpaceContext) -> Params:
        return {}


class _SelfCycle(Toy):
    name = "self_cycle"

    def search_space(self, ctx: SpaceContext) -> list:
        return [categorical("a", ("x", "y"), when={"b": ["x"]}), categorical("b", ("x", "y"), when={"a": ["x"]})]

    def off_params(self, ctx: SpaceContext) -> Params:
        return {}


class _PingA(Toy):
    name = "ping_a"

    def search_space(self, ctx: SpaceContext) -> list:
        return [categorical("mode", ("off", "on"), when={"ping_b.mode": ["on"]})]

    def off_params(self, ctx: SpaceContext) -> Params:
        return {}


class _PingB(Toy):
    name = "ping_b"

    def search_space(self, ctx: SpaceContext) -> list:
        return [categorical("mode", ("off", "on"), when={"ping_a.mode": ["on"]})]

    def off_params(self, ctx: SpaceContext) -> Params:
        return {}


@pytest.mark.parametrize(("strategy", "check"), [
    (_OffOutside(), "strategy 'off_outside': off value mode='off' is not in ['a', 'b']"),
    (_UnknownWhen(), "strategy 'unknown_when', parameter 'level': `when` refers to 'mdoe', which is not another "
                     "parameter of unknown_when"),
    (_UnknownCrossWhen(), "strategy 'unknown_cross_when', parameter 'mode': `when` refers to 'runtime.engin', but "
                          "strategy 'runtime' declares no parameter 'engin'"),
    (_SelfCycle(), "form a cycle"),
], ids=["off-outside-choices", "when-unknown-sibling", "when-unknown-cross", "cycle"])
def test_an_invalid_space_skips_the_plugin_with_a_warning_naming_it_and_the_check(strategy: Strategy,
                                                                                  check: str) -> None:
    bad = plugin(strategy, metrics=(Metric("bad_plugins_metric", "max", "", "goes with the plugin", _value),))
    warnings: list[str] = []
    pm = get_plugin_manager(load_entry_points=False, extra=[plugin(Toy()), bad], warnings=warnings)
    name = pm.get_name(bad)
    registry = build_registry(pm, warnings)
    assert strategy.name not in registry.strategies and "bad_plugins_metric" not in registry.metrics
    assert "toy" in registry.strategies  # the other plugin is untouched
    [warning] = warnings
    assert warning.startswith(f"plugin {name!r} was skipped: ") and check in warning
    assert registry.skipped == {name: warning.partition("was skipped: ")[2]}


def test_a_cycle_across_two_plugins_skips_the_plugin_that_closes_it() -> None:
    first, second = plugin(_PingA()), plugin(_PingB())
    warnings: list[str] = []
    pm = get_plugin_manager(load_entry_points=False, extra=[first, second], warnings=warnings)
    name = pm.get_name(second)
    registry = build_registry(pm, warnings)
    assert "ping_a" in registry.strategies and "ping_b" not in registry.strategies
    [warning] = warnings
    assert warning.startswith(f"plugin {name!r} was skipped: ") and "form a cycle" in warning
    assert "ping_a.mode" in warning and "ping_b.mode" in warning
    assert pm.is_registered(first) and not pm.is_registered(second)


@pytest.mark.parametrize(("given", "stored"), [("max", "maximize"), ("MIN", "minimize"), ("minimize", "minimize")])
def test_metric_direction_aliases_are_normalised(given: str, stored: str) -> None:
    assert Metric("m", given, "", "d", _value).direction == stored


def test_a_metric_with_a_bad_direction_skips_its_plugin_naming_the_check() -> None:
    class BadDirection:
        @hookimpl
        def optagent_register_metrics(self, register: Callable[[Metric], None]) -> None:
            register(Metric("tail_ms", "lower", "ms", "tail latency", _value))

    warnings: list[str] = []
    pm, registry = registry_with(BadDirection(), warnings=warnings)
    assert "tail_ms" not in registry.metrics
    [warning] = warnings
    assert "was skipped" in warning and "direction 'lower' is not 'maximize' or 'minimize'" in warning


# -- bug 4: a clash between two plugins is a warning, not an error ----------------------------------------------
class DuplicatePruning:
    """A third-party plugin that reuses a built-in strategy name."""

    @hookimpl
    def optagent_register_strategies(self, register: Callable[[Strategy], None]) -> None:
        register(PruningStrategy())


def test_a_duplicate_strategy_name_is_a_warning_naming_both_plugins_and_the_first_stays() -> None:
    dup = DuplicatePruning()
    warnings: list[str] = []
    pm, registry = registry_with(dup, warnings=warnings)
    [message] = warnings
    assert "strategy 'pruning' was skipped" in message
    assert "optagent.plugins.pruning" in message and repr(pm.get_name(dup)) in message
    assert registry.owner("strategy", "pruning") == "optagent.plugins.pruning"


def test_optagent_plugins_keeps_working_with_a_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from optagent.cli import app
    from optagent.registry import build_registry as real

    monkeypatch.setattr("optagent.registry.build_registry",
                        lambda *a, **k: real(get_plugin_manager(load_entry_points=False, extra=[DuplicatePruning()])))
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    assert "strategy 'pruning' was skipped" in result.output


# -- versions -------------------------------------------------------------------------------------------------
def test_versions_cover_every_plugin_and_a_worker_with_another_version_is_told_why() -> None:
    from optagent.registry import plugin_versions, recipe_plugins

    _, registry = registry_with()
    versions = registry.versions()
    assert versions == {name: __version__ for name in registry.plugins}
    assert plugin_versions(registry) == versions
    assert registry.version_mismatch(versions) is None
    other = {**versions, "optagent.plugins.pruning": "0.0.9", "not_here": "1.0"}
    reason = registry.version_mismatch(other, host="gpu-7")
    assert reason is not None and reason.startswith("plugin versions differ on worker host gpu-7: ")
    assert f"optagent.plugins.pruning {__version__} here, 0.0.9 on the coordinator" in reason
    recipe = recipe_plugins(["pruning"], registry)
    assert recipe["optagent.plugins.pruning"] == {"version": __version__, "distribution": "optagent",
                                                  "strategies": ["pruning"], "metrics": []}
    assert "optagent.plugins.metrics" in recipe and "optagent.plugins.runtime" not in recipe


# -- OPTAGENT_PLUGINS and entry points ---------------------------------------------------------------------------
@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two installed distributions on sys.path: optagent-lowrank (entry point `lowrank`) and optagent-noisy."""
    for dist, ep, module, strategy in (("optagent-lowrank", "lowrank", "optagent_lowrank_t", "lowrank_t"),
                                       ("optagent_noisy", "noisy", "optagent_noisy_t", "noisy_t")):
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
            import optagent
            from optagent import Stage, Strategy, categorical

            class S(Strategy):
                name = {strategy!r}
                stage = Stage.COMPRESS
                description = "does nothing"

                def search_space(self, ctx):
                    return [categorical("mode", ("off", "on"))]

                def off_params(self, ctx):
                    return {{"mode": "off"}}

                def apply(self, model, params, trial):
                    return model

            @optagent.hookimpl
            def optagent_register_strategies(register):
                register(S())
        """))
        info = tmp_path / f"{dist.replace('-', '_')}-1.2.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2\n")
        (info / "entry_points.txt").write_text(f"[optagent]\n{ep} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def _loaded(monkeypatch: pytest.MonkeyPatch, allow: str | None) -> Any:
    if allow is None:
        monkeypatch.delenv("OPTAGENT_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("OPTAGENT_PLUGINS", allow)
    warnings: list[str] = []
    return build_registry(get_plugin_manager(warnings=warnings), warnings, log_warnings=False)


def test_the_allowlist_takes_entry_point_and_distribution_names(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"lowrank_t", "noisy_t"} <= set(_loaded(monkeypatch, None).strategies)
    by_entry_point = _loaded(monkeypatch, "lowrank")
    assert "lowrank_t" in by_entry_point.strategies and "noisy_t" not in by_entry_point.strategies
    by_distribution = _loaded(monkeypatch, "optagent-noisy")  # the name the user pip-installed
    assert "noisy_t" in by_distribution.strategies and "lowrank_t" not in by_distribution.strategies
    assert "noisy_t" in _loaded(monkeypatch, "Optagent_Noisy").strategies  # compared as pip compares names
    assert by_distribution.versions()["noisy"] == "1.2"


def test_unknown_allowlist_names_are_a_warning(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _loaded(monkeypatch, "lowrank, optagent-lowrnak")
    [warning] = registry.warnings
    assert "OPTAGENT_PLUGINS names 'optagent-lowrnak'" in warning and "lowrank (optagent-lowrank)" in warning


def test_an_excluded_plugin_is_reported_as_excluded_not_missing(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _loaded(monkeypatch, "lowrank")
    assert set(registry.excluded) >= {"noisy"}
    with pytest.raises(UserError) as err:
        registry.strategy("noisy_t")
    assert "excludes the installed plugin(s)" in str(err.value) and "noisy (optagent_noisy 1.2)" in str(err.value)
    assert "not installed" not in str(err.value)


def test_a_plugin_import_traceback_is_logged_at_debug_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "optagent_crashes_t.py").write_text("def helper():\n    raise ImportError('needs vendor_sdk')\n"
                                                    "helper()\n")
    info = tmp_path / "optagent_crashes-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: optagent-crashes\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[optagent]\ncrashes = optagent_crashes_t\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setenv("OPTAGENT_PLUGINS", "crashes")
    with caplog.at_level(logging.DEBUG, logger="optagent.registry"):
        registry = build_registry(log_warnings=False)
    [warning] = registry.warnings
    assert "plugin 'crashes'" in warning and "ImportError: needs vendor_sdk" in warning
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "crashes" in r.getMessage()]
    assert debug and debug[0].exc_info is not None
    assert "in helper" in caplog.text  # the plugin's own frame, for the author


def test_cosmetic_gaps_do_not_skip_a_plugin() -> None:
    """An empty description is the conformance suite's to point out, not a reason to drop the plugin."""

    class Terse(Toy):
        name = "terse"
        description = ""

    warnings: list[str] = []
    _, registry = registry_with(plugin(Terse(), metrics=(Metric("terse_metric", "min", "", "", _value),)),
                                warnings=warnings)
    assert "terse" in registry.strategies and "terse_metric" in registry.metrics and warnings == []
