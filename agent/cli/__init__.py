"""The `optagent` command line: a composition root that wires commands to the core."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from optagent.cli import _read, _search
from optagent.cli._common import err
from optagent.errors import UserError

app = typer.Typer(name="optagent", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Search compositions of model optimizations for a measured accuracy/latency Pareto front.")

_state = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


app.command()(_search.search)
app.command()(_search.resume)
app.command()(_search.cancel)
app.command()(_search.check)
app.command()(_read.jobs)
app.command()(_read.status)
app.command()(_read.pareto)


def _register_optional() -> None:
    try:
        from optagent.cli.worker import worker
    except ImportError:  # pragma: no cover - the worker module ships with the package
        return
    app.command("worker")(worker)


_register_optional()


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 2; --debug shows the traceback."""
    debug = "--debug" in sys.argv[1:]
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except UserError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", markup=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and anything unexpected
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        if debug:
            raise
        err.print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", markup=False)
        sys.exit(1)
