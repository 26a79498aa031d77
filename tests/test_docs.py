"""Every hook is documented: a docstring in agent/hookspecs.py and a section in docs/plugins.md."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from optagent import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if inspect.isfunction(fn) and hasattr(fn, f"{hookspecs.PROJECT}_spec"))


def test_there_are_hooks() -> None:
    assert {"optagent_register_strategies", "optagent_register_metrics", "optagent_trial_finished"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented(hook: str) -> None:
    headings = set(re.findall(r"^###\s+(\S+)\s*$", DOCS.read_text(), flags=re.MULTILINE))
    assert hook in headings, f"{hook} has no '### {hook}' section in docs/plugins.md"


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_docstrings(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc) > 40, f"{hook} in agent/hookspecs.py needs a docstring: when it is called, what it gets and returns"


def test_every_documented_hook_exists() -> None:
    headings = re.findall(r"^###\s+(optagent_\w+)\s*$", DOCS.read_text(), flags=re.MULTILINE)
    unknown = set(headings) - set(HOOKS)
    assert not unknown, f"docs/plugins.md documents hooks that do not exist: {unknown}"
