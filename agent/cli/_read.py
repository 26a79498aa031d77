"""Read commands: jobs, status, pareto. Each has --json and never writes to the database."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.table import Table
from sqlmodel import Session, select

from optagent.cli._common import DbOpt, JobArg, JsonOpt, fmt, out, print_json, safe
from optagent.job import JobConfig
from optagent.search.records import job_dict, trial_dict
from optagent.storage import Job, Trial, find_job, init_db, job_trials, utcnow


def _age(when: dt.datetime | None) -> str:
    if when is None:
        return "-"
    seconds = (utcnow() - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def baseline_of(trials: list[Trial]) -> Trial | None:
    return next((t for t in trials if t.number == 0 and t.state == "complete"), None)


def pareto_rows(job: Job, trials: list[Trial]) -> list[dict[str, Any]]:
    """The Pareto trials with their changes against the baseline, best speedup first."""
    base = baseline_of(trials)
    metric = JobConfig.of(job).constraint_name
    rows = []
    for t in trials:
        if not t.on_front:
            continue
        d = trial_dict(t)
        if base is not None and metric in t.metrics and metric in base.metrics:
            d[f"{metric}_change"] = t.metrics[metric] - base.metrics[metric]
        d["speedup"] = t.metrics.get("speedup")
        rows.append(d)
    rows.sort(key=lambda r: (r["metrics"].get("tie_group", 0), -(r["metrics"].get("confirmed_speedup")
                                                                 or r["speedup"] or 0.0)))
    return rows


def _summary(job: Job, trials: list[Trial]) -> dict[str, Any]:
    searched = [t for t in trials if t.number > 0]
    feasible = [t for t in searched if t.state == "complete" and t.feasible]
    best = max((t.metrics.get("speedup", 0.0) for t in feasible), default=None)
    return {
        "complete": sum(t.state == "complete" for t in searched),
        "failed": sum(t.state == "failed" for t in searched),
        "running": sum(t.state == "running" for t in searched),
        "queued": sum(t.state == "queued" for t in searched),
        "cancelled": sum(t.state == "cancelled" for t in searched),
        "budget": JobConfig.of(job).n_trials,
        "best_feasible_speedup": best,
        "pareto_size": sum(t.on_front for t in trials),
    }


def print_pareto(job: Job, trials: list[Trial]) -> None:
    rows = pareto_rows(job, trials)
    base = baseline_of(trials)
    cfg = JobConfig.of(job)
    metric, objectives = cfg.constraint_name, cfg.objective_names
    shown = list(dict.fromkeys([metric, *objectives, "latency_ms", "model_size_mb"]))
    table = Table(title=f"Pareto front of job {safe(job.name)} ({len(rows)} trials; speedup = interleaved with the "
                        "baseline in the same process)", title_justify="left")
    table.add_column("trial", justify="right")
    for name in shown:
        table.add_column(safe(name), justify="right")
    table.add_column(f"Δ{safe(metric)}", justify="right")
    table.add_column("speedup", justify="right")
    table.add_column("confirmed (95% noise band)", justify="right")
    table.add_column("rank", justify="right")
    table.add_column("strategies")
    for r in rows:
        change = r.get(f"{metric}_change")
        m = r["metrics"]
        confirmed = "-"
        if "confirmed_speedup" in m:
            confirmed = (f"{m['confirmed_speedup']:.2f}× "
                         f"({m['confirmed_speedup_low']:.2f}–{m['confirmed_speedup_high']:.2f})")
        table.add_row(str(r["number"]), *[fmt(m.get(n)) for n in shown],
                      "-" if change is None else f"{change:+.4f}", f"{r['speedup']:.2f}×" if r["speedup"] else "-",
                      confirmed, str(m["tie_group"]) if "tie_group" in m else "-", safe(r["recipe"] or "-"))
    out.print(table)
    checked = [r for r in rows if "confirmed_speedup" in r["metrics"]]
    if checked:
        runs = max(r["metrics"].get("confirmed_processes", 1) for r in checked)
        where = "in one process" if runs == 1 else f"in each of {runs} fresh processes"
        inside = sum(r["speedup"] is not None and r["metrics"]["confirmed_speedup_low"] <= r["speedup"]
                     <= r["metrics"]["confirmed_speedup_high"] for r in checked)
        out.print(f"confirmed = re-measured after the search, all Pareto trials interleaved with the baseline {where}; "
                  "noise band = where 95% of search-time measurements fall; equal rank = a tie within the noise; "
                  f"{inside} of {len(checked)} search-time speedups are inside their band")
    if base is not None:
        out.print(f"baseline (trial 0): {safe(metric)} {fmt(base.metrics.get(metric))}, latency "
                  f"{fmt(base.metrics.get('latency_ms'))} ms at batch {fmt(base.metrics.get('batch_size'))}, "
                  f"{fmt(base.hardware.get('threads'))} threads, {safe(base.hardware.get('cpu_model', '?'))}")
    notes = sorted({n for r in rows for n in r.get("notes", [])})
    for note in notes:
        out.print(f"note: {safe(note)}")


def jobs(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List jobs: status, trials, best speedup within the constraint, age."""
    engine = init_db(db)
    with Session(engine) as s:
        all_jobs = list(s.exec(select(Job).order_by(Job.id)))
        data = []
        for job in all_jobs:
            summary = _summary(job, job_trials(s, job.id or 0))
            data.append({**job_dict(job), **summary, "age": _age(job.created_at)})
    if as_json:
        print_json(data)
        return
    if not data:
        out.print("no jobs yet; start one with `optagent search model.py`")
        return
    table = Table()
    for col in ("id", "name", "status", "trials", "failed", "best speedup (feasible)", "front", "age"):
        table.add_column(col)
    for d in data:
        best = d["best_feasible_speedup"]
        trials = f"{d['complete']}/{d['budget'] or '∞'}" + (f" +{d['running']} running" if d["running"] else "")
        table.add_row(str(d["id"]), safe(d["name"]), safe(d["status"]), trials,
                      str(d["failed"]), f"{best:.2f}×" if best else "-", str(d["pareto_size"]), d["age"])
    out.print(table)


