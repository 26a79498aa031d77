"""Progress output for `optagent search`: one line per event on stderr (machine output stays on stdout)."""

from __future__ import annotations

import time
from typing import Any

from optagent.cli._common import err, fmt


class LineProgress:
    """Prints a line per baseline, finished trial and job end; silent with quiet=True."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.started = time.monotonic()
        self.baseline: dict[str, float] = {}

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.started
        if kind == "baseline_started":
            err.print("measuring the baseline (trial 0; trains it first if it is not cached)...")
        elif kind == "baseline":
            self.baseline = data["metrics"]
            m = self.baseline
            err.print(f"[{elapsed:6.0f}s] baseline: accuracy {fmt(m.get('accuracy'))}, latency "
                      f"{fmt(m.get('latency_ms'))} ms at batch {fmt(m.get('batch_size'))} "
                      f"(self-speedup {fmt(m.get('speedup'), 3)}, the noise floor)")
        elif kind == "trial_finished":
            t, c = data["trial"], data["counts"]
            done = c["complete"] + c["failed"]
            head = f"[{elapsed:6.0f}s] trial {t['number']:>3} ({done}/{c['budget'] or '∞'})"
            if t["state"] != "complete":
                err.print(f"{head} failed: {t['failure_reason']}")
                return
            m = t["metrics"]
            flag = "front" if t["on_front"] else ("ok" if t["feasible"] else "infeasible")
            err.print(f"{head} accuracy {fmt(m.get('accuracy'))} latency {fmt(m.get('latency_ms'))} ms "
                      f"speedup {fmt(m.get('speedup'), 3)}x [{flag}] {t['recipe']}")
        elif kind == "job_finished":
            job = data["job"]
            err.print(f"[{elapsed:6.0f}s] job {job['name']} {job['status']}; "
                      f"Pareto front: {len(data['pareto'])} trials")
