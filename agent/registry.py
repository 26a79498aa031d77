"""The plugin manager factory and the registry of strategies and metrics it yields.

No plugin is loaded at import time: callers build a manager with `get_plugin_manager()`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy
from optagent import hookspecs
from optagent.errors import UserError
from optagent.metrics import Metric
from optagent.strategy import Strategy

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "optagent"


@dataclass
class PluginInfo:
    name: str
    version: str | None
    builtin: bool
    strategies: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)


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
    raw = os.environ.get("OPTAGENT_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def get_plugin_manager(*, load_entry_points: bool = True, extra: list[Any] | None = None,
                       warnings: list[str] | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-ins, the allowed entry-point plugins and `extra` objects.

    A plugin that fails to import or register is skipped with a warning naming it; it never stops
    the CLI or a worker. Misspelled hook implementations fail loudly via `check_pending`.
    """
    from optagent.plugins import DEFAULT_PLUGINS

    warnings = warnings if warnings is not None else []
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        allow = _allowlist()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allow is not None and ep.name not in allow:
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not take the tool down
                message = f"plugin {ep.name!r} was skipped: {type(exc).__name__}: {exc}"
                warnings.append(message)
                log.warning(message)
    for obj in extra or []:
        pm.register(obj)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise UserError(f"a plugin implements an unknown hook: {exc}; fix the hook name "
                        "(see docs/plugins.md for the list)") from exc
    return pm


def _plugin_version(pm: pluggy.PluginManager, plugin: Any) -> str | None:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return str(dist.version)
    return None


def build_registry(pm: pluggy.PluginManager | None = None, warnings: list[str] | None = None) -> Registry:
    """Ask every plugin for its strategies and metrics; duplicate names are an error naming both."""
    from optagent import __version__

    warnings = warnings if warnings is not None else []
    pm = pm or get_plugin_manager(warnings=warnings)
    strategies: dict[str, Strategy] = {}
    metrics: dict[str, Metric] = {}
    owners: dict[str, str] = {}
    plugins: dict[str, PluginInfo] = {}

    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        builtin = name.startswith("optagent.")
        plugins[name] = PluginInfo(name, __version__ if builtin else _plugin_version(pm, plugin), builtin)

    def make_register(kind: str, table: dict[str, Any], plugin_name: str) -> Any:
        def register(item: Any) -> None:
            expected = Strategy if kind == "strategy" else Metric
            if not isinstance(item, expected):
                raise UserError(f"plugin {plugin_name!r} registered {item!r}, which is not an optagent."
                                f"{expected.__name__} instance; register an instance")
            if item.name in table:
                raise UserError(f"{kind} {item.name!r} is registered by both {owners[kind + item.name]!r} "
                                f"and {plugin_name!r}; uninstall one or disable it with OPTAGENT_PLUGINS")
            table[item.name] = item
            owners[kind + item.name] = plugin_name
            info = plugins[plugin_name]
            (info.strategies if kind == "strategy" else info.metrics).append(item.name)
        return register

    for hook, kind, table in ((pm.hook.optagent_register_strategies, "strategy", strategies),
                              (pm.hook.optagent_register_metrics, "metric", metrics)):
        for impl in hook.get_hookimpls():  # registration order, built-ins first
            try:
                impl.function(register=make_register(kind, table, impl.plugin_name))
            except UserError:
                raise
            except Exception as exc:
                message = (f"plugin {impl.plugin_name!r} failed in {hook.name} and was skipped: "
                           f"{type(exc).__name__}: {exc}")
                warnings.append(message)
                log.warning(message)
    return Registry(pm, strategies, metrics, plugins, warnings)
