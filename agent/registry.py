"""The plugin manager factory and the registry of strategies and metrics it yields.

No plugin is loaded at import time: callers build a manager with `get_plugin_manager()`. The same
function runs in the CLI, the coordinator and every worker process, so all of them see the same plugins
(given the same installed packages and the same ``OPTAGENT_PLUGINS``).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import logging
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from optagent import hookspecs
from optagent.errors import UserError
from optagent.metrics import Metric
from optagent.strategy import Strategy

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "optagent"
ALLOWLIST_VAR = "OPTAGENT_PLUGINS"
_GUARD_NAME = "optagent.registry.guard"


@dataclass(frozen=True)
class PluginSource:
    """Where a registered plugin came from: built in, an entry point of a distribution, or passed in."""

    kind: str  # "builtin" | "entry_point" | "extra"
    version: str | None = None
    distribution: str | None = None
    entry_point: str | None = None  # "name = module:attr"


@dataclass
class PluginInfo:
    name: str
    version: str | None
    builtin: bool
    strategies: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    distribution: str | None = None
    source: str = "extra"
    hooks: list[str] = field(default_factory=list)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, remembering where each plugin came from (for `optagent plugins`)."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.sources: dict[str, PluginSource] = {}
        self.load_warnings: list[str] = []


@dataclass
class Registry:
    """Strategies and metrics by name, with which plugin provided each."""

    pm: pluggy.PluginManager
    strategies: dict[str, Strategy]
    metrics: dict[str, Metric]
    plugins: dict[str, PluginInfo]
    warnings: list[str]

    def strategy(self, name: str) -> Strategy:
        try:
            return self.strategies[name]
        except KeyError:
            known = ", ".join(sorted(self.strategies)) or "none"
            raise UserError(f"unknown strategy {name!r}; installed strategies: {known}") from None


def _allowlist() -> set[str] | None:
    """OPTAGENT_PLUGINS: unset = every installed plugin; empty = built-ins only; else a comma list."""
    raw = os.environ.get(ALLOWLIST_VAR)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _hook_names() -> list[str]:
    return [name for name, fn in vars(hookspecs).items()
            if name.startswith(f"{hookspecs.PROJECT}_") and inspect.isfunction(fn)]


def _spelling_problems(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """Hook implementations the plugin manager cannot match: unknown names, or a hook without @hookimpl.

    pluggy's `check_pending` finds the first kind for the whole manager; checking each plugin lets the
    warning name the plugin and suggest the hook it probably meant.
    """
    known = _hook_names()
    problems = []
    for caller in pm.get_hookcallers(plugin) or []:
        if not caller.has_spec():
            close = difflib.get_close_matches(caller.name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"unknown hook {caller.name}{hint}")
    for attr in dir(plugin):
        if not attr.startswith(f"{hookspecs.PROJECT}_") or pm.parse_hookimpl_opts(plugin, attr) is not None:
            continue
        if inspect.isroutine(getattr(plugin, attr, None)):
            if attr in known:
                problems.append(f"{attr} lacks the @optagent.hookimpl decorator")
            else:
                close = difflib.get_close_matches(attr, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"unknown hook {attr}{hint}")
    return problems


def _register_checked(pm: PluginManager, plugin: Any, name: str | None, source: PluginSource,
                      warnings: list[str]) -> None:
    """Register one plugin; on an import-time or spelling problem unregister it and warn, naming it."""
    registered = pm.register(plugin, name=name)
    assert registered is not None  # register() returns the name, or None when blocked (never here)
    problems = _spelling_problems(pm, plugin)
    if problems:
        pm.unregister(plugin)
        _warn(warnings, f"plugin {registered!r} was skipped: {'; '.join(problems)}")
        return
    pm.sources[registered] = source


def _warn(warnings: list[str], message: str) -> None:
    if message not in warnings:
        warnings.append(message)


def _entry_point_text(ep: importlib.metadata.EntryPoint) -> str:
    return f"{ep.name} = {ep.value}"


def get_plugin_manager(*, load_entry_points: bool = True, extra: list[Any] | None = None,
                       warnings: list[str] | None = None) -> PluginManager:
    """A fresh plugin manager with the built-ins, the allowed entry-point plugins and `extra` objects.

    A plugin that fails to import, implements a misspelled hook or forgets ``@hookimpl`` is skipped with a
    one-line warning naming it (appended to `warnings` and to ``pm.load_warnings``; `build_registry` logs it); it never
    stops the CLI or a worker. A built-in plugin with such a problem is a bug and raises.
    """
    from optagent import __version__
    from optagent.plugins import DEFAULT_PLUGINS

    warnings = warnings if warnings is not None else []
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    pm.register(_LifecycleGuard(), name=_GUARD_NAME)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        pm.sources[module_name] = PluginSource("builtin", __version__, "optagent")
    pm.check_pending()  # only built-ins so far: a failure here is optagent's own bug
    if load_entry_points:
        allow = _allowlist()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allow is not None and ep.name not in allow:
                continue
            if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue  # the same distribution seen twice on sys.path
            dist = getattr(ep, "dist", None)
            source = PluginSource("entry_point", dist.version if dist else None,
                                  dist.metadata["Name"] if dist else None, _entry_point_text(ep))
            try:
                plugin = ep.load()
                _register_checked(pm, plugin, ep.name, source, warnings)
            except Exception as exc:  # a broken plugin must not take the tool down
                detail = str(exc).splitlines()[0] if str(exc) else ""
                _warn(warnings, f"plugin {ep.name!r} ({_entry_point_text(ep)}) was skipped: "
                                f"{type(exc).__name__}: {detail}")
    for obj in extra or []:
        _register_checked(pm, obj, None, PluginSource("extra"), warnings)
    pm.check_pending()  # every plugin with an unknown hook was unregistered above; this is the backstop
    pm.load_warnings = warnings
    return pm


def build_registry(pm: pluggy.PluginManager | None = None, warnings: list[str] | None = None,
                   log_warnings: bool = True) -> Registry:
    """Ask every plugin for its strategies and metrics; duplicate names are an error naming both.

    A plugin whose registration hook raises is skipped with a warning (the others still register).
    The warnings are logged, one line each, unless `log_warnings` is false (trial processes: the CLI or
    `optagent worker` that started them has said it once already); `Registry.warnings` always has them.
    """
    warnings = warnings if warnings is not None else []
    pm = pm or get_plugin_manager(warnings=warnings)
    for message in getattr(pm, "load_warnings", []):
        if message not in warnings:
            warnings.append(message)
    sources: dict[str, PluginSource] = getattr(pm, "sources", {})
    strategies: dict[str, Strategy] = {}
    metrics: dict[str, Metric] = {}
    owners: dict[str, str] = {}
    plugins: dict[str, PluginInfo] = {}

    for name, plugin in pm.list_name_plugin():  # registration order: built-ins first
        if plugin is None or name == _GUARD_NAME:
            continue
        src = sources.get(name, PluginSource("extra"))
        hooks = sorted(c.name for c in pm.get_hookcallers(plugin) or [])
        plugins[name] = PluginInfo(name, src.version, src.kind == "builtin", distribution=src.distribution,
                                   source=src.kind, hooks=hooks)

    def make_register(kind: str, table: dict[str, Any], plugin_name: str) -> Any:
        def register(item: Any) -> None:
            expected = Strategy if kind == "strategy" else Metric
            if not isinstance(item, expected):
                raise UserError(f"plugin {plugin_name!r} registered {item!r}, which is not an optagent."
                                f"{expected.__name__} instance; register an instance")
            if item.name in table:
                raise UserError(f"{kind} {item.name!r} is registered by both {owners[kind + item.name]!r} "
                                f"and {plugin_name!r}; uninstall one or disable it with {ALLOWLIST_VAR}")
            table[item.name] = item
            owners[kind + item.name] = plugin_name
            info = plugins[plugin_name]
            (info.strategies if kind == "strategy" else info.metrics).append(item.name)
        return register

    for hook, kind, table in ((pm.hook.optagent_register_strategies, "strategy", strategies),
                              (pm.hook.optagent_register_metrics, "metric", metrics)):
        # One implementation at a time (not hook(...)) so one broken plugin cannot hide the others.
        for impl in hook.get_hookimpls():  # registration order, built-ins first
            register = make_register(kind, table, impl.plugin_name)
            try:
                impl.function(**{arg: register for arg in impl.argnames})
            except UserError:
                raise
            except Exception as exc:
                _warn(warnings, f"plugin {impl.plugin_name!r} failed in {hook.name} and was skipped: "
                                f"{type(exc).__name__}: {exc}")
    if log_warnings:
        for message in warnings:
            log.warning(message)
    return Registry(pm, strategies, metrics, plugins, warnings)


def _culprit(exc: BaseException, hook_name: str) -> str:
    """The module of the innermost hook implementation in the traceback (the plugin that raised)."""
    tb, found = exc.__traceback__, "a plugin"
    while tb is not None:
        if tb.tb_frame.f_code.co_name == hook_name:
            found = repr(tb.tb_frame.f_globals.get("__name__", "a plugin"))
        tb = tb.tb_next
    return found


class _LifecycleGuard:
    """Wraps the lifecycle hooks so a failing experiment-tracker plugin is logged, never fatal to a job.

    pluggy stops calling the remaining implementations of a hook once one raises; the guard turns that
    exception into a warning so the coordinator carries on.
    """

    @staticmethod
    def _guard(hook_name: str) -> Generator[None, Any, Any]:
        try:
            return (yield)
        except Exception as exc:
            log.warning("plugin %s failed in %s: %s: %s (ignored)", _culprit(exc, hook_name), hook_name,
                        type(exc).__name__, exc)
            return []

    @hookspecs.hookimpl(wrapper=True)
    def optagent_job_started(self, job: dict[str, Any]) -> Generator[None, Any, Any]:
        return (yield from self._guard("optagent_job_started"))

    @hookspecs.hookimpl(wrapper=True)
    def optagent_trial_started(self, job: dict[str, Any], trial: dict[str, Any]) -> Generator[None, Any, Any]:
        return (yield from self._guard("optagent_trial_started"))

    @hookspecs.hookimpl(wrapper=True)
    def optagent_trial_finished(self, job: dict[str, Any], trial: dict[str, Any]) -> Generator[None, Any, Any]:
        return (yield from self._guard("optagent_trial_finished"))

    @hookspecs.hookimpl(wrapper=True)
    def optagent_job_finished(self, job: dict[str, Any], pareto: list[dict[str, Any]]) -> Generator[None, Any, Any]:
        return (yield from self._guard("optagent_job_finished"))
