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


# Commands built in their own modules. A module still being written is skipped at import; once every
# module exists this list is the CLI's table of contents.
_COMMANDS = (
    ("optagent.cli.worker", "worker", "worker"),
    ("optagent.cli._plugins", "plugins", "plugins"),
    ("optagent.cli._profile", "profile", "profile"),
    ("optagent.cli._report", "report", "report"),
    ("optagent.cli._report", "export", "export"),
    ("optagent.cli._report", "apply", "apply"),
)


def _register_commands() -> None:
    import importlib

    for module_name, attr, command in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        app.command(command)(getattr(module, attr))


_register_commands()


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
