"""The checks a plugin's strategies and metrics must pass, in one place.

The registry runs them when it loads plugins (a plugin that fails one is skipped with a warning naming it
and the check), the coordinator can run them on the job's real `SpaceContext`, and the conformance suite
(`optagent.testing`) asserts them. Each function returns problems as sentences that name the strategy or
metric and say what to fix; an empty list means the check passed. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pluggy
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from optagent import hookspecs
from optagent.metrics import DIRECTIONS, RESERVED, Metric
from optagent.strategy import Objective, Param, Params, SpaceContext, Stage, Strategy, ordered_space, sample

__all__ = ["cycle_problem", "hook_problems", "identity_problems", "inside", "load_contexts", "metric_problems",
           "off_problems", "space_problems", "strategy_problems"]

_JSON_SCALARS = (str, int, float, bool, type(None))


def _call(what: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """fn(), or the problem of it raising (a plugin bug must be reported, not crash the caller)."""
    try:
        return fn(), None
    except Exception as exc:
        return None, f"{what} raised {type(exc).__name__}: {exc}"


def _same_scalar(a: Any, b: Any) -> bool:
    """Equal JSON scalars, without Python's True == 1 (a bool choice is not the number 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def inside(distribution: BaseDistribution, value: Any) -> bool:
    """Whether `value` is a point of `distribution` (a categorical's choice, a number in range on the step)."""
    if isinstance(distribution, CategoricalDistribution):
        return any(_same_scalar(c, value) for c in distribution.choices)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(distribution, IntDistribution) and not float(value).is_integer():
        return False
    try:
        return bool(distribution._contains(distribution.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def _roundtrips(value: Any) -> bool:
    try:
        return bool(json.loads(json.dumps(value, allow_nan=False)) == value)
    except (TypeError, ValueError):
        return False


def identity_problems(strategy: Any, strict: bool = True) -> list[str]:
    """A Strategy instance with an identifier name, an optagent.Stage and a one-sentence description (a
    string at least, when not `strict`: the registry does not skip a plugin for an empty description)."""
    if not isinstance(strategy, Strategy):
        return [f"{strategy!r} is not an optagent.Strategy instance; register an instance of your subclass"]
    name = getattr(strategy, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        return [f"strategy name {name!r} must be a Python identifier (it prefixes Optuna params as name.param)"]
    problems = []
    if not isinstance(getattr(strategy, "stage", None), Stage):
        problems.append(f"strategy {name!r}: stage must be an optagent.Stage, got {getattr(strategy, 'stage', None)!r}")
    description = getattr(strategy, "description", None)
    if not isinstance(description, str) or (strict and not description.strip()):
        problems.append(f"strategy {name!r}: set a one-sentence `description` (shown by `optagent plugins`)")
    return problems


def space_problems(strategy: Strategy, ctx: SpaceContext, installed: Mapping[str, Strategy],
                   also: Sequence[SpaceContext] = ()) -> list[str]:
    """The search space: Params with identifier names, each (name, variant) once, categorical/int/float
    distributions, JSON-scalar choices, and `when` conditions that name existing parameters (a sibling, or
    'strategy.param' of an installed strategy) with values inside their spaces. Another strategy that is not
    in `installed` is not checked (its params are None).

    What a space offers depends on the hardware (int8 modes only where a backend runs them), so a `when`
    may name a parameter or a value that exists on `ctx` or on any of the contexts in `also`."""
    who = f"strategy {strategy.name!r}"

    def declarations(owner: Strategy) -> list[Param]:
        found: list[Param] = []
        for other in (ctx, *also):
            space, _ = _call("search_space", functools.partial(owner.search_space, other))
            found += [q for q in space or [] if isinstance(q, Param)]
        return found

    space, error = _call(f"{who}: search_space(ctx)", lambda: strategy.search_space(ctx))
    if error:
        return [error]
    if not isinstance(space, list) or not space:
        return [f"{who}: search_space() must return a non-empty list of optagent.Param"]
    if not all(isinstance(p, Param) for p in space):
        bad = next(p for p in space if not isinstance(p, Param))
        return [f"{who}: {bad!r} is not an optagent.Param (build it with categorical, integer or real)"]
    problems: list[str] = []
    declared: dict[str, list[Param]] = {}
    for p in space:
        declared.setdefault(p.name, []).append(p)
    keys: set[str] = set()
    for p in space:
        where = f"{who}, parameter {p.key!r}"
        if not isinstance(p.name, str) or not p.name.isidentifier():
            problems.append(f"{who}: parameter name {p.name!r} must be a Python identifier")
            continue
        if p.key in keys:
            problems.append(f"{where} is declared twice (give each declaration of one name its own `variant`)")
        keys.add(p.key)
        d = p.distribution
        if not isinstance(d, CategoricalDistribution | IntDistribution | FloatDistribution):
            problems.append(f"{where}: use categorical, integer or real, not {type(d).__name__}")
            continue
        if isinstance(d, CategoricalDistribution):
            if not d.choices:
                problems.append(f"{where}: no choices")
            elif not all(isinstance(c, _JSON_SCALARS) for c in d.choices):
                problems.append(f"{where}: choices must be str, int, float, bool or None, got {d.choices!r}")
        for key, values in (p.when or {}).items():
            owner, dot, name = str(key).rpartition(".")
            if isinstance(values, str) or not isinstance(values, Iterable) or not list(values):
                problems.append(f"{where}: `when` must list the values of {key!r} it is active for, e.g. "
                                f"{{{key!r}: [...]}}")
                continue
            if not dot:
                if key not in declared or key == p.name:
                    problems.append(f"{where}: `when` refers to {key!r}, which is not another parameter of "
                                    f"{strategy.name} (write 'strategy.param' for another strategy's parameter)")
                    continue
                parents = [q for q in declarations(strategy) if q.name == key]
            elif owner == strategy.name:
                problems.append(f"{where}: `when` refers to {key!r}: name a parameter of the same strategy without "
                                "the prefix")
                continue
            elif owner in installed:
                _, error = _call(f"strategy {owner!r}: search_space(ctx)",
                                 functools.partial(installed[owner].search_space, ctx))
                if error:
                    problems.append(f"{where}: `when` refers to {key!r}, but {error}")
                    continue
                parents = [q for q in declarations(installed[owner]) if q.name == name]
                if not parents:
                    problems.append(f"{where}: `when` refers to {key!r}, but strategy {owner!r} declares no "
                                    f"parameter {name!r}")
                    continue
            else:
                continue  # a strategy that is not installed here: its params are None
            for v in values:
                if v is not None and not any(inside(q.distribution, v) for q in parents):
                    problems.append(f"{where}: `when` value {v!r} is outside the space of {key!r}")
    if not problems:
        described, error = _call(f"{who}: describe(ctx)", lambda: strategy.describe(ctx))
        if error:
            problems.append(error)
        elif not _roundtrips(described):
            problems.append(f"{who}: describe(ctx) does not survive JSON (choices and off params must be JSON)")
    return problems


def off_problems(strategy: Strategy, ctx: SpaceContext, others: Mapping[str, Params] | None = None) -> list[str]:
    """The off point: a JSON dict holding exactly the parameters active at it, each inside its space, and
    `is_off(off_params())` true. `others` are the other strategies' params cross-strategy `when`s read
    (installed strategies at their off params)."""
    who = f"strategy {strategy.name!r}"
    off, error = _call(f"{who}: off_params(ctx)", lambda: strategy.off_params(ctx))
    if error:
        return [error]
    if not isinstance(off, dict):
        return [f"{who}: off_params() must return a dict of params, got {type(off).__name__}"]
    if not _roundtrips(off):
        return [f"{who}: off params {off!r} do not survive JSON"]
    problems: list[str] = []

    def pick(key: str, d: BaseDistribution) -> Any:
        name = key.partition(".")[2].partition("@")[0]
        if name not in off:
            problems.append(f"{who}: off params {off!r} lack the parameter {name!r}, which is active at the off "
                            "point")
        elif not inside(d, off[name]):
            choices = f"not in {list(d.choices)!r}" if isinstance(d, CategoricalDistribution) else f"outside {d!r}"
            problems.append(f"{who}: off value {name}={off[name]!r} is {choices}")
        return off.get(name)

    chosen, error = _call(f"{who}: sampling the off point", lambda: sample([strategy], ctx, pick, others or {}))
    if error:
        return [*problems, error]
    if problems:
        return problems
    extra = sorted(set(off) - set(chosen[strategy.name]))
    if extra:
        problems.append(f"{who}: off params set {extra}, which are unknown or not active at the off point")
    is_off, error = _call(f"{who}: is_off(off_params())", lambda: strategy.is_off(dict(off), ctx))
    if error:
        problems.append(error)
    elif not is_off:
        problems.append(f"{who}: is_off(off_params()) is False; the off point must be off")
    return problems


def strategy_problems(strategy: Strategy, ctx: SpaceContext, installed: Mapping[str, Strategy],
                      also: Sequence[SpaceContext] = ()) -> list[str]:
    """Everything one strategy must pass on `ctx` for the registry: identity (a description may be empty),
    space, off point (no cycles: `cycle_problem`)."""
    problems = identity_problems(strategy, strict=False)
    if problems:
        return problems
    problems = space_problems(strategy, ctx, installed, also)
    if problems:
        return problems
    others: dict[str, Params] = {}
    for name, other in installed.items():
        if name != strategy.name:
            off, error = _call("off_params", functools.partial(other.off_params, ctx))
            if error is None and isinstance(off, dict):
                others[name] = off
    return off_problems(strategy, ctx, others)


def cycle_problem(strategies: Iterable[Strategy], ctx: SpaceContext) -> str | None:
    """Why the strategies' `when` conditions cannot be ordered (a cycle), or None."""
    from optagent.errors import UserError

    try:
        ordered_space(list(strategies), ctx)
    except UserError as exc:
        return str(exc)
    except Exception as exc:
        return f"ordering the parameters raised {type(exc).__name__}: {exc}"
    return None


def metric_problems(metric: Any, strict: bool = True) -> list[str]:
    """A Metric with an identifier name that is not reserved, a valid direction, text unit and description,
    and a callable compute. Not `strict` (the registry's check): a reserved name and an empty description
    pass here (the registry skips a reserved metric on its own)."""
    if not isinstance(metric, Metric):
        return [f"{metric!r} is not an optagent.Metric instance; register optagent.Metric(name, direction, unit, "
                "description, compute)"]
    name = metric.name
    if not isinstance(name, str) or not name.isidentifier():
        return [f"metric name {name!r} must be a Python identifier (it is used as --objective NAME:max)"]
    problems = []
    if strict and name in RESERVED:
        problems.append(f"metric {name!r}: the name is reserved for optagent's own measurements "
                        "(optagent.metrics.RESERVED); pick another")
    if metric.direction not in DIRECTIONS.values():
        problems.append(f"metric {name!r}: direction {metric.direction!r} is not 'maximize' or 'minimize'")
    if not isinstance(metric.unit, str):
        problems.append(f"metric {name!r}: unit must be a string (\"\" for a plain number)")
    if not isinstance(metric.description, str) or (strict and not metric.description.strip()):
        problems.append(f"metric {name!r}: set a one-sentence description (shown by `optagent plugins`)")
    if not callable(metric.compute):
        problems.append(f"metric {name!r}: compute must be callable as compute(model, trial, batch)")
    return problems


def load_contexts() -> list[SpaceContext]:
    """The contexts spaces are checked on when plugins load, with no model and no torch: a bare CPU, an x86
    CPU with every instruction set and inference runtime (and a per-sample objective), and a CUDA GPU. A
    space must be declarable on any of them (`optagent plugins` shows it before any model is seen); the
    coordinator checks it again on the job's real context."""
    from optagent.hardware import Capabilities

    objectives = (Objective.parse("accuracy:max"), Objective.parse("latency_ms:min"))
    everything = {"torch": "2", "torchao": "0", "cxx": "g++", "onnx": "1", "onnxruntime": "1", "onnxscript": "0",
                  "openvino": "2025", "nncf": "2", "openvino_devices": "CPU,GPU", "inductor": True}
    bare = Capabilities("cpu", "generic CPU", (), (), False, extra={"software": {"torch": "2"}})
    x86 = Capabilities("cpu", "x86 CPU", ("amx_bf16", "amx_int8", "avx2", "avx512_bf16", "avx512_vnni", "avx512f",
                                          "fma"), ("x86", "fbgemm", "onednn", "qnnpack"), False,
                       extra={"software": everything})
    gpu = Capabilities("cuda", "x86 CPU", ("avx2", "fma"), ("x86",), True, "GPU", (8, 0), True,
                       extra={"software": {"torch": "2", "cxx": "g++", "inductor": True}})
    return [SpaceContext(capabilities=bare, objectives=objectives, has_conv=False),
            SpaceContext(capabilities=x86, objectives=(*objectives, Objective.parse("throughput:max")),
                         default_batch_size=8),
            SpaceContext(capabilities=gpu, objectives=objectives)]


def _hook_names() -> list[str]:
    return [name for name, fn in vars(hookspecs).items()
            if name.startswith(f"{hookspecs.PROJECT}_") and inspect.isfunction(fn)]


def hook_problems(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
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
