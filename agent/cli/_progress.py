"""Progress output for `optagent search`, on stderr (machine output stays on stdout).

Two sinks for the coordinator's events (job_created, baseline_started, baseline, trial_started,
trial_finished, job_finished): `LineProgress` prints one line per event (logs, pipes, CI); `LiveProgress` adds a rich
live panel on a terminal (trials done/running/failed of the budget, elapsed and ETA, the baseline, the
best feasible value per objective, the Pareto size) above which the same lines scroll. `make_progress`
picks one. A display error is logged and swallowed: progress output never stops a search.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from optagent.cli._common import err, fmt

log = logging.getLogger(__name__)


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _parse_objectives(objectives: list[str] | None) -> list[tuple[str, str]]:
    from optagent.job import parse_objectives

    return [(o.metric, "max" if o.direction == "maximize" else "min") for o in parse_objectives(objectives)]


def _shown(objectives: list[tuple[str, str]], constraint: str | None) -> list[str]:
    """The metrics a progress line shows: the constraint metric, then the objectives."""
    names = ([constraint] if constraint else []) + [n for n, _ in objectives]
    return list(dict.fromkeys(names))


class LineProgress:
    """Prints a line per baseline, finished trial and job end; silent with quiet=True."""

    def __init__(self, quiet: bool = False, console: Console | None = None, objectives: list[str] | None = None,
                 constraint: str | None = None):
        self.quiet = quiet
        self.console = console or err
        self.started = time.monotonic()
        self.baseline: dict[str, float] = {}
        self.objectives = _parse_objectives(objectives)
        self.constraint = constraint

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to tear down for plain lines (LiveProgress stops its display here)."""

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if self.quiet:
            return
        try:
            self.handle(kind, data)
        except Exception:  # progress output must never stop a search
            log.debug("progress output failed for %s", kind, exc_info=True)

    def handle(self, kind: str, data: dict[str, Any]) -> None:
        line = self.line(kind, data)
        if line:
            self.console.print(line, markup=False, highlight=False)

    def line(self, kind: str, data: dict[str, Any]) -> str | None:
        elapsed = time.monotonic() - self.started
        shown = _shown(self.objectives, self.constraint)
        if kind == "job_created":
            cfg, job = data["config"], data["job"]
            self.objectives = _parse_objectives(cfg.get("objectives"))
            self.constraint = str(cfg.get("constraint_metric") or "").partition(":")[0] or None
            where = ("celery" if cfg.get("executor") == "celery" else f"{cfg.get('workers', 1)} local worker(s)")
            return (f"job {job['id']} ({job['name']}): {cfg.get('n_trials') or '∞'} trials, objectives "
                    f"{', '.join(cfg.get('objectives') or [])}, strategies {', '.join(cfg.get('strategies') or [])}, "
                    f"{where}, {cfg.get('threads')} thread(s) per trial; database {data.get('database')}")
        if kind == "baseline_started":
            return "measuring the baseline (trial 0; trains it first if it is not cached)..."
        if kind == "baseline":
            self.baseline = data["metrics"]
            m = self.baseline
            figures = ", ".join(f"{n} {fmt(m.get(n))}" for n in shown if n != "latency_ms")
            return (f"[{elapsed:6.0f}s] baseline: {figures}, latency "
                    f"{fmt(m.get('latency_ms'))} ms at batch {fmt(m.get('batch_size'))} "
                    f"(self-speedup {fmt(m.get('speedup'), 3)}, the noise floor)")
        if kind == "trial_finished":
            t, c = data["trial"], data["counts"]
            m = t.get("metrics") or {}
            ran = c["complete"] + c["failed"] - c.get("reused", 0)  # reused trials cost no budget
            if "reused_from" in m:  # the sampler proposed a point already measured: one short line
                return (f"[{elapsed:6.0f}s] trial {t['number']:>3} = trial {m['reused_from']:.0f} (same parameters; "
                        "its result is reused, not run again)")
            head = f"[{elapsed:6.0f}s] trial {t['number']:>3} ({ran}/{c['budget'] or '∞'})"
            if t["state"] != "complete":
                return f"{head} {t['state']}: {t['failure_reason']}"
            flag = "front" if t["on_front"] else ("ok" if t["feasible"] else "infeasible")
            figures = " ".join(f"{n} {fmt(m.get(n))}" + (" ms" if n == "latency_ms" else "") for n in shown)
            return f"{head} {figures} speedup {fmt(m.get('speedup'), 3)}x [{flag}] {t['recipe']}"
        if kind == "warm_start":
            return f"[{elapsed:6.0f}s] warm start: " + "; ".join(data["design"])
        if kind == "option_dropped":
            return f"[{elapsed:6.0f}s] {data['text']}"
        if kind == "exhausted":
            return (f"[{elapsed:6.0f}s] the sampler keeps proposing points already measured ({data['reused']}) or "
                    f"dropped ({data['skipped']}): nothing new to try, the search stops here")
        if kind == "confirm_started":
            runs = data.get("processes", 1)
            at_once = data.get("parallel", 1)
            where = ("in one process" if runs == 1 else f"in {runs} fresh processes, "
                     + ("one after another" if at_once <= 1 else f"{at_once} at a time"))
            return (f"[{elapsed:6.0f}s] confirming: re-measuring Pareto trials {data['trials']} interleaved with "
                    f"the baseline {where}...")
        if kind == "confirmed":
            if not data.get("ok"):
                return f"[{elapsed:6.0f}s] confirmation failed: {data.get('reason')}"
            parts = [f"trial {n} {c['speedup']:.2f}x ({c['low']:.2f}-{c['high']:.2f}) rank {c['tie_group']}"
                     for n, c in data.get("confirmations", {}).items() if "speedup" in c]
            notes = "".join(f" ({n})" for n in data.get("notes", []))
            return f"[{elapsed:6.0f}s] confirmed: " + "; ".join(parts) + notes
        if kind == "job_finished":
            job = data["job"]
            return (f"[{elapsed:6.0f}s] job {job['name']} {job['status']}; "
                    f"Pareto front: {len(data['pareto'])} trials")
        return None


