"""Commands that get results out of the database: report (HTML), export (a trial's model), apply (a recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session

from optagent.cli._common import DbOpt, ImportTimeoutOpt, JobArg, JsonOpt, fmt, out, print_json, safe, say_error

OutDirOpt = Annotated[Path, typer.Option("--output", "-o", help="Directory to write the model, recipe.json "
                                                                  "and metrics.json into.")]


def report(job_ident: JobArg,
           output: Annotated[Path | None, typer.Option(
               "--output", "-o", help="HTML file to write [default: report-JOB.html].")] = None,
           db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Write one self-contained HTML report (works offline): Pareto plot, hypervolume, importances, trials."""
    from optagent.report import write_report
    from optagent.storage import find_job, init_db, job_trials, normalize_url

    url = normalize_url(db)
    engine = init_db(url)
    with Session(engine) as s:
        job = find_job(s, job_ident)
        trials = job_trials(s, job.id or 0)
    path = write_report(job, trials, url, output or Path(report_name(job.name)))
    if as_json:
        print_json({"job": job.name, "report": str(path), "bytes": path.stat().st_size})
    else:
        out.print(f"wrote {safe(path)} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser (works offline)")


def report_name(job_name: str) -> str:
    """The default report file, in the current directory whatever the job is called (names stored before
    names were validated may hold '/', '..' or control characters)."""
    import re

    stem = re.sub(r"[-.]{2,}", "-", re.sub(r"[^A-Za-z0-9_.\-]+", "-", job_name)).strip("-.")[:100] or "job"
    return f"report-{stem}.html"


def _print_exported(result: object, as_json: bool, what: str) -> None:
    from optagent.export import Exported

    assert isinstance(result, Exported)
    if as_json:
        print_json(result.to_json())
        return
    out.print(f"{safe(what)} into {safe(result.directory)} ({result.model_format}):")
    for f in result.files:
        out.print(f"  {safe(f)}")
    for name, value in result.metrics.items():
        recorded = result.recorded.get(name)
        if recorded is None:
            out.print(f"  {name} {fmt(value)} (not recorded)")
            continue
        diff = value - recorded
        same = "identical to the recorded value" if diff == 0 else f"recorded {fmt(recorded)}, {diff:+.2g}"
        out.print(f"  {safe(name)} {fmt(value)} ({same})")
    for note in result.notes:
        say_error(f"note: {note}")


def export(job_ident: JobArg,
           trial: Annotated[int, typer.Option("--trial", "-t", help="Trial number (see `optagent pareto JOB`).")],
           output: OutDirOpt = Path("export"), db: DbOpt = None, as_json: JsonOpt = False,
           force: Annotated[bool, typer.Option("--force", help="Write into a non-empty directory, replacing an "
                                                               "earlier export there (only its files).")] = False,
           import_timeout: ImportTimeoutOpt = 60.0) -> None:
    """Rebuild a trial's model and write it (TorchScript if possible) with recipe.json and metrics.json."""
    from optagent import preflight
    from optagent.export import export_trial, exportable_trial, refuse_nonempty
    from optagent.storage import find_job, get_trial, init_db

    engine = init_db(db)
    with Session(engine) as s:
        job = find_job(s, job_ident)
        row = exportable_trial(job, get_trial(s, job.id or 0, trial), trial)
    refuse_nonempty(output, force)  # said before the model file runs
    if Path(job.model_path).is_file():  # a missing or changed file is export_trial's to explain
        preflight.run(job.model_path, timeout_s=import_timeout, evaluate=False).raise_first()
    _print_exported(export_trial(job, row, output, force), as_json, f"exported trial {trial} of job {job.name}")


def apply(recipe: Annotated[Path, typer.Argument(help="recipe.json written by `optagent export`.")],
          model: Annotated[Path, typer.Argument(help="The model file the recipe was made from.")],
          output: OutDirOpt = Path("applied"),
          force: Annotated[bool, typer.Option("--force", help="Rebuild even if MODEL's hash differs from the "
                                                             "recipe's, and write into a non-empty directory "
                                                             "(replacing an earlier export there).")] = False,
          as_json: JsonOpt = False, import_timeout: ImportTimeoutOpt = 60.0) -> None:
    """Rebuild a model from a recipe, re-evaluate it and write the same files as export."""
    from optagent import preflight
    from optagent.export import apply_recipe, load_recipe, refuse_nonempty, validate_recipe

    validate_recipe(load_recipe(recipe), recipe)  # a bad recipe or -o is said before the model file runs
    refuse_nonempty(output, force)
    found = preflight.run(model, timeout_s=import_timeout, evaluate=False)
    found.raise_first()
    _print_exported(apply_recipe(recipe, model, output, force, default_batch=found.default_batch or 1), as_json,
                    f"rebuilt {recipe.name}")
