"""`optagent profile`: where a model's inference time goes, and which strategies address it."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from optagent.cli._common import DbOpt, ImportTimeoutOpt, JsonOpt, err, fmt, out, print_json, safe
from optagent.errors import TrialFailed, UserError


def _from_model_file(path: str, threads: int | None, device: str,
                     import_timeout: float) -> tuple[Any, Any, Any, int, int, dict[str, Any]]:
    import torch

    from optagent import hardware as hw
    from optagent import preflight
    from optagent.contract import ModelFile

    preflight.run(path, timeout_s=import_timeout, evaluate=False).raise_first()  # checked in a child first
    mf = ModelFile.from_path(path)
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    caps = hw.detect(device)
    model = mf.load_model().to(torch.device(caps.device))
    return mf, model, torch.device(caps.device), mf.default_batch_size, n, {"model": path}


def _from_trial(job_ident: str, number: int, db: str | None, threads: int | None,
                import_timeout: float) -> tuple[Any, ...]:
    from sqlmodel import Session

    from optagent.job import payload_for
    from optagent.storage import find_job, get_trial, init_db
    from optagent.trial.pipeline import build

    engine = init_db(db)
    with Session(engine) as s:
        job = find_job(s, job_ident)
        trial = get_trial(s, job.id or 0, number)
    if trial is None:
        raise UserError(f"job {job.name} has no trial {number}; `optagent status {job.name}` lists its trials")
    if trial.state != "complete":
        why = f" ({trial.failure_reason})" if trial.failure_reason else ""
        raise UserError(f"trial {number} of job {job.name} is {trial.state}{why}; profile a complete trial "
                        f"(`optagent status {job.name}`) or the model file itself")
    from pathlib import Path

    from optagent import preflight

    if Path(job.model_path).is_file():  # a missing or changed file is the rebuild's to explain
        preflight.run(job.model_path, timeout_s=import_timeout, evaluate=False).raise_first()
    payload = payload_for(job, trial)
    if threads:
        payload = payload.replace(threads=threads)
    err.print(f"rebuilding trial {number} of job {safe(job.name)} ({safe(trial.recipe or 'baseline')})...")
    try:
        built = build(payload)
    except TrialFailed as exc:
        raise UserError(f"cannot rebuild trial {number}: {exc}") from None
    return (built.model_file, built.model, built.ctx.device, built.ctx.infer_batch_size, built.ctx.threads,
            {"job": job.name, "trial": number, "recipe": trial.recipe})


def profile(
    target: Annotated[str, typer.Argument(help="A model file (model.py), or a job id/name with --trial.")],
    trial: Annotated[int | None, typer.Option("--trial", "-t", help="Profile this trial of the job "
                                                                    "(0 = the baseline).")] = None,
    db: DbOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Inference batch [default: the "
                                                   "model file's / the trial's].")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads [default: all cores / the trial's].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (model files only).")] = "auto",
    reps: Annotated[int, typer.Option(help="Profiled calls.")] = 10,
    top: Annotated[int, typer.Option(help="Rows per table.")] = 12,
    as_json: JsonOpt = False,
    import_timeout: ImportTimeoutOpt = 60.0,
) -> None:
    """Where the time goes, per module and per operator (torch.profiler), and which strategies apply."""
    from optagent import hardware as hw
    from optagent.profile import advise, profile_model
    from optagent.registry import build_registry
    from optagent.trial.pipeline import _batch

    if batch_size is not None and batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if trial is None:
        if not target.endswith(".py"):
            raise UserError(f"{target!r} is not a .py model file; for a job's trial pass --trial N "
                            f"(`optagent profile {target} --trial 0` profiles its baseline)")
        mf, model, dev, bs, n, what = _from_model_file(target, threads, device, import_timeout)
    else:
        mf, model, dev, bs, n, what = _from_trial(target, trial, db, threads, import_timeout)
    bs = batch_size or bs
    batch = _batch(mf, bs, dev)
    result = profile_model(model, batch, threads=n, device=dev, reps=max(reps, 1), top=top)
    caps = hw.detect("cuda" if dev.type == "cuda" else "cpu")
    registry = build_registry()
    result.advice = advise(result, set(registry.strategies), bf16=caps.cpu_bf16 and dev.type == "cpu")
    fingerprint = hw.fingerprint(n, caps)
    if as_json:
        print_json({**what, **result.to_json(), "hardware": fingerprint})
        return
    _print(result, what, fingerprint)


def _print(p: Any, what: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    from rich.table import Table

    subject = safe(what.get("model") or f"job {what['job']} trial {what['trial']} ({what.get('recipe') or 'baseline'})")
    out.print(f"{subject}: {fmt(p.latency_ms)} ms per call at batch {p.batch_size}, {p.threads} threads, "
              f"{fingerprint.get('cpu_model', '?')} ({p.device}); {p.op_fraction:.0%} of profiled time in "
              f"operators, {p.overhead_fraction:.0%} Python/dispatch")
    for title, rows, first in (("by module type", p.module_types, "type"), ("by module (self time)", p.modules,
                                                                          "module"), ("by operator (self CPU)",
                                                                                      p.operators, "operator")):
        if not rows:
            continue
        table = Table(title=f"Where the time goes, {title}", title_justify="left")
        table.add_column(first)
        if first == "module":
            table.add_column("type")
        for col in ("time %", "ms/call", "calls"):
            table.add_column(col, justify="right")
        if first == "operator":
            table.add_column("top input shapes")
        for r in rows:
            cells = [safe(r.name)] + ([safe(r.kind)] if first == "module" else [])
            cells += [f"{r.fraction:.1%}", fmt(r.ms_per_call, 3), fmt(r.calls, 3)]
            cells += [safe(r.shapes[:60])] if first == "operator" else []
            table.add_row(*cells)
        out.print(table)
    for line in p.advice:
        out.print(f"advice: {safe(line)}")
