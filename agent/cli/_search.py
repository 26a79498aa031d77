"""Commands that run or steer a search: search, resume, cancel, check."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlmodel import Session

from optagent.cli._common import DbOpt, JobArg, JsonOpt, err, out, print_json
from optagent.cli._progress import make_progress
from optagent.errors import UserError

BrokerOpt = Annotated[str | None, typer.Option("--broker", envvar="OPTAGENT_BROKER_URL", show_envvar=False,
                                               help="Celery broker (redis://...); none = local processes.")]
QueueOpt = Annotated[str, typer.Option("--queue", help="Celery queue (hardware pool) to send trials to.")]


def _executor(cfg: Any, broker: str | None, job_key: str) -> Any:
    if broker:
        from optagent.executors.celery import CeleryExecutor

        return CeleryExecutor(broker, queue=cfg.queue, job_key=job_key)
    from optagent.executors.local import LocalExecutor

    return LocalExecutor(workers=cfg.workers, time_limit_s=cfg.trial_timeout_s)


def _run(engine: Any, url: str, job_id: int, broker: str | None, quiet: bool, as_json: bool,
         registry: Any = None) -> None:
    from optagent.cli._read import print_pareto
    from optagent.coordinator import Coordinator, JobConfig, trial_dict
    from optagent.registry import build_registry
    from optagent.storage import Job, job_trials

    registry = registry or build_registry()  # its load warnings went to stderr through logging, once
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        cfg = JobConfig.from_json(job.config)
        key = job.key or f"job{job.id}"
    progress = make_progress(quiet=quiet or as_json, objectives=cfg.objectives, budget=cfg.n_trials,
                             timeout_s=cfg.timeout_s)
    with progress:
        coordinator = Coordinator(engine, url, job_id, registry, _executor(cfg, broker, key), on_event=progress)
        job = coordinator.run()
    with Session(engine) as s:
        trials = job_trials(s, job_id)
        job = s.get(Job, job_id)
    assert job is not None
    if as_json:
        from optagent.cli._read import pareto_rows

        print_json({"job": job.name, "id": job.id, "status": job.status,
                    "pareto": pareto_rows(job, trials), "trials": [trial_dict(t) for t in trials]})
    else:
        print_pareto(job, trials)
        out.print(f"job {job.id} ({job.name}) {job.status}; `optagent status {job.name}` lists every trial")
    if job.status not in ("completed",):
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
    constraint_metric: Annotated[str, typer.Option(help="Metric the drop constraint applies to.")] = "accuracy",
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
) -> None:
    """Search strategy compositions for MODEL and print the measured Pareto front."""
    from optagent.contract import ModelFile
    from optagent.coordinator import JobConfig, create_job
    from optagent.registry import build_registry
    from optagent.storage import init_db, normalize_url
    from optagent.strategy import Objective

    if trials is not None and trials < 1:
        raise UserError(f"--trials must be at least 1 (got {trials})")
    if trials is None and timeout is None:
        raise UserError("give a budget: --trials N and/or --timeout SECONDS")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout must be positive seconds (got {timeout})")
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1 (got {threads})")
    if not 0 <= max_accuracy_drop <= 1:
        raise UserError(f"--max-accuracy-drop is a fraction between 0 and 1 (got {max_accuracy_drop}); "
                        "0.01 means one percentage point")
    if confirm_processes < 1:
        raise UserError(f"--confirm-processes must be at least 1 (got {confirm_processes})")
    if sampler not in ("tpe", "nsga2", "random"):
        raise UserError(f"--sampler {sampler!r} is unknown; use tpe, nsga2 or random")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r} is unknown; use auto, cpu or cuda")
    objectives = [str(Objective.parse(o)) for o in (objective or ["accuracy:max", "latency_ms:min"])]
    if len({o.split(":")[0] for o in objectives}) != len(objectives):
        raise UserError("an objective is given twice; give each metric once")
    mf = ModelFile.from_path(model)  # fails early, with the fix, on a missing or broken file
    registry = build_registry()
    names = [s.strip() for s in strategies.split(",") if s.strip()] if strategies else list(registry.strategies)
    for n in names:
        registry.strategy(n)
    url = normalize_url(db)
    engine = init_db(url)
    cfg = JobConfig(model_path=str(Path(mf.path).resolve()), objectives=objectives, strategies=names,
                    n_trials=trials, timeout_s=timeout, max_accuracy_drop=max_accuracy_drop,
                    constraint_metric=constraint_metric, sampler=sampler, seed=seed, workers=workers,
                    threads=threads or max(1, (os.cpu_count() or 1) // workers), device=device,
                    trial_timeout_s=trial_timeout, executor="celery" if broker else "local", queue=queue,
                    confirm=confirm, confirm_processes=confirm_processes)
    job = create_job(engine, cfg, name, mf.sha256)
    if not (quiet or as_json):
        err.print(f"job {job.id} ({job.name}): {trials} trials, objectives {', '.join(objectives)}, "
                  f"strategies {', '.join(names)}, {'celery' if broker else f'{workers} local worker(s)'}, "
                  f"{cfg.threads} thread(s) per trial; database {engine.url.render_as_string(hide_password=True)}")
    assert job.id is not None
    _run(engine, url, job.id, broker, quiet, as_json, registry)


def resume(job_ident: JobArg, db: DbOpt = None, broker: BrokerOpt = None,
           quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False, as_json: JsonOpt = False) -> None:
    """Continue a job whose coordinator stopped: keep results that arrived, re-run what was lost, finish."""
    from optagent.storage import find_job, init_db, normalize_url

    url = normalize_url(db)
    engine = init_db(url)
    with Session(engine) as s:
        job = find_job(s, job_ident)
        if job.status == "completed":
            raise UserError(f"job {job.name} is already completed; start a new search instead")
        if job.config.get("executor") == "celery" and not broker:
            raise UserError(f"job {job.name} ran on Celery workers; pass --broker (or OPTAGENT_BROKER_URL)")
        job_id = job.id
    assert job_id is not None
    _run(engine, url, job_id, broker if job.config.get("executor") == "celery" else None, quiet, as_json)


def cancel(job_ident: JobArg, db: DbOpt = None, broker: BrokerOpt = None) -> None:
    """Stop a job: no more trials are dispatched and queued ones are revoked."""
    from optagent.storage import find_job, init_db, job_trials, utcnow

    engine = init_db(db)
    with Session(engine) as s:
        job = find_job(s, job_ident)
        if job.status in ("completed", "cancelled", "failed"):
            raise UserError(f"job {job.name} is already {job.status}")
        alive = job.status == "running" and job.heartbeat_at is not None and \
            (utcnow() - job.heartbeat_at).total_seconds() < 60
        if alive:
            job.status = "cancelling"  # the coordinator sees this at its next heartbeat and stops
        else:
            job.status, job.error, job.finished_at = "cancelled", "cancelled by `optagent cancel`", utcnow()
            rows = job_trials(s, job.id or 0)
            in_flight = [t.number for t in rows if t.state in ("running", "queued")]
            # the coordinator sends a trial before writing its row, so the one after the last row may be out
            in_flight.append(max((t.number for t in rows), default=0) + 1)
            for t in job_trials(s, job.id or 0):
                if t.state in ("running", "queued"):
                    t.state = "cancelled"
                    s.add(t)
            if job.config.get("executor") == "celery" and broker:
                from optagent.executors.celery import CeleryExecutor

                CeleryExecutor(broker, queue=job.config.get("queue", "optagent"),
                               job_key=job.key or f"job{job.id}").revoke(in_flight)
        s.add(job)
        s.commit()
        out.print(f"job {job.name}: {'cancelling (the coordinator stops shortly)' if alive else 'cancelled'}")


def check(model: Annotated[Path, typer.Argument(help="The model file to validate.")],
          as_json: JsonOpt = False) -> None:
    """Validate a model file against the contract, naming each missing or wrong piece and its fix."""
    from optagent.contract import check as run_check

    mf, problems = run_check(str(model))
    if as_json:
        print_json({"model": str(model), "ok": not problems,
                    "problems": [{"piece": p.piece, "message": p.message, "fix": p.fix} for p in problems]})
    elif problems:
        for p in problems:
            err.print(f"[red]✗[/red] {p}")
    else:
        assert mf is not None
        metrics = mf.evaluate(mf.load_model())
        out.print(f"✓ {model}: load_model, load_data, evaluate, example_input all work "
                  f"(default batch {mf.default_batch_size}; baseline eval {metrics})")
    if problems:
        raise typer.Exit(2)
