"""The plugin author's guide matches the code: every hook is documented (a docstring in agent/hookspecs.py and
a section in docs/plugins.md), every public name an author uses appears in it, and the plugin its code blocks
make up passes the conformance suite, so the guide cannot drift from the code again."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _plugin_site import install_project, pythonpath_with

from optagent import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if inspect.isfunction(fn) and hasattr(fn, f"{hookspecs.PROJECT}_spec"))
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
FILE = re.compile(r"#\s*file:\s*(\S+)\s*\n")


def _blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of the guide."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(DOCS.read_text())]


def _files() -> dict[str, str]:
    """The files the guide's `# file: PATH` blocks make up (blocks naming one path are joined in order)."""
    files: dict[str, str] = {}
    for _, body in _blocks():
        first = FILE.match(body)
        if first:
            files[first.group(1)] = files.get(first.group(1), "") + body[first.end():]
    return files


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


def _public_names() -> set[str]:
    """Every name a plugin author uses: the package's plugin API, the testing and torch helpers, and the
    members of the classes a strategy or metric receives or builds."""
    import optagent
    import optagent.testing
    import optagent.torchutils
    from optagent.metrics import Metric
    from optagent.strategy import Constraint, Param, SpaceContext, Stage, Strategy, TrialContext

    names = set(optagent.__all__) - {"__version__", "Data", "cached_weights", "UserError"}
    names |= set(optagent.testing.__all__) | set(optagent.torchutils.__all__)
    names |= {"RESERVED", "TrialPruned", "Constraint", "hookimpl", "OPTAGENT_PLUGINS"}
    for cls in (TrialContext, SpaceContext, Metric, Constraint, Param):
        names |= {f.name for f in dataclasses.fields(cls)}
    names |= {n for n, v in vars(TrialContext).items() if not n.startswith("_") and (callable(v) or
                                                                                     isinstance(v, property))}
    names |= {n for n in vars(Strategy) if not n.startswith("_")} | set(Stage.__members__)
    names |= {"check_changes_model", "sample_seeds", "sampling_context", "worker_timeout_s", "model_file_path"}
    return names


def test_the_guide_names_every_public_name_an_author_uses() -> None:
    text = DOCS.read_text()
    missing = sorted(n for n in _public_names() if not re.search(rf"`[^`]*\b{re.escape(n)}\b[^`]*`", text))
    assert not missing, f"docs/plugins.md never mentions {missing} (in backticks)"


def test_the_guide_s_python_blocks_parse() -> None:
    for lang, body in _blocks():
        if lang == "python" and not FILE.match(body):
            ast.parse(body)
    for path, source in _files().items():
        if path.endswith(".py"):
            ast.parse(source, filename=path)
    assert {"pyproject.toml", "tests/test_lowrank.py"} <= set(_files())


def test_the_guide_s_plugin_passes_the_conformance_suite(tmp_path: Path) -> None:
    """The guide's files, made a package with its entry point (no pip: a dist-info on PYTHONPATH), pass the
    conformance suite and their own tests in a fresh process, as an author following the guide runs them."""
    project, site = tmp_path / "project", tmp_path / "site"
    site.mkdir()
    for path, source in _files().items():
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(source)
    assert install_project(project, site) == {"lowrank": "optagent_lowrank"}
    env = {k: v for k, v in os.environ.items() if k != "OPTAGENT_PLUGINS"}
    env["PYTHONPATH"] = pythonpath_with(site)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1)) if "passed" in summary else 0
    assert passed >= 15 and "skipped" not in summary, proc.stdout[-3000:]
