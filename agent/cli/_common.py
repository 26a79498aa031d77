"""Shared CLI pieces: option aliases, the one output layer (human or --json), error reporting."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

DbOpt = Annotated[str | None, typer.Option("--db", envvar="OPTAGENT_DB", show_envvar=True,
                                           help="Database URL [default: sqlite:///optagent.db]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
JobArg = Annotated[str, typer.Argument(help="Job id or name (see `optagent jobs`).")]

def _console(stderr: bool = False) -> Console:
    """Rich console; when output is piped, lines stay long rather than wrapping at 80 columns."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, width=200)
    return console


out = _console()
err = _console(stderr=True)


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