class LiveProgress(LineProgress):
    """A rich live panel on a terminal; finished trials still scroll above it as lines."""

    def __init__(self, objectives: list[str] | None = None, budget: int | None = None,
                 timeout_s: float | None = None, console: Console | None = None, constraint: str | None = None):
        super().__init__(quiet=False, console=console, objectives=objectives, constraint=constraint)
        self.budget, self.timeout_s = budget, timeout_s
        self.phase = "starting"
        self.search_started: float | None = None
        self.counts: dict[str, int] = {"complete": 0, "failed": 0, "running": 0, "front": 0}
        self.running: set[int] = set()
        self.infeasible = 0
        self.best: dict[str, tuple[float, int]] = {}  # objective -> (value, trial number)
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._broken = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _ensure_live(self) -> None:
        if self._live is None and not self._broken:
            self._live = Live(get_renderable=self._safe_render, console=self.console, refresh_per_second=2,
                              transient=False, redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    def close(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            try:
                live.stop()
            except Exception:
                log.debug("stopping the live display failed", exc_info=True)

    def __enter__(self) -> LiveProgress:
        return self

    def handle(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._update(kind, data)
        line = self.line(kind, data)
        try:
            self._ensure_live()
        except Exception:  # a terminal rich cannot drive: fall back to plain lines for good
            log.debug("live display unavailable", exc_info=True)
            self._broken, self._live = True, None
        if line:
            self.console.print(line, markup=False, highlight=False)
        if kind == "job_finished":
            self.close()

    # -- state ---------------------------------------------------------------------------------------------
    def _update(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "baseline_started":
            self.phase = "measuring the baseline"
        elif kind == "baseline":
            self.phase = "searching"
            self.baseline = dict(data.get("metrics") or {})
            self.search_started = time.monotonic()
            for name, _ in self.objectives:
                if name in self.baseline:
                    self.best.setdefault(name, (float(self.baseline[name]), 0))
        elif kind == "trial_started":
            self.running.add(int(data["number"]))
            if self.search_started is None:  # resumed job: the baseline was already measured
                self.search_started, self.phase = time.monotonic(), "searching"
        elif kind == "trial_finished":
            t = data["trial"]
            self.running.discard(int(t["number"]))
            self.counts = dict(data.get("counts") or self.counts)
            if self.budget is None:
                self.budget = self.counts.get("budget") or None
            if t["state"] == "complete" and not t.get("feasible"):
                self.infeasible += 1
            if t["state"] == "complete" and t.get("feasible"):
                for name, direction in self.objectives:
                    value = (t.get("metrics") or {}).get(name)
                    if value is None:
                        continue
                    old = self.best.get(name)
                    better = old is None or (value > old[0] if direction == "max" else value < old[0])
                    if better:
                        self.best[name] = (float(value), int(t["number"]))
        elif kind == "confirm_started":
            self.phase = "confirming the Pareto trials"
        elif kind == "job_finished":
            self.phase = f"job {data['job']['status']}"
            self.running.clear()

    def eta_s(self, now: float | None = None) -> float | None:
        """Remaining seconds at the rate trials have finished so far (None before the first one)."""
        now = time.monotonic() if now is None else now
        done = self.counts.get("complete", 0) + self.counts.get("failed", 0) - self.counts.get("reused", 0)
        if self.search_started is None:
            return None
        spent = now - self.search_started
        by_budget = None
        if self.budget and done:
            by_budget = max(0.0, (self.budget - done) * spent / done)
        if self.timeout_s:
            left = max(0.0, self.timeout_s - (now - self.started))
            return left if by_budget is None else min(by_budget, left)
        return by_budget

    # -- rendering -----------------------------------------------------------------------------------------
    def _safe_render(self) -> RenderableType:
        try:
            with self._lock:
                return self.render()
        except Exception as exc:  # never let the refresh thread die noisily
            return Text(f"(progress display error: {type(exc).__name__})", style="dim")

    def render(self, now: float | None = None) -> RenderableType:
        now = time.monotonic() if now is None else now
        c = self.counts
        done = c.get("complete", 0) + c.get("failed", 0) - c.get("reused", 0)
        total = self.budget or max(done, 1)
        bar = ProgressBar(total=float(total), completed=float(min(done, total)), width=40)
        head = Table.grid(padding=(0, 1))
        head.add_row(Text(self.phase, style="bold"), bar,
                     Text(f"{done}/{self.budget or '∞'} trials"),
                     Text(f"elapsed {_clock(now - self.started)}  ETA {_clock(self.eta_s(now))}"))
        counts = Text.assemble(
            ("running ", "dim"), (str(len(self.running) or c.get("running", 0)), "cyan"),
            ("  complete ", "dim"), (str(c.get("complete", 0)), "green"),
            ("  failed ", "dim"), (str(c.get("failed", 0)), "red" if c.get("failed") else ""),
            ("  infeasible ", "dim"), (str(self.infeasible), "yellow" if self.infeasible else ""),
            ("  Pareto front ", "dim"), (str(c.get("front", 0)), "bold magenta"))
        figures = Table(box=None, padding=(0, 2), show_edge=False)
        figures.add_column("")
        for name, direction in self.objectives:
            figures.add_column(f"{name} ({direction})", justify="right")
        if self.baseline:
            figures.add_row("baseline", *[fmt(self.baseline.get(n)) for n, _ in self.objectives])
            best = []
            for name, _ in self.objectives:
                value = self.best.get(name)
                best.append("-" if value is None else f"{fmt(value[0])} (#{value[1]})")
            figures.add_row("best feasible", *best)
        parts: list[RenderableType] = [head, counts]
        if self.baseline:
            parts.append(figures)
        return Group(*parts)


def make_progress(quiet: bool = False, objectives: list[str] | None = None, budget: int | None = None,
                  timeout_s: float | None = None, console: Console | None = None,
                  constraint: str | None = None) -> LineProgress:
    """The live panel when stderr is a terminal, plain lines otherwise (silent with quiet=True)."""
    console = console or err
    if quiet or not console.is_terminal or console.is_dumb_terminal:
        return LineProgress(quiet=quiet, console=console, objectives=objectives, constraint=constraint)
    return LiveProgress(objectives=objectives, budget=budget, timeout_s=timeout_s, console=console,
                        constraint=constraint)
