"""Real servers for the distributed tests: Redis, PostgreSQL and `optagent worker` processes.

`redis_url` and `postgres_url` use the servers on 127.0.0.1 (6379, 5432) when they answer; otherwise they
start throwaway ones from the local binaries (redis-server; initdb + pg_ctl) on free ports in a temporary
directory and stop them afterwards. Without either, the tests skip, except under CI=true, where a missing
server is an error. Each session gets its own Redis database number and key names (unique job keys and
queues) and its own PostgreSQL database, so a developer's data is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SESSION = uuid.uuid4().hex[:8]
# every search the tests start times each model for at most 1 s per measurement (`--measure-seconds`; the
# default 4 s is for figures a user acts on): the tests assert behaviour and clear gains, benchmarks the figures
os.environ.setdefault("OPTAGENT_MEASURE_SECONDS", "1")
REDIS_DB = int(os.environ.get("OPTAGENT_TEST_REDIS_DB", "13"))
# OPTAGENT_TEST_SERVERS=throwaway ignores running servers and always starts private ones
THROWAWAY = os.environ.get("OPTAGENT_TEST_SERVERS") == "throwaway"
PG_BINDIRS = ("/usr/local/bin", "/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin")


def _unavailable(what: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (CI=true: a missing server fails the run instead of skipping)", pytrace=False)
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


def _stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
    """Stop a process started with start_new_session=True by its pid (it stops its own children, e.g. a
    worker's warm shutdown); only if it does not exit in time is its whole process group killed."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group, if any
    if proc.poll() is None:
        proc.wait(timeout=10)


# -- Redis -------------------------------------------------------------------------------------------------
def _redis_ping(url: str) -> bool:
    import redis

    return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())


def start_redis(tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    """A throwaway redis-server on a free port (used by the fallback and by the TLS test)."""
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
            "--appendonly", "no", *extra]
    log = open(tmp / f"redis-{port}.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis://127.0.0.1:PORT/DB: the running server, else a throwaway one; skip (or fail on CI) otherwise."""
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    with contextlib.suppress(Exception):
        if not THROWAWAY and _redis_ping(url):
            yield url
            return
    if shutil.which("redis-server") is None:
        _unavailable("no Redis on 127.0.0.1:6379 and no redis-server binary to start one")
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    url = f"redis://127.0.0.1:{port}/{REDIS_DB}"
    try:
        _wait(lambda: _redis_ping(url), 15, "redis-server")
    except TimeoutError as exc:
        _stop_group(proc)
        _unavailable(str(exc))
    try:
        yield url
    finally:
        _stop_group(proc)


# -- PostgreSQL ---------------------------------------------------------------------------------------------
def _pg_connect(dsn: str) -> bool:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=2) as conn:
        return conn.execute("select 1").fetchone() == (1,)


def _pg_bin(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in PG_BINDIRS if Path(d, name).exists()), None)


