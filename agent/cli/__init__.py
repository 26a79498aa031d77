"""The `optagent` command line: a composition root that wires commands to the core."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from optagent.cli import _read, _search
from optagent.errors import UserError

app = typer.Typer(name="optagent", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Search compositions of model optimizations for a measured accuracy/latency Pareto front.")

_state = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:  # commands that build models here (apply, profile, export) print what trial processes hide
        from optagent.trial.entry import quiet_libraries

        quiet_libraries()


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


def _usage_error(exc: Exception) -> str:
    """A Typer/Click usage error as one line with its fix (never the usage block and a framed box)."""
    text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    text = text.replace("Input should be a valid integer, unable to parse string as an integer",
                        "not a whole number").replace("Input should be a valid number, unable to parse string "
                                                      "as a number", "not a number")
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "optagent"
    return f"error: {text.rstrip('.')} (see `{command} --help`)"


def _exit(code: int) -> None:
    """Exit with `code`, even when a model file imported here left a non-daemon thread running."""
    import os
    import threading

    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        os._exit(code)
    sys.exit(code)


def main() -> None:
    """Entry point and the one error path: a user error is one line on stderr and exit 2, an internal one a
    line and exit 1 (--debug shows the traceback); user text is never read as markup and URLs never show a
    password."""
    from optagent.cli._common import say_error

    try:
        from typer._click.exceptions import ClickException, UsageError
    except ImportError:  # pragma: no cover - a Typer that uses click itself
        from click import ClickException, UsageError  # type: ignore[assignment]

    debug = "--debug" in sys.argv[1:]
    code = 0
    try:
        rc = app(standalone_mode=False)
        code = rc if isinstance(rc, int) else 0
    except UserError as exc:
        if debug:
            raise
        say_error(f"error: {exc}")
        code = exc.exit_code
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        say_error("interrupted")
        code = 130
    except UsageError as exc:
        say_error(_usage_error(exc))
        code = 2
    except ClickException as exc:
        say_error(f"error: {exc.format_message()}")
        code = exc.exit_code
    except Exception as exc:  # anything unexpected: a bug, or a server that went away
        if debug:
            raise
        say_error(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        code = 1
    _exit(code)
