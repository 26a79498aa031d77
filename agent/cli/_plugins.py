"""`optagent plugins`: what is installed, where it came from, and the search space each strategy adds."""

from __future__ import annotations

from typing import Any

from optagent.cli._common import JsonOpt, out, print_json, safe

DEFAULT_OBJECTIVES = ("accuracy:max", "latency_ms:min")


def _space_context() -> Any:
    from optagent import hardware
    from optagent.strategy import Objective, SpaceContext

    caps = hardware.detect("auto")
    return SpaceContext(capabilities=caps, objectives=tuple(Objective.parse(o) for o in DEFAULT_OBJECTIVES))


def describe_plugins(registry: Any, ctx: Any) -> dict[str, Any]:
    """The JSON document `optagent plugins --json` prints (also used by tests and reports)."""
    plugins = []
    for info in registry.plugins.values():
        strategies = []
        for name in info.strategies:
            strategy = registry.strategies[name]
            try:
                described = strategy.describe(ctx)
            except Exception as exc:  # a plugin bug must not hide the other plugins
                described = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
            strategies.append(described)
        plugins.append({
            "name": info.name, "version": info.version, "distribution": info.distribution,
            "source": info.source, "builtin": info.builtin, "hooks": info.hooks,
            "strategies": strategies, "metrics": [registry.metrics[m].describe() for m in info.metrics],
        })
    excluded = getattr(registry, "excluded", {})
    from optagent.plugins._precision import missing_engines
    from optagent.search.space import SearchSpace
    from optagent.search.warmstart import describe as describe_design

    space = SearchSpace(registry, list(registry.strategies), tuple(ctx.objectives))
    space.ctx, space.fixed = ctx, {}
    try:
        design = describe_design(space)
    except Exception as exc:  # a plugin's broken space must not hide the listing
        design = [f"unavailable: {type(exc).__name__}: {exc}"]
    return {
        "plugins": plugins,
        # installed, but left out by OPTAGENT_PLUGINS / skipped by a failed check (the warning says which)
        "excluded": [{"name": n, "distribution": src.distribution, "version": src.version}
                     for n, src in sorted(excluded.items())],
        "skipped": [{"name": n, "reason": reason} for n, reason in getattr(registry, "skipped", {}).items()],
        "warnings": list(registry.warnings),
        # runtimes this machine cannot offer, with the reason and the fix; the warm start's first trials
        "engines_not_offered": missing_engines(ctx.capabilities),
        "warm_start": design,
        "space_context": {"device": ctx.capabilities.device, "objectives": list(DEFAULT_OBJECTIVES)},
    }


def _param_text(p: dict[str, Any]) -> str:
    if p.get("type") == "categorical":
        text = f"{p['name']} in {{{', '.join(str(c) for c in p['choices'])}}}"
    elif p.get("type") in ("int", "float"):
        step = f" step {p['step']}" if p.get("step") not in (None, 1) else ""
        text = f"{p['name']} {p['type']} [{p['low']}, {p['high']}]{step}{' log' if p.get('log') else ''}"
    else:
        text = f"{p['name']} ({p.get('type')})"
    if p.get("when"):
        cond = " and ".join(f"{k} in {{{', '.join(str(v) for v in vs)}}}" for k, vs in p["when"].items())
        text += f"  when {cond}"
    return text


def _print_human(doc: dict[str, Any]) -> None:
    from rich.table import Table

    for plugin in doc["plugins"]:
        origin = "built in" if plugin["builtin"] else plugin["source"].replace("_", " ")
        dist = f", {plugin['distribution']}" if plugin["distribution"] and not plugin["builtin"] else ""
        out.print(f"[bold]{safe(plugin['name'])}[/bold] {safe(plugin['version'] or '(no version)')} "
                  f"({safe(origin)}{safe(dist)})")
        if plugin["strategies"]:
            table = Table(show_header=True, header_style="bold", show_lines=True)
            table.add_column("strategy", max_width=48)
            table.add_column("stage")
            table.add_column("search space")
            table.add_column("off")
            for s in plugin["strategies"]:
                if "error" in s:
                    table.add_row(safe(s["name"]), "-", f"[red]error: {safe(s['error'])}[/red]", "-")
                    continue
                space = "\n".join(_param_text(p) for p in s["space"])
                off = ", ".join(f"{k}={v}" for k, v in s["off"].items())
                table.add_row(f"{safe(s['name'])}\n[dim]{safe(s['description'])}[/dim]", safe(s["stage"]), safe(space),
                              safe(off))
            out.print(table)
        for m in plugin["metrics"]:
            out.print(f"  metric {safe(m['name'])} ({safe(m['unit'])}, {safe(m['direction'])}): "
                      f"{safe(m['description'])}")
        other = [h for h in plugin["hooks"] if h not in ("optagent_register_strategies", "optagent_register_metrics")]
        if other:
            out.print(f"  hooks: {safe(', '.join(other))}")
    for plugin in doc.get("skipped", []):
        out.print(f"[red]{safe(plugin['name'])} skipped[/red]: {safe(plugin['reason'])}")
    for plugin in doc.get("excluded", []):
        dist = f" ({plugin['distribution']} {plugin['version']})" if plugin["distribution"] else ""
        out.print(f"[yellow]{safe(plugin['name'])}{safe(dist)}[/yellow] installed, not loaded: OPTAGENT_PLUGINS "
                  "leaves it out")
    for engine, why in doc.get("engines_not_offered", {}).items():
        out.print(f"runtime engine [yellow]{safe(engine)}[/yellow] not offered here: {safe(why)}")
    if doc.get("warm_start"):
        out.print("warm start (before the sampler; --no-warm-start turns it off): "
                  + safe("; ".join(doc["warm_start"])))
    ctx = doc["space_context"]
    out.print(f"[dim]search spaces as offered on this machine ({ctx['device']}) for objectives "
              f"{', '.join(ctx['objectives'])}; OPTAGENT_PLUGINS limits which installed plugins load[/dim]")


def plugins(as_json: JsonOpt = False) -> None:
    """List installed plugins with their versions, strategies (search spaces) and metrics."""
    from optagent.registry import build_registry

    registry = build_registry()
    doc = describe_plugins(registry, _space_context())
    # Load warnings already went to stderr through logging (one line each, as in workers); --json has them too.
    if as_json:
        print_json(doc)
    else:
        _print_human(doc)
