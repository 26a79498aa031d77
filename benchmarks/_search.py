"""Run one benchmark search through the CLI in its own process, and read it back through the library API.

Each search gets a fresh process (and so a fresh forkserver for its trial processes): trial processes fork
from a server started once per process, so an environment variable such as OPTAGENT_EXAMPLE_BATCH set
between two searches in one process would not reach the second search's trials.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FLAGS = {"objectives": "--objective", "constraint_metric": "--constraint-metric",
         "max_accuracy_drop": "--max-accuracy-drop", "max_relative_drop": "--max-relative-drop",
         "sampler": "--sampler", "strategies": "--strategies", "pruner": "--pruner"}


def cli_search(model: Path, name: str, db: str, *, batch: int | None, trials: int, workers: int, threads: int,
               seed: int, options: dict[str, Any], extra: list[str] | None = None) -> tuple[Any, float]:
    """The search's JobReport and its wall time; the CLI's progress lines go to this process's stderr.

    A completed job of that name already in `db` (an earlier run of a benchmark with `--db`) is read back
    instead of searched again; its wall time is then the one stored with it."""
    from optagent import api

    try:
        done = api.report(name, db)
    except Exception:  # no such job (or no such database yet): search
        done = None
    if done is not None and done.job.status == "completed":
        begun, ended = done.job.started_at or done.job.created_at, done.job.finished_at or done.job.started_at
        print(f"{name}: reusing the completed job of that name in {db}", file=sys.stderr, flush=True)
        return done, (ended - begun).total_seconds() if begun and ended else float("nan")

    args = [sys.executable, "-m", "optagent.cli", "search", str(model), "--db", db, "--name", name,
            "--trials", str(trials), "--workers", str(workers), "--threads", str(threads), "--seed", str(seed),
            *(extra or [])]
    for key, value in options.items():
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            args += [FLAGS[key], str(item)]
    env = dict(os.environ)
    if batch is not None:
        env["OPTAGENT_EXAMPLE_BATCH"] = str(batch)
    started = time.perf_counter()
    proc = subprocess.run(args, env=env, stdout=subprocess.DEVNULL)
    if proc.returncode not in (0, 1):  # 1: the job ended but not completed; still readable
        raise SystemExit(f"search {name} failed with exit code {proc.returncode}")
    return api.report(name, db), time.perf_counter() - started
