"""`optagent report`: one self-contained HTML file about a job, readable offline.

It holds an interactive Pareto scatter (hover: strategies and metrics; the baseline marked; infeasible
trials distinct), the hypervolume over trials, parameter importances from the Optuna study, a sortable
table of every trial (failed ones with their reason), the hardware fingerprint and the job configuration.
plotly.js is inlined (no CDN), so the file works without a network; plotly is imported lazily.

The hypervolume is optagent.search.front.hypervolume_history (its docstring says how it is scaled).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import warnings
from pathlib import Path
from typing import Any

from optagent.errors import UserError
from optagent.job import JobConfig
from optagent.search.front import Goal, hypervolume_history
from optagent.storage import Job, Trial


def _objectives(job: Job) -> list[tuple[str, float]]:
    return [(o.metric, 1.0 if o.direction == "maximize" else -1.0) for o in JobConfig.of(job).parsed_objectives]

_PLOT_CONFIG = {"displaylogo": False, "responsive": True}


# -- figures ---------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4g}"
    return "-" if value is None else str(value)


def _hover(t: Trial, shown: list[str]) -> str:
    recipe = html.escape(t.recipe or "baseline").replace(" + ", "<br>  + ")
    lines = [f"<b>trial {t.number}</b>{' (baseline)' if t.number == 0 else ''}", recipe]
    lines += [f"{html.escape(n)}: {_fmt(t.metrics.get(n))}" for n in shown if n in t.metrics]
    lines.append("feasible" if t.feasible else "infeasible (breaks the accuracy constraint)")
    if t.on_front:
        lines.append("on the Pareto front")
    return "<br>".join(lines)


def pareto_figure(job: Job, trials: list[Trial]) -> Any:
    import plotly.graph_objects as go

    objectives = _objectives(job)
    done = [t for t in trials if t.state == "complete"]
    y_name = objectives[0][0]
    x_name = objectives[1][0] if len(objectives) > 1 else None
    metric = JobConfig.of(job).constraint_name
    shown = list(dict.fromkeys([n for n, _ in objectives] + [metric, "speedup", "latency_ms", "model_size_mb"]))

    def xy(ts: list[Trial]) -> dict[str, Any]:
        return {"x": [t.metrics.get(x_name) if x_name else t.number for t in ts],
                "y": [t.metrics.get(y_name) for t in ts], "text": [_hover(t, shown) for t in ts],
                "hovertemplate": "%{text}<extra></extra>"}

    fig = go.Figure()
    groups = [
        ("feasible", [t for t in done if t.number > 0 and t.feasible and not t.on_front],
         {"color": "#1f77b4", "size": 9, "symbol": "circle"}),
        ("infeasible", [t for t in done if t.number > 0 and not t.feasible],
         {"color": "#d62728", "size": 10, "symbol": "x-thin", "line": {"width": 2, "color": "#d62728"}}),
        ("Pareto front", sorted([t for t in done if t.on_front],  # the baseline too, if nothing beats it
                                key=lambda t: t.metrics.get(x_name) if x_name else t.number),
         {"color": "#2ca02c", "size": 12, "symbol": "diamond", "line": {"width": 1, "color": "#115511"}}),
        ("baseline", [t for t in done if t.number == 0],
         {"color": "#ff7f0e", "size": 18, "symbol": "star", "line": {"width": 1, "color": "#000"}}),
    ]
    for name, ts, marker in groups:
        mode = "markers+lines" if name == "Pareto front" and len(ts) > 1 else "markers"
        fig.add_trace(go.Scatter(name=f"{name} ({len(ts)})", mode=mode, marker=marker,
                                 line={"shape": "hv", "dash": "dot", "color": "#2ca02c"}, **xy(ts)))
    base = next((t for t in done if t.number == 0), None)
    goal = Goal(JobConfig.of(job))
    if base is not None and y_name == metric and goal.constrained and metric in base.metrics:
        goal.baseline = {k: float(v) for k, v in base.metrics.items() if isinstance(v, int | float)}
        bound = goal.bound()
        fig.add_hline(y=bound, line={"dash": "dash", "color": "#d62728", "width": 1},
                      annotation_text=f"constraint: {metric} {'≥' if goal.sign > 0 else '≤'} {bound:.4g}",
                      annotation_position="bottom right")
    arrows = {1.0: "↑ better", -1.0: "↓ better"}
    fig.update_layout(
        title="Pareto front (hover a point for its strategies and metrics)", height=520,
        margin={"l": 60, "r": 20, "t": 50, "b": 50}, legend={"orientation": "h", "y": -0.15},
        xaxis_title=f"{x_name} ({'← better' if objectives[1][1] < 0 else 'better →'})" if x_name else "trial",
        yaxis_title=f"{y_name} ({arrows[objectives[0][1]]})", template="plotly_white")
    return fig


def hypervolume_figure(history: tuple[list[int], list[float], list[float]]) -> Any:
    import plotly.graph_objects as go

    numbers, volumes, _ = history
    fig = go.Figure(go.Scatter(x=numbers, y=volumes, mode="lines+markers", line={"shape": "hv"},
                               hovertemplate="after trial %{x}: %{y:.4g}<extra></extra>"))
    fig.update_layout(title="Hypervolume over trials", xaxis_title="trial", yaxis_title="hypervolume (unitless)",
                      height=360, margin={"l": 60, "r": 20, "t": 50, "b": 50}, template="plotly_white")
    return fig


def param_importances(job: Job, url: str | None) -> dict[str, dict[str, float]] | str:
    """Importance of each searched parameter per objective, or the reason it cannot be computed."""
    import optuna

    from optagent.search.study import optuna_storage
    from optagent.storage import normalize_url

    try:
        study = optuna.load_study(study_name=job.study_name, storage=optuna_storage(normalize_url(url)))
    except Exception as exc:
        return f"the Optuna study {job.study_name!r} could not be loaded ({type(exc).__name__})"
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 3:
        return f"too few finished trials ({len(complete)}) for parameter importances; run more trials"
    out: dict[str, dict[str, float]] = {}
    for i, (name, sign) in enumerate(_objectives(job)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # the default evaluator ranks parameters for LOW targets: negate maximised objectives
                def target(t: optuna.trial.FrozenTrial, i: int = i, sign: float = sign) -> float:
                    return -sign * t.values[i]

                out[name] = optuna.importance.get_param_importances(study, target=target)
        except Exception as exc:
            return f"parameter importances are unavailable: {type(exc).__name__}: {exc}"
    return out


def importance_figure(importances: dict[str, dict[str, float]]) -> Any:
    import plotly.graph_objects as go

    params = sorted({p for imp in importances.values() for p in imp},
                    key=lambda p: sum(imp.get(p, 0.0) for imp in importances.values()))
    fig = go.Figure([go.Bar(name=name, y=params, x=[imp.get(p, 0.0) for p in params], orientation="h",
                            hovertemplate="%{y}: %{x:.3f}<extra>" + html.escape(name) + "</extra>")
                     for name, imp in importances.items()])
    fig.update_layout(title="Parameter importances (per objective, normalised)", barmode="group",
                      height=max(320, 40 + 28 * len(params) * max(1, len(importances))),
                      margin={"l": 200, "r": 20, "t": 50, "b": 50}, template="plotly_white",
                      xaxis_title="importance")
    return fig


# -- HTML pieces -----------------------------------------------------------------------------------------
def _cell(value: Any, sort: Any = None) -> str:
    sort = value if sort is None else sort
    key = "" if sort is None else (f"{sort:.12g}" if isinstance(sort, float) else str(sort))
    return f'<td data-v="{html.escape(key)}">{html.escape(_fmt(value))}</td>'


def trial_table(job: Job, trials: list[Trial]) -> str:
    objectives = [n for n, _ in _objectives(job)]
    metric = JobConfig.of(job).constraint_name
    base = next((t for t in trials if t.number == 0 and t.state == "complete"), None)
    extra = [m for m in ("speedup", "model_size_mb", "param_count") if m not in objectives]
    heads = ["trial", "state", "feasible", "front", *objectives, f"Δ{metric}", *extra, "duration s", "worker",
             "strategies / failure reason"]
    rows = []
    for t in trials:
        change = None
        if base is not None and metric in t.metrics and metric in base.metrics:
            change = float(t.metrics[metric]) - float(base.metrics[metric])
        detail = t.failure_reason if t.state == "failed" else (t.recipe or "baseline")
        cells = [_cell(t.number), _cell(t.state), _cell({True: "yes", False: "no", None: "-"}[t.feasible]),
                 _cell("★" if t.on_front else "", 1 if t.on_front else 0),
                 *[_cell(t.metrics.get(n)) for n in objectives], _cell(change),
                 *[_cell(t.metrics.get(n)) for n in extra], _cell(t.duration_s),
                 _cell((t.worker or {}).get("host")), _cell(detail)]
        cls = {"failed": "failed", "complete": "" if t.feasible else "infeasible"}.get(t.state, t.state)
        if t.on_front:
            cls += " front"
        rows.append(f'<tr class="{cls.strip()}">{"".join(cells)}</tr>')
    head = "".join(f'<th title="click to sort">{html.escape(h)}</th>' for h in heads)
    return (f'<table id="trials" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _kv_table(data: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_kv_value(v))}</td></tr>"
                   for k, v in data.items())
    return f'<table class="kv">{rows}</table>'


def _kv_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return _fmt(value)


def _hardware(trials: list[Trial]) -> str:
    base = next((t for t in trials if t.number == 0 and t.hardware), None) or \
        next((t for t in trials if t.hardware), None)
    if base is None:
        return "<p>no trial recorded its hardware</p>"
    shown = {k: v for k, v in base.hardware.items() if k not in ("capabilities", "model_info")}
    caps = base.hardware.get("capabilities") or {}
    if caps:
        shown["quantized engines"] = caps.get("quantized_engines")
    keys = ("host", "cpu_model", "gpu", "threads", "torch")
    seen = {tuple(str(t.hardware.get(k)) for k in keys) for t in trials if t.hardware}
    warn = ""
    if len(seen) > 1:
        warn = ('<p class="warn">Trials ran on different fingerprints; their latencies are not comparable: '
                + html.escape("; ".join(" / ".join(s) for s in sorted(seen))) + "</p>")
    return warn + _kv_table(shown)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1320px;color:#222;
padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.15em;margin-top:32px;border-bottom:1px solid #ddd}
.sub{color:#666} .warn{color:#a33} .cols{display:grid;grid-template-columns:1fr 1fr;gap:24px}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
table.sortable th{cursor:pointer;background:#f4f4f4;position:sticky;top:0} table.sortable th:hover{background:#e6e6e6}
tr.failed td{color:#a33} tr.infeasible td{color:#999} tr.front td:first-child{font-weight:bold;color:#1a7f1a}
table.kv th{width:200px;font-weight:600;color:#444} .note{color:#555;font-size:13px;max-width:900px}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.dataset.dir !== 'asc';
      table.querySelectorAll('th').forEach(function (h) {
        delete h.dataset.dir; h.textContent = h.textContent.replace(/ [▲▼]$/, '');
      });
      th.dataset.dir = asc ? 'asc' : 'desc';
      th.textContent += asc ? ' ▲' : ' ▼';
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : (x === '' ? 1 : y === '' ? -1 : x.localeCompare(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
document.body.dataset.plots = String(document.querySelectorAll('.js-plotly-plot').length);
"""


