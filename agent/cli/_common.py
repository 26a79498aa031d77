"""Shared CLI pieces: option aliases, the one output layer (human or --json), error reporting."""

from __future__ import annotations

import json
import re
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

DbOpt = Annotated[str | None, typer.Option("--db", envvar="OPTAGENT_DB", show_envvar=True,
                                           help="Database URL [default: sqlite:///optagent.db]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="Job id or name (see `optagent jobs`).")]
ImportTimeoutOpt = Annotated[float, typer.Option(
    "--import-timeout", help="Seconds the model file may take to import when it is checked (in a child process "
    "first); load_model, load_data, example_input and evaluate may take 10 times that on their first call.")]

def _console(stderr: bool = False) -> Console:
    """Rich console; when output is piped, lines stay long rather than wrapping at 80 columns."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, width=200)
    return console


out = _console()
err = _console(stderr=True)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(text: Any) -> str:
    """User text made safe for a terminal: control characters (newlines, escape sequences that would retitle
    or rewrite the terminal) shown as escapes, and every URL's password masked. Print it with markup off."""
    from optagent.security import redact_text

    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], redact_text(str(text)))


def safe(text: Any) -> str:
    """`plain(text)` with Rich markup escaped, for tables and f-strings Rich renders (a job named
    '[bold red]fake[/]' is shown as such, never interpreted)."""
    return escape(plain(text))


def say_error(message: Any) -> None:
    """One line on stderr: user text never interpreted as markup, never wrapped, never holding a secret."""
    err.print(plain(message), markup=False, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)
