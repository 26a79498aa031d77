"""Distributed searches end to end: the CLI coordinator, real Redis, real PostgreSQL, real worker processes.

Workers get the model file by content (the test's path is not used on their side), results come back as
JSON, and the coordinator alone writes the study and optagent's tables.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CLI = [sys.executable, "-m", "optagent.cli"]

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def cli(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


def status(name: str, db: str, env: dict[str, str]) -> dict[str, Any]:
    proc = cli("status", name, "--db", db, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_exactly_once(name: str, db: str, env: dict[str, str], trials: int) -> dict[str, Any]:
    """The job ended with exactly `trials` searched trials that ran, all complete, plus the baseline (and any
    repeated parameter set answered from its twin's result), each number once, nothing left running, and the
    Optuna study agrees."""
    st = status(name, db, env)
    numbers = [t["number"] for t in st["trials"]]
    assert numbers == list(range(len(numbers))), numbers
    assert all(t["state"] == "complete" for t in st["trials"]), [(t["number"], t["state"], t["failure_reason"])
                                                                  for t in st["trials"]]
    ran = [t for t in st["trials"] if t["number"] > 0 and "reused_from" not in t["metrics"]]
    assert len(ran) == trials, [(t["number"], t["metrics"].get("reused_from")) for t in st["trials"]]
    assert st["status"] == "completed" and st["running"] == 0
    url = db
    study_name = next(s.study_name for s in optuna.get_all_study_summaries(url) if s.study_name.endswith(name))
    states = [t.state.name for t in optuna.load_study(study_name=study_name, storage=url).trials]
    assert states == ["COMPLETE"] * len(numbers), states
    return st


@pytest.fixture
def setup(worker_pool: Any, postgres_url: str, tmp_path: Path) -> tuple[Any, dict[str, str], Path]:
    markers = tmp_path / "markers"
    worker_pool.start(2, env={"OPTAGENT_TEST_MARKERS": str(markers)})
    env = {**os.environ, "OPTAGENT_CACHE_DIR": str(tmp_path / "coordinator-cache")}
    env.pop("OPTAGENT_SECRET", None)
    model = tmp_path / "model" / "slow_model.py"
    model.parent.mkdir()
    model.write_bytes((FIXTURES / "slow_model.py").read_bytes())
    return worker_pool, env, model


def search_args(model: Path, pool: Any, db: str, name: str, trials: int, confirm_processes: int = 1) -> list[str]:
    return ["search", str(model), "--broker", pool.broker, "--queue", pool.queue, "--db", db, "--name", name,
            "--trials", str(trials), "--strategies", "pruning,quantization", "--sampler", "random", "--seed", "1",
            "--threads", "1", "--confirm-processes", str(confirm_processes), "--quiet"]


def test_distributed_search_on_two_workers(setup: tuple[Any, dict[str, str], Path], postgres_url: str) -> None:
    pool, env, model = setup
    name = f"dist-{uuid.uuid4().hex[:6]}"
    proc = cli(*search_args(model, pool, postgres_url, name, 6, confirm_processes=2), env=env)
    assert proc.returncode == 0, proc.stderr
    st = assert_exactly_once(name, postgres_url, env, 6)
    pids = {t["worker"]["pid"] for t in st["trials"]}
    assert len(pids) >= 2, "both workers ran trials"
    assert all(t["worker"]["host"] and t["hardware"]["threads"] == 1 for t in st["trials"])
    # a worker's pool process ran the confirmation in two fresh processes of its own
    confirmed = [t["metrics"] for t in st["trials"] if t["number"] > 0 and "confirmed_speedup" in t["metrics"]]
    assert confirmed and all(len(m["confirmed_speedup_runs"]) == 2 for m in confirmed), st["trials"]
    assert pool.broker.split("@")[-1] not in proc.stderr or "***" not in pool.broker


def test_a_worker_killed_mid_trial_costs_a_rerun_not_a_trial(setup: tuple[Any, dict[str, str], Path],
                                                             postgres_url: str, tmp_path: Path) -> None:
    pool, env, model = setup
    name = f"kill-{uuid.uuid4().hex[:6]}"
    coordinator = subprocess.Popen([*CLI, *search_args(model, pool, postgres_url, name, 5)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    markers = tmp_path / "markers"
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:  # the first trial after the baseline
        found = sorted(markers.glob("*")) if markers.exists() else []
        if len(found) >= 2:
            victim = int(found[1].read_text())
        time.sleep(0.1)
    assert victim is not None, "no trial started"
    os.kill(victim, signal.SIGKILL)  # the pool process evaluating that trial dies, as under the OOM killer
    out, err = coordinator.communicate(timeout=900)
    assert coordinator.returncode == 0, err
    st = assert_exactly_once(name, postgres_url, env, 5)
    assert any(t["worker"].get("attempt", 1) >= 2 for t in st["trials"]), "the killed trial ran again"


def test_the_coordinator_killed_then_resumed_finishes_the_job(setup: tuple[Any, dict[str, str], Path],
                                                              postgres_url: str) -> None:
    pool, env, model = setup
    name = f"resume-{uuid.uuid4().hex[:6]}"
    coordinator = subprocess.Popen([*CLI, *search_args(model, pool, postgres_url, name, 6)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert coordinator.poll() is None, "the search ended before it could be killed"
        probe = cli("status", name, "--db", postgres_url, "--json", env=env)  # exit 2 until the job exists
        st = json.loads(probe.stdout) if probe.returncode == 0 else None
        if st and st["complete"] >= 2 and st["running"] >= 1:
            break
        time.sleep(0.5)
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait()
    st = status(name, postgres_url, env)
    assert st["status"] == "running" and st["complete"] < 6  # killed mid-search, trials in flight
    proc = cli("resume", name, "--db", postgres_url, "--broker", pool.broker, "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert_exactly_once(name, postgres_url, env, 6)


# -- a broker outage (issue 18) -------------------------------------------------------------------------------
def _measured_exactly_once(run: Any, trials: int) -> None:
    """Every searched trial that ran is complete and recorded once; as many ran as the budget asked for."""
    rows = run.status["trials"]
    numbers = [t["number"] for t in rows]
    assert numbers == sorted(set(numbers)) == list(range(len(rows))), numbers
    assert all(t["state"] == "complete" for t in rows), [(t["number"], t["state"], t["failure_reason"]) for t in rows]
    assert len(run.measured) == trials, [(t["number"], t["metrics"].get("reused_from")) for t in rows]
    study_name = next(s.study_name for s in optuna.get_all_study_summaries(run.db) if s.study_name.endswith(run.name))
    states = [t.state.name for t in optuna.load_study(study_name=study_name, storage=run.db).trials]
    assert set(states) == {"COMPLETE"} and len(states) == len(rows), states


def test_a_redis_restart_mid_search_loses_nothing(tmp_path: Path) -> None:
    """Redis restarts (same data directory, append-only) while trials are in flight on two workers: the
    coordinator says once that the broker is lost and once that it is back, reconciles, and the search ends
    with exactly the budget's trials, none twice, exit 0."""
    from _redis_restart import restart_mid_search

    if shutil.which("redis-server") is None:
        pytest.skip("needs the redis-server binary")
    run = restart_mid_search(tmp_path, trials=6, down_s=8.0)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.status["status"] == "completed"
    _measured_exactly_once(run, 6)
    assert run.stderr.count("lost the broker") == 1 and run.stderr.count("is back after") == 1, run.stderr


def test_a_broker_away_past_the_limit_interrupts_the_job_and_resume_finishes_it(tmp_path: Path) -> None:
    from _redis_restart import CLI as RESTART_CLI
    from _redis_restart import RestartableRedis, start_search, status, wait_complete
    from conftest import WorkerPool

    if shutil.which("redis-server") is None:
        pytest.skip("needs the redis-server binary")
    redis = RestartableRedis(tmp_path)
    redis.start()
    pool = WorkerPool(redis.url, tmp_path)
    try:
        pool.start(1, env={"OPTAGENT_TEST_EVAL_SLEEP": "3"})  # 4 trials in a row outlast the restart by far
        proc, name, db, env = start_search(tmp_path, redis, pool, 4, "--broker-retry-s", "6")
        wait_complete(proc, name, db, env, 1)
        redis.stop()
        _, err = proc.communicate(timeout=600)  # the limit, not the test, ends the search
        assert proc.returncode not in (0, None)
        st = status(name, db, env)
        assert st is not None and st["status"] == "interrupted", st
        assert f"optagent resume {name}" in st["error"] and "--broker-retry-s" in st["error"]
        assert f"optagent resume {name}" in err.strip().splitlines()[-1], err
        redis.start()
        resumed = subprocess.run([*RESTART_CLI, "resume", name, "--db", db, "--broker", redis.url, "--quiet"],
                                 env=env, capture_output=True, text=True, timeout=1200)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        st = status(name, db, env)
        assert st is not None and st["status"] == "completed"
        assert len([t for t in st["trials"] if t["number"] > 0 and "reused_from" not in t["metrics"]]) == 4
    finally:
        pool.stop()
        redis.stop()


def test_a_worker_gives_up_on_a_broker_gone_past_its_limit(tmp_path: Path) -> None:
    from _redis_restart import RestartableRedis
    from conftest import WorkerPool

    if shutil.which("redis-server") is None:
        pytest.skip("needs the redis-server binary")
    redis = RestartableRedis(tmp_path)
    redis.start()
    pool = WorkerPool(redis.url, tmp_path)
    try:
        [worker] = pool.start(1, args=("--broker-retry-s", "5"))
        redis.stop()
        assert worker.proc.wait(timeout=300) == 1  # checked every few seconds; the limit ends it
        text = worker.text()
        assert text.count("optagent worker: lost the broker") == 1 and "stayed unreachable" in text, text[-3000:]
    finally:
        pool.stop()
        redis.stop()
