"""The plugin manager factory and the registry of strategies and metrics it yields.

No plugin is loaded at import time: callers build a manager with `get_plugin_manager()`. The same
function runs in the CLI, the coordinator and every worker process, so all of them see the same plugins
(given the same installed packages and the same ``OPTAGENT_PLUGINS``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pluggy

from optagent import hookspecs
from optagent.checks import hook_problems
from optagent.errors import UserError
from optagent.lifecycle import GUARD_NAME, LifecycleGuard
from optagent.metrics import RESERVED, Metric
from optagent.strategy import Strategy

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "optagent"
ALLOWLIST_VAR = "OPTAGENT_PLUGINS"


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
        self.excluded: dict[str, PluginSource] = {}  # installed entry points OPTAGENT_PLUGINS leaves out


@dataclass
class Registry:
    """Strategies and metrics by name, with which plugin provided each.

    Only plugins whose every registration passed the checks are here; `skipped` says why the others are
    not (the same text is in `warnings`), `excluded` lists installed plugins OPTAGENT_PLUGINS leaves out.
    """

    pm: pluggy.PluginManager
    strategies: dict[str, Strategy]
    metrics: dict[str, Metric]
    plugins: dict[str, PluginInfo]
    warnings: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # plugin name -> why
    excluded: dict[str, PluginSource] = field(default_factory=dict)  # entry-point name -> where it is installed

    def strategy(self, name: str) -> Strategy:
        try:
            return self.strategies[name]
        except KeyError:
            raise UserError(self.why_missing(name)) from None

    def why_missing(self, name: str, where: str = "") -> str:
        """Why strategy `name` is not available (`where`: e.g. " on worker host h"): not installed, in an
        installed plugin that OPTAGENT_PLUGINS excludes, or in a plugin that was skipped."""
        known = ", ".join(sorted(self.strategies)) or "none"
        text = f"strategy {name!r} is not available{where}"
        if self.excluded:
            plugins = ", ".join(f"{n} ({s.distribution} {s.version})" if s.distribution else n
                                for n, s in sorted(self.excluded.items()))
            text += (f": {ALLOWLIST_VAR}={os.environ.get(ALLOWLIST_VAR, '')!r} excludes the installed plugin(s) "
                     f"{plugins}; add the one that provides it to {ALLOWLIST_VAR}")
        elif self.skipped:
            text += f": plugin(s) {', '.join(sorted(self.skipped))} were skipped ({'; '.join(self.skipped.values())})"
        else:
            text += ": no installed plugin provides it"
        return f"{text}; available strategies: {known} (see `optagent plugins`)"

    def owner(self, kind: str, name: str) -> str | None:
        """The plugin that registered strategy (`kind` "strategy") or metric ("metric") `name`."""
        for info in self.plugins.values():
            if name in (info.strategies if kind == "strategy" else info.metrics):
                return info.name
        return None

    def versions(self) -> dict[str, str]:
        """Plugin name -> version of every registered plugin, built-ins included (they carry optagent's
        version); "" where a plugin has none (passed in, or an entry point without a distribution)."""
        return {name: str(info.version or "") for name, info in self.plugins.items()}

    def provenance(self, strategies: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """What `recipe.json` records: each plugin that provides one of `strategies` (default: every
        strategy) or any metric, with its version, distribution and what it provides."""
        wanted = set(self.strategies if strategies is None else strategies)
        out: dict[str, dict[str, Any]] = {}
        for name, info in self.plugins.items():
            mine = [s for s in info.strategies if s in wanted]
            if mine or info.metrics:
                out[name] = {"version": str(info.version or ""), "distribution": info.distribution,
                             "strategies": mine, "metrics": list(info.metrics)}
        return out

    def version_mismatch(self, expected: dict[str, str], host: str = "this host") -> str | None:
        """Why this registry (a worker's) must not run a trial the coordinator built with plugins `expected`
        (name -> version, `versions()` there), or None: a plugin both sides load has another version here.
        (A strategy this side lacks is `why_missing`'s to explain.)"""
        mine = self.versions()
        differ = sorted(n for n, v in expected.items() if n in mine and mine[n] != str(v or ""))
        if not differ:
            return None
        found = "; ".join(f"{n} {mine[n] or '(no version)'} here, {expected[n] or '(no version)'} on the coordinator"
                          for n in differ)
        return (f"plugin versions differ on worker host {host}: {found}; install the same plugin versions on the "
                "coordinator and every worker")


def plugin_versions(registry: Registry | None = None) -> dict[str, str]:
    """Plugin name -> version of every plugin this process loads (built-ins included): what a trial,
    a worker's fingerprint and recipe.json record. Builds the registry when none is given."""
    return (registry or build_registry(log_warnings=False)).versions()


def recipe_plugins(strategies: list[str], registry: Registry | None = None) -> dict[str, dict[str, Any]]:
    """The `plugins` entry of a recipe.json: each plugin behind the recipe's `strategies` and every metric
    plugin, with its version and distribution (see `Registry.provenance`)."""
    return (registry or build_registry(log_warnings=False)).provenance(strategies)


def _normal(name: str) -> str:
    """A distribution or entry-point name as PEP 503 compares them: case and -_. runs do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowlist() -> set[str] | None:
    """OPTAGENT_PLUGINS: unset = every installed plugin; empty = built-ins only; else a comma list of
    entry-point names and distribution names."""
    raw = os.environ.get(ALLOWLIST_VAR)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _extra_name(pm: pluggy.PluginManager, plugin: Any) -> str:
    """A readable name for a plugin object passed in (its module, or its class), unique in `pm`."""
    base = plugin.__name__ if inspect.ismodule(plugin) else f"{type(plugin).__module__}.{type(plugin).__qualname__}"
    name, n = base, 1
    while pm.has_plugin(name) or pm.is_blocked(name):
        n += 1
        name = f"{base}#{n}"
    return name


def _register_checked(pm: PluginManager, plugin: Any, name: str | None, source: PluginSource,
                      warnings: list[str]) -> None:
    """Register one plugin; on an import-time or spelling problem unregister it and warn, naming it."""
    registered = pm.register(plugin, name=name or _extra_name(pm, plugin))
    assert registered is not None  # register() returns the name, or None when blocked (never here)
    problems = hook_problems(pm, plugin)
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


def _source_of(ep: importlib.metadata.EntryPoint) -> PluginSource:
    dist = getattr(ep, "dist", None)
    return PluginSource("entry_point", dist.version if dist else None, dist.metadata["Name"] if dist else None,
                        _entry_point_text(ep))


def get_plugin_manager(*, load_entry_points: bool = True, extra: list[Any] | None = None,
                       warnings: list[str] | None = None) -> PluginManager:
    """A fresh plugin manager with the built-ins, the allowed entry-point plugins and `extra` objects.

    A plugin that fails to import, implements a misspelled hook or forgets ``@hookimpl`` is skipped with a
    one-line warning naming it (appended to `warnings` and to ``pm.load_warnings``; `build_registry` logs
    it; the traceback is logged at debug level, so ``optagent --debug`` shows it); it never stops the CLI
    or a worker. A built-in plugin with such a problem is a bug and raises. Entry points load in name order,
    so every process with the same installed packages sees the same plugins in the same order.
    """
    from optagent import __version__
    from optagent.plugins import DEFAULT_PLUGINS

    warnings = warnings if warnings is not None else []
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    pm.register(LifecycleGuard(), name=GUARD_NAME)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        pm.sources[module_name] = PluginSource("builtin", __version__, "optagent")
    pm.check_pending()  # only built-ins so far: a failure here is optagent's own bug
    if load_entry_points:
        allow = _allowlist()
        wanted = {_normal(n): n for n in allow or ()}
        matched: set[str] = set()
        found = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
        for ep in found:
            source = _source_of(ep)
            names = {_normal(ep.name), *([_normal(source.distribution)] if source.distribution else [])}
            if allow is not None and not names & set(wanted):
                if ep.name not in pm.excluded and not pm.has_plugin(ep.name):
                    pm.excluded[ep.name] = source
                continue
            matched |= names & set(wanted)
            if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
                _register_checked(pm, plugin, ep.name, source, warnings)
            except Exception as exc:  # a broken plugin must not take the tool down
                detail = str(exc).splitlines()[0] if str(exc) else ""
                log.debug("plugin %r (%s) failed to load:", ep.name, _entry_point_text(ep), exc_info=True)
                _warn(warnings, f"plugin {ep.name!r} ({_entry_point_text(ep)}) was skipped: "
                                f"{type(exc).__name__}: {detail} (optagent --debug shows the traceback)")
        builtin_names = {_normal(n) for n in (*DEFAULT_PLUGINS, "optagent")}
        unknown = sorted(wanted[n] for n in set(wanted) - matched - builtin_names)
        if unknown:
            installed = ", ".join(f"{ep.name} ({_source_of(ep).distribution})" if _source_of(ep).distribution
                                  else ep.name for ep in found) or "none"
            _warn(warnings, f"{ALLOWLIST_VAR} names {', '.join(map(repr, unknown))}, which no installed plugin "
                            f"has as its entry-point or distribution name (installed plugins: {installed})")
    for obj in extra or []:
        _register_checked(pm, obj, None, PluginSource("extra"), warnings)
    pm.check_pending()  # every plugin with an unknown hook was unregistered above; this is the backstop
    pm.load_warnings = warnings
    return pm


REGISTER_HOOKS = (("strategy", "optagent_register_strategies"), ("metric", "optagent_register_metrics"))


@dataclass
class _Staged:
    """One plugin's registrations, held back until all of its registration hooks returned and passed."""

    name: str
    plugin: Any
    builtin: bool
    strategies: list[Any] = field(default_factory=list)
    metrics: list[Any] = field(default_factory=list)
    failure: str | None = None


def _stage(pm: pluggy.PluginManager, name: str, plugin: Any, builtin: bool) -> _Staged:
    """Call the plugin's registration hooks into a list each; check what it registered."""
    from optagent.checks import identity_problems, metric_problems

    staged = _Staged(name, plugin, builtin)
    failures = []
    for kind, hook_name in REGISTER_HOOKS:
        impl = next((i for i in getattr(pm.hook, hook_name).get_hookimpls() if i.plugin is plugin), None)
        if impl is None:
            continue
        items = staged.strategies if kind == "strategy" else staged.metrics
        try:
            impl.function(**{arg: items.append for arg in impl.argnames})
        except Exception as exc:
            log.debug("plugin %r failed in %s:", name, hook_name, exc_info=True)
            failures.append(f"{hook_name} raised {type(exc).__name__}: {exc} (optagent --debug shows the traceback)")
    for s in staged.strategies:
        failures += identity_problems(s, strict=False)
    for m in staged.metrics:
        failures += metric_problems(m, strict=False)  # a reserved name skips the metric only (see build_registry)
    for kind, items in (("strategy", staged.strategies), ("metric", staged.metrics)):
        names = [str(getattr(i, "name", "")) for i in items]
        failures += [f"it registers {kind} {n!r} twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if failures:
        staged.failure = "; ".join(dict.fromkeys(failures))
    return staged


def _space_failure(strategies: list[Strategy], installed: dict[str, Strategy]) -> str | None:
    """The first check one of `strategies` fails on the load contexts (see optagent.checks), or None."""
    from optagent.checks import load_contexts, strategy_problems

    contexts = load_contexts()
    for strategy in strategies:
        for ctx in contexts:
            problems = strategy_problems(strategy, ctx, installed, contexts)
            if problems:
                return "; ".join(problems)
    return None


def build_registry(pm: pluggy.PluginManager | None = None, warnings: list[str] | None = None,
                   log_warnings: bool = True) -> Registry:
    """Ask every plugin for its strategies and metrics, check them, and keep what passed.

    A plugin's registrations are committed only when all of its registration hooks returned and what it
    registered passed the checks (`optagent.checks`: a Strategy/Metric instance, a valid direction, a
    search space whose `when`s name existing parameters, an off point inside it, no cycle). Otherwise the
    whole plugin is skipped (its lifecycle hooks too) with one warning naming it and the failed check. A
    name another plugin registered first (built-ins come first) or a reserved metric name
    (`optagent.metrics.RESERVED`) skips that one strategy or metric, with a warning naming both plugins.
    The warnings are logged, one line each, unless `log_warnings` is false (trial processes: the CLI or
    `optagent worker` that started them has said it once already); `Registry.warnings` always has them.
    A built-in that fails a check is optagent's own bug and raises.
    """
    from optagent.checks import cycle_problem, load_contexts

    warnings = warnings if warnings is not None else []
    pm = pm or get_plugin_manager(warnings=warnings)
    for message in getattr(pm, "load_warnings", []):
        _warn(warnings, message)
    sources: dict[str, PluginSource] = getattr(pm, "sources", {})
    skipped: dict[str, str] = {}

    def skip(staged: _Staged, reason: str) -> None:
        if staged.builtin:
            raise RuntimeError(f"built-in plugin {staged.name} fails its checks: {reason}")
        skipped[staged.name] = reason
        _warn(warnings, f"plugin {staged.name!r} was skipped: {reason}")
        if pm.has_plugin(staged.name):
            pm.unregister(name=staged.name)

    # 1. every plugin's registrations, staged (registration order: built-ins first)
    staged_all = [_stage(pm, name, plugin, sources.get(name, PluginSource("extra")).kind == "builtin")
                  for name, plugin in pm.list_name_plugin() if plugin is not None and name != GUARD_NAME]
    for staged in staged_all:
        if staged.failure:
            skip(staged, staged.failure)
    alive = [s for s in staged_all if s.failure is None]

    # 2. search spaces, against every strategy a plugin registered (the first of each name)
    everyone: dict[str, Strategy] = {}
    for staged in alive:
        for strategy in staged.strategies:
            everyone.setdefault(strategy.name, strategy)
    for staged in alive:
        failure = _space_failure(staged.strategies, everyone)
        if failure:
            staged.failure = failure
            skip(staged, failure)
    alive = [s for s in alive if s.failure is None]

    # 3. commit, plugin by plugin: a name taken first by another plugin, or reserved, skips that one item
    strategies: dict[str, Strategy] = {}
    metrics: dict[str, Metric] = {}
    plugins: dict[str, PluginInfo] = {}
    owners: dict[tuple[str, str], str] = {}
    contexts = load_contexts()
    for staged in alive:
        accepted = [s for s in staged.strategies if s.name not in strategies]
        cycle = next((c for c in (cycle_problem([*strategies.values(), *accepted], ctx) for ctx in contexts) if c),
                     None)
        if cycle:  # the built-ins alone have none (that would raise), so this plugin closes the cycle
            skip(staged, cycle)
            continue
        src = sources.get(staged.name, PluginSource("extra"))
        hooks = sorted(c.name for c in pm.get_hookcallers(staged.plugin) or [])
        info = PluginInfo(staged.name, src.version, src.kind == "builtin", distribution=src.distribution,
                          source=src.kind, hooks=hooks)
        plugins[staged.name] = info
        for kind, items, table in (("strategy", staged.strategies, strategies), ("metric", staged.metrics, metrics)):
            for item in items:
                if kind == "metric" and item.name in RESERVED:
                    _warn(warnings, f"plugin {staged.name!r}: metric {item.name!r} was skipped: the name is "
                                    "reserved for optagent's own measurements (optagent.metrics.RESERVED); "
                                    "rename it")
                    continue
                if item.name in table:
                    _warn(warnings, f"plugin {staged.name!r}: {kind} {item.name!r} was skipped: plugin "
                                    f"{owners[kind, item.name]!r} registered that name first; uninstall one "
                                    f"or leave one out with {ALLOWLIST_VAR}")
                    continue
                table[item.name] = item
                owners[kind, item.name] = staged.name
                (info.strategies if kind == "strategy" else info.metrics).append(item.name)
    if log_warnings:
        for message in warnings:
            log.warning(message)
    return Registry(pm, strategies, metrics, plugins, warnings, skipped, dict(getattr(pm, "excluded", {})))