def status(job_ident: JobArg, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """A job's progress: trial counts, the baseline, and every trial with the worker that ran it."""
    engine = init_db(db)
    with Session(engine) as s:
        job = find_job(s, job_ident)
        trials = job_trials(s, job.id or 0)
    summary = _summary(job, trials)
    stale = None
    if job.status == "running" and job.heartbeat_at is not None:
        silent = (utcnow() - job.heartbeat_at).total_seconds()
        if silent > 60:
            stale = (f"the coordinator has not been seen for {silent:.0f} s; `optagent resume {safe(job.name)}` "
                     "continues")
    if as_json:
        print_json({**job_dict(job), **summary, "coordinator_stale": stale,
                    "trials": [trial_dict(t) for t in trials]})
        return
    out.print(f"job {job.id} {safe(job.name)}: {safe(job.status)}  ({summary['complete']} complete, "
              f"{summary['failed']} failed, {summary['running']} running, {summary['queued']} queued of "
              f"{summary['budget'] or '∞'})")
    if job.error:
        out.print(f"error: {safe(job.error)}")
    if stale:
        out.print(f"warning: {stale}")
    table = Table()
    for col in ("trial", "state", "feasible", "front", "accuracy", "latency_ms", "speedup", "worker", "s",
                "strategies / reason"):
        table.add_column(col)
    for t in trials:
        w = t.worker or {}
        where = safe(f"{w.get('host', '-')}" + (f" gpu{w['gpu']}" if w.get("gpu") else ""))
        detail = t.failure_reason if t.state == "failed" else t.recipe
        table.add_row(str(t.number), safe(t.state), {True: "yes", False: "no", None: "-"}[t.feasible],
                      "*" if t.on_front else "", fmt(t.metrics.get("accuracy")), fmt(t.metrics.get("latency_ms")),
                      fmt(t.metrics.get("speedup"), 3), where, fmt(t.duration_s, 3), safe(detail or "-"))
    out.print(table)


def pareto(job_ident: JobArg, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """The Pareto trials: metrics, speedup and accuracy change against the baseline, strategies."""
    engine = init_db(db)
    with Session(engine) as s:
        job = find_job(s, job_ident)
        trials = job_trials(s, job.id or 0)
    if as_json:
        base = baseline_of(trials)
        print_json({"job": job_dict(job), "baseline": trial_dict(base) if base else None,
                    "pareto": pareto_rows(job, trials)})
        return
    print_pareto(job, trials)
