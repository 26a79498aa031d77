"""Commands that run or steer a search: search, resume, cancel, check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from optagent.cli._common import DbOpt, ImportTimeoutOpt, JobArg, JsonOpt, out, print_json, safe, say_error
from optagent.cli._progress import make_progress

BrokerOpt = Annotated[str | None, typer.Option("--broker", envvar="OPTAGENT_BROKER_URL", show_envvar=False,
                                               help="Celery broker (redis://...); none = local processes.")]
QueueOpt = Annotated[str, typer.Option("--queue", help="Celery queue (hardware pool) to send trials to.")]
InsecureOpt = Annotated[bool, typer.Option(
    "--insecure", help="Send unsigned payloads to a broker other hosts can reach (no OPTAGENT_SECRET): only on a "
    "network you trust.")]


def _finish(report: Any, as_json: bool) -> None:
    """Print the outcome of a search or resume (the Pareto table, or JSON); exit 1 unless it completed."""
    from optagent.cli._read import pareto_rows, print_pareto
    from optagent.search import trial_dict

    job, trials = report.job, report.trials
    if as_json:
        print_json({"job": job.name, "id": job.id, "status": str(job.status),
                    "pareto": pareto_rows(job, trials), "trials": [trial_dict(t) for t in trials]})
    else:
        print_pareto(job, trials)
        out.print(f"job {job.id} ({safe(job.name)}) {job.status}; `optagent status {safe(job.name)}` lists every "
                  "trial")
    if job.status != "completed":
        say_error(f"error: job {job.name} {job.status}: {job.error or 'no reason recorded'}")
        raise typer.Exit(1)


def search(
    model: Annotated[Path, typer.Argument(help="The model file (see docs/model-contract.md).")],
    trials: Annotated[int | None, typer.Option("--trials", "-n", help="Trials to run besides the baseline.")] = 20,
    timeout: Annotated[float | None, typer.Option(help="Stop dispatching after this many seconds.")] = None,
    workers: Annotated[int, typer.Option(help="Local trial processes at once (no broker).")] = 1,
    threads: Annotated[int | None, typer.Option(help="Threads per trial [default: cores / workers].")] = None,
    db: DbOpt = None,
    objective: Annotated[list[str] | None, typer.Option(
        "--objective", "-o", help="NAME:max or NAME:min; repeat. [default: accuracy:max latency_ms:min]")] = None,
    max_accuracy_drop: Annotated[float, typer.Option(
        help="Largest allowed drop of --constraint-metric below the baseline (0.01 = 1 point).")] = 0.01,
    constraint_metric: Annotated[str, typer.Option(
        help="Metric the drop constraint applies to; NAME:min for one that must not rise (perplexity:min).")
    ] = "accuracy",
    strategies: Annotated[str | None, typer.Option(help="Comma list [default: every installed strategy].")] = None,
    sampler: Annotated[str, typer.Option(help="tpe, nsga2 or random.")] = "tpe",
    seed: Annotated[int, typer.Option(help="Sampler and training seed.")] = 0,
    name: Annotated[str | None, typer.Option(help="Job name [default: model-timestamp].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    trial_timeout: Annotated[float, typer.Option(help="Seconds before a single trial is killed.")] = 1800.0,
    broker: BrokerOpt = None,
    queue: QueueOpt = "optagent",
    confirm: Annotated[bool, typer.Option(help="Re-measure the Pareto trials against the baseline at the end.")
                       ] = True,
    confirm_processes: Annotated[int, typer.Option(
        help="Fresh processes the confirmation re-measures in; their spread is the noise band.")] = 3,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    as_json: JsonOpt = False,
    import_timeout: ImportTimeoutOpt = 60.0,
    broker_retry_s: Annotated[float, typer.Option(
        "--broker-retry-s", help="How long a lost broker is waited for before the job stops as interrupted "
        "(`optagent resume` continues it).")] = 120.0,
    insecure: InsecureOpt = False,
    max_relative_drop: Annotated[float | None, typer.Option(
        help="The allowed drop of --constraint-metric as a fraction of the baseline's value (0.02 = 2%); "
             "replaces --max-accuracy-drop.")] = None,
    pruner: Annotated[str, typer.Option(
        help="Early stopping of recovery fine-tuning: constraint (stop what cannot meet the constraint), "
             "median (worse than earlier trials) or none.")] = "constraint",
    warm_start: Annotated[bool, typer.Option(
        help="Try each runtime engine alone, then each precision on the fastest (and on engines within 20% of it), "
             "then the best of those with structured pruning and recovery fine-tuning, before the sampler.")] = True,
    reuse: Annotated[bool, typer.Option(
        help="Answer a parameter set other jobs measured on the same model file and hardware from their "
             "result.")] = False,
    measure_seconds: Annotated[float | None, typer.Option(
        "--measure-seconds", envvar="OPTAGENT_MEASURE_SECONDS", show_envvar=False,
        help="Most seconds each model is timed per measurement (default 4; the timing stops sooner once its "
             "spread is small): lower for a quick smoke search, higher on a noisy machine.")] = None,
) -> None:
    """Search strategy compositions for MODEL and print the measured Pareto front."""
    from optagent import api

    names = strategies.split(",") if strategies is not None else None
    progress = make_progress(quiet=quiet or as_json, objectives=objective, budget=trials, timeout_s=timeout,
                             constraint=constraint_metric.partition(":")[0])
    with progress:
        report = api.search(model, db=db, broker=broker, name=name, on_event=progress, strategies=names,
                            n_trials=trials, timeout_s=timeout, workers=workers, threads=threads,
                            objectives=list(objective) if objective else None, max_accuracy_drop=max_accuracy_drop,
                            constraint_metric=constraint_metric, sampler=sampler, seed=seed, device=device,
                            trial_timeout_s=trial_timeout, queue=queue, confirm=confirm,
                            confirm_processes=confirm_processes, broker_retry_s=broker_retry_s,
                            import_timeout_s=import_timeout, insecure=insecure, max_relative_drop=max_relative_drop,
                            pruner=pruner, warm_start=warm_start, reuse=reuse,
                            measure=measure_budget(measure_seconds))
    _finish(report, as_json)


def measure_budget(seconds: float | None) -> dict[str, float] | None:
    """`--measure-seconds` as measurement settings (optagent.trial.measure.MeasureSettings); None = defaults."""
    if seconds is None:
        return None
    return {"max_time_s": seconds, "min_time_s": min(0.5, seconds)}


def resume(job_ident: JobArg, db: DbOpt = None, broker: BrokerOpt = None,
           quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False, as_json: JsonOpt = False,
           insecure: InsecureOpt = False) -> None:
    """Continue a job whose coordinator stopped: keep results that arrived, re-run what was lost, finish."""
    from optagent import api

    current = api.report(job_ident, db)
    cfg = current.config
    progress = make_progress(quiet=quiet or as_json, objectives=cfg.objectives, budget=cfg.n_trials,
                             timeout_s=cfg.timeout_s, constraint=cfg.constraint_name)
    with progress:
        report = api.resume(job_ident, db=db, broker=broker, on_event=progress, insecure=insecure)
    _finish(report, as_json)


def cancel(job_ident: JobArg, db: DbOpt = None, broker: BrokerOpt = None) -> None:
    """Stop a job: no more trials are dispatched and queued ones are revoked."""
    from optagent import api
    from optagent.job import JobStatus

    status = api.cancel(job_ident, db=db, broker=broker)
    how = "cancelling (the coordinator stops shortly)" if status == JobStatus.CANCELLING else "cancelled"
    out.print(f"job {safe(job_ident)}: {how}")


def check(model: Annotated[Path, typer.Argument(help="The model file to validate.")],
          as_json: JsonOpt = False, import_timeout: ImportTimeoutOpt = 60.0) -> None:
    """Validate a model file against the contract, naming each missing or wrong piece and its fix.

    The file is imported and run in a child process with a time limit per piece, so a file that hangs, exits
    or leaves threads behind is reported, not waited for."""
    from optagent import preflight

    found = preflight.run(model, timeout_s=import_timeout)
    if as_json:
        print_json({"model": str(model), "ok": found.ok, "metrics": found.metrics, "default_batch": found.default_batch,
                    "input": found.input, "cuda": found.cuda, "seconds": round(found.duration_s, 2),
                    "problems": [{"piece": p.piece, "message": p.message, "fix": p.fix} for p in found.problems]})
    elif found.problems:
        for p in found.problems:
            say_error(f"✗ {p}")
    else:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in (found.metrics or {}).items())
        out.print(f"✓ {safe(model)}: load_model, load_data, evaluate, example_input all work (default batch "
                  f"{found.default_batch}; {safe(found.input)}; baseline eval: {safe(metrics)})", soft_wrap=True)
    if found.problems:
        raise typer.Exit(2)