def build_html(job: Job, trials: list[Trial], url: str | None) -> str:
    """The report as one HTML string (plotly.js inlined)."""
    try:
        import plotly.io as pio
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise UserError("the report needs plotly; pip install 'optagent[report]'") from None

    def div(fig: Any, ident: str) -> str:
        return str(pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=ident, config=_PLOT_CONFIG))

    esc = html.escape
    searched = [t for t in trials if t.number > 0]
    failed = [t for t in searched if t.state == "failed"]
    complete = [t for t in searched if t.state == "complete"]
    sections = [f'<h2>Pareto front</h2>{div(pareto_figure(job, trials), "pareto")}']

    history = hypervolume_history(job, trials)
    if history is None:
        hv = "<p>no completed baseline: the hypervolume needs it as the reference point</p>"
    else:
        ref = ", ".join(f"{n} {r:.4g}" for (n, _), r in zip(_objectives(job), history[2], strict=True))
        hv = (div(hypervolume_figure(history), "hypervolume") +
              f'<p class="note">Objectives are scaled by the baseline\'s values; reference point ({esc(ref)}) '
              "is the baseline, with the constrained metric at the lowest value the constraint allows. "
              "Feasible trials only; 0 means no trial beats the baseline yet.</p>")
    importances = param_importances(job, url)
    imp = div(importance_figure(importances), "importances") if isinstance(importances, dict) and importances \
        else f'<p class="note">{esc(str(importances) or "no searched parameters")}</p>'
    sections.append(f'<div class="cols"><div><h2>Hypervolume</h2>{hv}</div>'
                    f'<div><h2>Parameter importances</h2>{imp}</div></div>')
    sections.append(f"<h2>Trials ({len(trials)}; click a column to sort)</h2>{trial_table(job, trials)}")
    if failed:
        items = "".join(f"<li>trial {t.number}: {esc(t.failure_reason or 'unknown reason')}</li>" for t in failed)
        sections.append(f"<h2>Failed trials ({len(failed)})</h2><ul>{items}</ul>")
    notes = sorted({n for t in trials for n in (t.notes or [])})
    if notes:
        sections.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    config = {"name": job.name, "id": job.id, "status": job.status, "model": job.model_path,
              "model sha256": job.model_hash, "study": job.study_name, "created": job.created_at,
              "finished": job.finished_at, **job.config}
    sections.append(f'<div class="cols"><div><h2>Hardware fingerprint</h2>{_hardware(trials)}</div>'
                    f"<div><h2>Job configuration</h2>{_kv_table(config)}</div></div>")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = (f"{job.status} · {len(complete)} complete, {len(failed)} failed of {JobConfig.of(job).n_trials or '∞'}"
               f" · Pareto front {sum(t.on_front for t in trials)} · generated {stamp} by optagent")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>optagent report: {esc(job.name)}</title><style>{_CSS}</style>"
        "<script>window.__reportErrors=[];window.addEventListener('error',function(e){"
        "window.__reportErrors.push(String(e.message));document.documentElement.dataset.errors="
        "window.__reportErrors.join(' | ');});</script>"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
        f"<h1>optagent report: {esc(job.name)}</h1><div class=\"sub\">{esc(summary)}</div>"
        f"{''.join(sections)}<script>{_SORT_JS}</script></body></html>\n")


def write_report(job: Job, trials: list[Trial], url: str | None, output: Path) -> Path:
    """Write the report; a UserError naming the fix if the file cannot be written."""
    text = build_html(job, trials, url)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {output} ({exc.strerror or exc}); pick a writable path with -o") from None
    return output
