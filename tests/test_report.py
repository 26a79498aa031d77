"""The HTML report (rendered in real headless Chromium), the hypervolume, and live progress output."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console
from sqlmodel import Session
from typer.testing import CliRunner

from optagent.cli import app
from optagent.cli._progress import LineProgress, LiveProgress, make_progress
from optagent.errors import UserError
from optagent.search.front import hypervolume, hypervolume_history
from optagent.storage import Trial, engine_for, find_job, get_trial, job_trials

FIXTURES = Path(__file__).parent / "fixtures"
CHROMIUM = "/usr/bin/chromium"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                "--virtual-time-budget=5000",
                "--host-resolver-rules=MAP * ~NOTFOUND"]  # no network: proves the file is self-contained


class ScriptTags(HTMLParser):
    """Counts inline scripts and collects anything the page would fetch (script src, stylesheets)."""

    def __init__(self) -> None:
        super().__init__()
        self.external: list[str] = []
        self.inline = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script":
            if found.get("src"):
                self.external.append(str(found["src"]))
            else:
                self.inline += 1
        elif tag == "link" and found.get("href"):
            self.external.append(str(found["href"]))


@pytest.fixture(scope="module")
def search(shared_search: tuple[str, Path]) -> tuple[str, Path]:
    url, root = shared_search
    with Session(engine_for(url)) as s:  # a failed trial, as a crashed strategy would leave it
        job = find_job(s, "shared")
        if get_trial(s, job.id or 0, 99) is None:
            s.add(Trial(job_id=job.id or 0, number=99, state="failed", recipe="pruning(method=structured)",
                        failure_reason="RuntimeError: <boom> & the strategy crashed"))
            s.commit()
    return url, root


@pytest.fixture(scope="module")
def report_file(search: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    url, _ = search
    target = tmp_path_factory.mktemp("report") / "report.html"
    result = CliRunner().invoke(app, ["report", "shared", "-o", str(target), "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["report"] == str(target)
    return target


def test_report_is_self_contained_and_lists_everything(report_file: Path, search: tuple[str, Path]) -> None:
    text = report_file.read_text()
    tags = ScriptTags()
    tags.feed(text)
    assert tags.external == [] and tags.inline >= 3  # plotly.js inlined: works offline
    for piece in ('id="pareto"', 'id="hypervolume"', 'id="importances"', 'id="trials"', "Hardware fingerprint",
                  "Job configuration", "max_accuracy_drop", "cpu_model", "infeasible (", "baseline (1)",
                  "Pareto front ("):
        assert piece in text, piece
    assert "RuntimeError: &lt;boom&gt; &amp; the strategy crashed" in text  # failed trials listed, escaped
    assert "<boom>" not in text


def test_hypervolume_matches_hand_computed_values() -> None:
    # maximise y, minimise x: two points against ref (x=4, y=0)
    assert hypervolume([[2.0, 3.0], [1.0, 1.0]], [0.0, 4.0], [1.0, -1.0]) == pytest.approx(2 * 1 + 1 * 3 - 1 * 1)
    assert hypervolume([[1.0, 5.0]], [0.0, 4.0], [1.0, -1.0]) == 0.0  # worse than the reference: no volume
    cube = hypervolume([[1.0, 1.0, 1.0], [0.5, 0.5, 2.0]], [2.0, 2.0, 3.0], [-1.0, -1.0, -1.0])
    assert cube == pytest.approx(1 * 1 * 2 + (1.5 * 1.5 - 1.0) * 1)


def test_hypervolume_history_is_monotone_and_starts_at_the_baseline(search: tuple[str, Path]) -> None:
    url, _ = search
    with Session(engine_for(url)) as s:
        job = find_job(s, "shared")
        history = hypervolume_history(job, job_trials(s, job.id or 0))
    assert history is not None
    numbers, volumes, _ = history
    assert numbers[0] == 0 and volumes[0] == 0.0  # the baseline alone dominates nothing beyond itself
    assert all(b >= a for a, b in zip(volumes, volumes[1:], strict=False))


def test_report_renders_in_headless_chromium(report_file: Path, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed (apt-get install chromium); CI=true requires it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp_path / "profile"
    url = report_file.as_uri()
    dom = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
                          "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-plots="3"' in html, "plotly did not populate the three plot divs"
    assert "data-errors=" not in html, "a script error was caught by the page's error hook"
    assert html.count("main-svg") >= 3  # plotly drew SVG into each figure
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not [line for line in console if "error" in line.lower() or "Uncaught" in line], console
    shot = tmp_path / "report.png"
    proc = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                           "--window-size=1400,1000", url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    if os.environ.get("OPTAGENT_ARTIFACTS"):
        artifacts = Path(os.environ["OPTAGENT_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "report.png")


def test_report_errors_name_the_fix(search: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = search
    runner = CliRunner()
    unknown = runner.invoke(app, ["report", "nope", "-o", str(tmp_path / "r.html"), "--db", url])
    assert isinstance(unknown.exception, UserError) and "optagent jobs" in str(unknown.exception)
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = runner.invoke(app, ["report", "shared", "-o", str(blocker / "r.html"), "--db", url])
    assert isinstance(bad.exception, UserError) and "-o" in str(bad.exception)


# -- live progress ---------------------------------------------------------------------------------------
EVENTS = [
    ("baseline_started", {}),
    ("baseline", {"metrics": {"accuracy": 0.91, "latency_ms": 0.35, "batch_size": 8.0, "speedup": 1.0}}),
    ("trial_started", {"number": 1, "params": {}}),
    ("trial_started", {"number": 2, "params": {}}),
    ("trial_finished", {"trial": {"number": 1, "state": "complete", "feasible": True, "on_front": True,
                                  "metrics": {"accuracy": 0.93, "latency_ms": 0.21, "speedup": 1.6},
                                  "recipe": "pruning(method=structured)", "failure_reason": None},
                        "counts": {"complete": 1, "failed": 0, "running": 1, "budget": 4, "front": 1}}),
    ("trial_finished", {"trial": {"number": 2, "state": "failed", "failure_reason": "boom"},
                        "counts": {"complete": 1, "failed": 1, "running": 0, "budget": 4, "front": 1}}),
]


def test_live_progress_on_a_terminal_shows_counts_baseline_best_and_front() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140)
    progress = make_progress(objectives=["accuracy:max", "latency_ms:min"], budget=4, console=console)
    assert isinstance(progress, LiveProgress)
    with progress:
        for kind, data in EVENTS:
            progress(kind, data)
        shown = Console(file=io.StringIO(), width=140)
        shown.print(progress.render())
        panel = shown.file.getvalue()  # type: ignore[attr-defined]
        assert progress.eta_s() is not None
    assert "2/4 trials" in panel and "failed 1" in panel and "Pareto front 1" in panel
    assert "0.93 (#1)" in panel and "0.21 (#1)" in panel and "baseline" in panel and "ETA" in panel
    assert "trial   2 (2/4) failed: boom" in buf.getvalue()  # the lines still scroll above the panel


def test_plain_lines_when_not_a_terminal_and_silence_when_quiet() -> None:
    buf = io.StringIO()
    progress = make_progress(console=Console(file=buf, width=200))
    assert type(progress) is LineProgress
    for kind, data in EVENTS:
        progress(kind, data)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4 and "baseline: accuracy 0.91" in lines[1]
    quiet = io.StringIO()
    silent = make_progress(quiet=True, console=Console(file=quiet, force_terminal=True))
    for kind, data in EVENTS:
        silent(kind, data)
    assert quiet.getvalue() == ""


def test_a_broken_display_never_stops_the_search() -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError("terminal went away")

    progress = make_progress(console=Console(file=Broken(), force_terminal=True), budget=2)
    for kind, data in [*EVENTS, ("trial_finished", {"trial": None, "counts": None})]:
        progress(kind, data)  # must not raise
    with contextlib.suppress(Exception):
        progress.close()


def test_progress_lines_say_how_the_confirmation_runs_and_its_bands() -> None:
    progress = LineProgress(quiet=True)
    line = progress.line("confirm_started", {"trials": [3, 11], "processes": 3, "parallel": 2})
    assert line is not None and "Pareto trials [3, 11]" in line and "3 fresh processes, 2 at a time" in line
    line = progress.line("confirm_started", {"trials": [3], "processes": 3, "parallel": 1})
    assert line is not None and "3 fresh processes, one after another" in line
    line = progress.line("confirm_started", {"trials": [3], "processes": 1})
    assert line is not None and "in one process" in line
    line = progress.line("confirmed", {"ok": True, "notes": ["confirmation process 2: exited with code 1"],
                                       "confirmations": {"3": {"speedup": 11.78, "low": 11.2, "high": 12.38,
                                                               "tie_group": 1}, "4": {"error": "boom"}}})
    assert line is not None and "trial 3 11.78x (11.20-12.38) rank 1" in line and "process 2: exited" in line
    assert "trial 4" not in line