@contextlib.contextmanager
def _throwaway_postgres(tmp: Path) -> Iterator[str]:
    """initdb + pg_ctl on a free port; run as the postgres user when we are root (initdb refuses root)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        _unavailable("no PostgreSQL on 127.0.0.1:5432 and no initdb/pg_ctl binaries to start one")
    as_user: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            _unavailable("running as root without runuser: cannot start a throwaway PostgreSQL")
        as_user = [runuser, "-u", "postgres", "--"]
        tmp = Path(tempfile.mkdtemp(prefix="optagent-pg-"))  # pytest's tmp dirs are 0700 root
        shutil.chown(tmp, "postgres")
    data, port = tmp / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, cwd="/")
    opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(tmp / "pg.log"), "-w", "start"],
                   check=True, capture_output=True, cwd="/")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, cwd="/")
        if as_user:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """postgresql+psycopg://... to a database created for this session (dropped at the end)."""
    pytest.importorskip("psycopg")
    import psycopg

    with contextlib.ExitStack() as stack:
        admin = "postgresql://postgres@127.0.0.1:5432/test"
        try:
            if THROWAWAY:
                raise ConnectionError("throwaway servers requested")
            _pg_connect(admin)
        except Exception:
            admin = stack.enter_context(_throwaway_postgres(tmp_path_factory.mktemp("pg")))
            _wait(lambda: _pg_connect(admin), 30, "PostgreSQL")
        name = f"optagent_test_{SESSION}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        host = admin.split("@", 1)[1].rsplit("/", 1)[0]
        try:
            yield f"postgresql+psycopg://postgres@{host}/{name}"
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- optagent workers -------------------------------------------------------------------------------------
@dataclass
class Worker:
    """One `optagent worker` process group: stopped by pid, its output in `log`."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class WorkerPool:
    """Starts real worker processes (`--concurrency 1`, one torch thread) and stops them at teardown."""

    broker: str
    tmp: Path
    queue: str = field(default_factory=lambda: f"optagent-test-{SESSION}-{uuid.uuid4().hex[:6]}")
    workers: list[Worker] = field(default_factory=list)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("OPTAGENT_SECRET", "OPTAGENT_BROKER_URL")}
        env.update(OPTAGENT_CACHE_DIR=str(self.tmp / "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1", OPTAGENT_BROKER_URL=self.broker)
        env.update(extra or {})
        return env

    def start(self, n: int = 1, *, env: dict[str, str] | None = None, wait: bool = True,
              args: tuple[str, ...] = ()) -> list[Worker]:
        started = []
        for _ in range(n):
            name = f"w{len(self.workers) + 1}-{SESSION}"
            log = self.tmp / f"{name}.log"
            cmd = [sys.executable, "-c", "from optagent.cli.worker import main; main()", "--queue", self.queue,
                   "--concurrency", "1", "--hostname", f"{name}@%h", "--loglevel", "info", *args]
            with open(log, "wb") as out:
                proc = subprocess.Popen(cmd, env=self.env(env), stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            worker = Worker(name, proc, log)
            self.workers.append(worker)
            started.append(worker)
        if wait:
            for worker in started:
                self.wait_ready(worker)
        return started

    def wait_ready(self, worker: Worker, timeout: float = 60) -> None:
        def ready() -> bool:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker {worker.name} exited:\n{worker.text()[-3000:]}")
            return " ready." in worker.text()

        _wait(ready, timeout, f"worker {worker.name}")

    def logs(self) -> str:
        return "\n".join(w.text() for w in self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            _stop_group(worker.proc)


@pytest.fixture
def worker_pool(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    """A factory for real `optagent worker` processes on a queue of their own; all stopped at teardown."""
    pool = WorkerPool(redis_url, tmp_path)
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def module_worker_pool(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    """Like worker_pool, shared by the tests of one module (worker start-up costs seconds)."""
    pool = WorkerPool(redis_url, tmp_path_factory.mktemp("workers"))
    try:
        yield pool
    finally:
        pool.stop()


# -- one small search shared by read-side tests -------------------------------------------------------
@pytest.fixture(scope="session")
def shared_search(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One small search per test session, shared by the report, export and dashboard tests: (db url, dir)."""
    root = tmp_path_factory.mktemp("optagent-shared-search")
    url = f"sqlite:///{root / 'optagent.db'}"
    shutil.copy(Path(__file__).parent / "fixtures" / "tiny_model.py", root / "tiny_model.py")
    env = {**os.environ, "OPTAGENT_CACHE_DIR": str(root / "cache")}
    args = ["search", "tiny_model.py", "--trials", "4", "--workers", "2", "--max-accuracy-drop", "0",
            "--strategies", "pruning,finetune,quantization,batch_size", "--name", "shared", "--db", url,
            "--confirm-processes", "1", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "optagent.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    os.environ["OPTAGENT_CACHE_DIR"] = str(root / "cache")
    return url, root


# -- small real model files shared by the strategy and runtime tests ------------------------------------------
@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small conv net model file (tests/_models.py), loaded through the real ModelFile path."""
    from _models import model_file

    return model_file(tmp_path_factory.mktemp("conv"), "conv")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small MLP model file (tests/_models.py)."""
    from _models import model_file

    return model_file(tmp_path_factory.mktemp("mlp"), "mlp")
