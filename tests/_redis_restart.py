"""A Redis restart in the middle of a distributed search, shared by tests/test_distributed_search.py and
benchmarks/redis_restart.py (which runs it several times in a row).

A throwaway redis-server (append-only file in a data directory of its own, like a production Redis) on a free
port, two real `optagent worker` processes, and a real `optagent search` coordinator on SQLite. Once trials
have completed, Redis is stopped (SIGTERM: it writes its append-only file and exits), kept down for a while,
and started again on the same port and data directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import WorkerPool, _redis_ping, _stop_group, _wait, free_port

FIXTURES = Path(__file__).parent / "fixtures"
CLI = [sys.executable, "-m", "optagent.cli"]


class RestartableRedis:
    """redis-server with appendonly on a fixed port and data directory, stopped and started at will."""

    def __init__(self, tmp: Path):
        self.data = tmp / "redis-data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.data / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data),
                 "--appendonly", "yes", "--save", ""], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: _redis_ping(self.url), 30, "redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc)
            self.proc = None


@dataclass
class Run:
    """What one search through a broker outage left: the coordinator's exit and stderr, the job as stored."""

    name: str
    db: str
    returncode: int
    stderr: str
    status: dict[str, Any]
    restarted_after: int  # trials that had run to completion when Redis went down
    seconds: float

    @property
    def measured(self) -> list[dict[str, Any]]:
        """Searched trials that ran (a repeated parameter set is answered from its twin, not run)."""
        return [t for t in self.status["trials"] if t["number"] > 0 and "reused_from" not in t["metrics"]]


def status(name: str, db: str, env: dict[str, str]) -> dict[str, Any] | None:
    proc = subprocess.run([*CLI, "status", name, "--db", db, "--json"], capture_output=True, text=True, env=env,
                          timeout=300)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def start_search(tmp: Path, redis: RestartableRedis, pool: WorkerPool, trials: int,
                 *extra: str) -> tuple[subprocess.Popen[str], str, str, dict[str, str]]:
    model = tmp / "model" / "slow_model.py"
    model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / "slow_model.py", model)
    name, db = f"restart-{uuid.uuid4().hex[:6]}", f"sqlite:///{tmp / 'restart.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("OPTAGENT_SECRET", "OPTAGENT_BROKER_URL")}
    env["OPTAGENT_CACHE_DIR"] = str(tmp / "coordinator-cache")
    args = ["search", str(model), "--broker", redis.url, "--queue", pool.queue, "--db", db, "--name", name,
            "--trials", str(trials), "--strategies", "pruning,quantization", "--sampler", "random", "--seed", "1",
            "--threads", "1", "--confirm-processes", "1", "--quiet", *extra]
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, name, db, env


def wait_complete(proc: subprocess.Popen[str], name: str, db: str, env: dict[str, str], at_least: int,
                  timeout: float = 600) -> int:
    """Wait until `at_least` searched trials ran to completion (answers from a twin do not count) and more
    are in flight; returns how many had completed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the search ended before the restart: {proc.communicate()[1][-3000:]}"
        st = status(name, db, env)
        ran = [t for t in (st or {}).get("trials", []) if t["number"] > 0 and t["state"] == "complete"
               and "reused_from" not in t["metrics"]]
        if st and len(ran) >= at_least and st["running"] + st["queued"] > 0:
            return len(ran)
        time.sleep(0.5)
    raise TimeoutError(f"{at_least} trials did not complete within {timeout:.0f} s")


def restart_mid_search(tmp: Path, *, trials: int = 6, down_s: float = 8.0, workers: int = 2) -> Run:
    """Run a search of `trials` on `workers` workers and restart Redis once two trials are complete."""
    tmp.mkdir(parents=True, exist_ok=True)
    redis = RestartableRedis(tmp)
    redis.start()
    pool = WorkerPool(redis.url, tmp)
    try:
        pool.start(workers, env={"OPTAGENT_TEST_MARKERS": str(tmp / "markers"), "OPTAGENT_TEST_EVAL_SLEEP": "2"})
        started = time.monotonic()
        proc, name, db, env = start_search(tmp, redis, pool, trials)
        done = wait_complete(proc, name, db, env, 2)
        redis.stop()
        time.sleep(down_s)
        redis.start()
        _, err = proc.communicate(timeout=1800)
        st = status(name, db, env)
        assert st is not None, err
        return Run(name, db, proc.returncode, err, st, done, time.monotonic() - started)
    finally:
        pool.stop()
        redis.stop()
