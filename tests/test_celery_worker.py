"""Trials through real Redis and real `optagent worker` processes: round trip, authentication, crash safety.

Nothing is simulated: the workers are separate process groups started by the fixtures in conftest.py, the broker and
result backend are a real Redis. Workers run `--concurrency 1` with one torch thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from optagent.errors import UserError
from optagent.executors._base import Outcome
from optagent.executors.celery import CeleryExecutor, task_id
from optagent.security import redact_url, sign_payload
from optagent.workers.celery_app import keys

pytestmark = [pytest.mark.redis, pytest.mark.timeout(600)]

SECRET = "s3cret-" + uuid.uuid4().hex[:10]
FAST = {"warmup": 1, "min_reps": 3, "max_reps": 5, "min_time_s": 0.0, "max_time_s": 0.2}

MODEL = '''
import os, time
import torch
from torch import nn
from torch.utils.data import TensorDataset
import optagent

BEHAVIOUR = {behaviour!r}
MARKER = {marker!r}

def load_model():
    if MARKER:
        with open(MARKER, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
    if BEHAVIOUR == "crash":
        os.kill(os.getpid(), 9)
    if BEHAVIOUR == "slow":
        time.sleep(3)
    if BEHAVIOUR == "stuck":
        time.sleep(60)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3)).eval()

def load_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    return optagent.Data(train=TensorDataset(x, y), eval=TensorDataset(x, y))

def evaluate(model, loader):
    correct = total = 0
    for xb, yb in loader:
        correct += int((model(xb).argmax(1) == yb).sum())
        total += len(yb)
    return {{"accuracy": correct / total}}

def example_input():
    return torch.randn(2, 4)
'''


def write_model(tmp: Path, behaviour: str = "ok", marker: Path | None = None) -> Path:
    path = tmp / f"model_{behaviour}_{uuid.uuid4().hex[:6]}.py"
    path.write_text(MODEL.format(behaviour=behaviour, marker=str(marker) if marker else ""))
    return path


def payload(model: Path, number: int, *, inline: bool = False, **extra: Any) -> dict[str, Any]:
    source = model.read_bytes()
    spec = {"path": str(model), "sha256": hashlib.sha256(source).hexdigest(), "source_b64": None}
    if inline:  # a path the worker cannot have: the source must travel with the payload
        spec.update(path=f"/nonexistent/{model.name}", source_b64=base64.b64encode(source).decode())
    return {"version": 1, "trial": number, "job": {"id": 1, "name": "test"}, "model": spec, "params": {},
            "strategies": [], "objectives": ["accuracy:max"], "seed": 0, "threads": 1, "device": "cpu",
            "measure": FAST, **extra}


def poll_all(ex: CeleryExecutor, want: int, timeout: float) -> list[Outcome]:
    got: list[Outcome] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += ex.poll(1.0)
    return got


@pytest.fixture(scope="module")
def pool(module_worker_pool: Any) -> Any:
    module_worker_pool.start(2, env={"OPTAGENT_SECRET": SECRET})
    return module_worker_pool


@pytest.fixture
def executor(pool: Any, redis_url: str) -> Iterator[CeleryExecutor]:
    ex = CeleryExecutor(redis_url, pool.queue, f"t{uuid.uuid4().hex[:8]}", secret=SECRET)
    yield ex
    ex.close()


def test_round_trip_through_a_real_worker(pool: Any, executor: CeleryExecutor, tmp_path: Path) -> None:
    model = write_model(tmp_path)
    executor.submit(1, payload(model, 1, inline=True))
    executor.submit(1, payload(model, 1, inline=True))  # idempotent: one task
    assert executor.in_flight() == {1}
    outcomes = poll_all(executor, 1, 300)
    assert [o.number for o in outcomes] == [1]
    result = outcomes[0].result
    assert result["state"] == "complete", result["failure_reason"]
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0 and result["metrics"]["latency_ms"] > 0
    assert result["worker"]["pid"] != os.getpid() and result["worker"]["attempt"] == 1
    assert executor.in_flight() == set() and executor.poll(0.2) == []
    assert executor.workers() == 2 and executor.capacity == 3
    # the lease goes once the result is stored (after_return): nothing is left to lapse
    lease = keys(task_id(executor.job_key, 1))["lease"]
    deadline = time.monotonic() + 5
    while executor._redis.exists(lease) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not executor._redis.exists(lease)


def test_forged_and_unsigned_payloads_are_refused_not_run(pool: Any, executor: CeleryExecutor,
                                                         tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    model = write_model(tmp_path, marker=marker)
    signed = sign_payload(executor._prepare(7, payload(model, 7)), SECRET)
    forged = {**signed, "seed": 1234}  # altered after signing
    unsigned = {k: v for k, v in signed.items() if k != "signature"}
    results = {}
    for name, message in (("forged", forged), ("unsigned", unsigned)):
        tid = f"{task_id(executor.job_key, 7)}-{name}"
        executor.app.send_task("optagent.run_trial", args=[message], task_id=tid, queue=pool.queue)
        results[name] = executor.app.AsyncResult(tid).get(timeout=60)
    assert results["forged"]["state"] == "failed"
    assert "signature mismatch" in results["forged"]["failure_reason"]
    assert "unsigned payload" in results["unsigned"]["failure_reason"]
    assert not marker.exists(), "a refused payload's model code ran"
    assert "refused trial 7" in pool.logs() and "signature mismatch" in pool.logs()


def test_sigkill_mid_trial_redelivers_and_reports_once(pool: Any, executor: CeleryExecutor,
                                                       tmp_path: Path) -> None:
    marker = tmp_path / "starts"
    model = write_model(tmp_path, "slow", marker)
    executor.submit(3, payload(model, 3))
    deadline = time.monotonic() + 300  # generous: a busy machine starts workers slowly
    while not marker.exists() and time.monotonic() < deadline:  # the trial is inside load_model
        time.sleep(0.1)
    lease = executor._redis.get(keys(task_id(executor.job_key, 3))["lease"])
    victim = json.loads(lease)["pid"]
    os.kill(victim, signal.SIGKILL)
    outcomes = poll_all(executor, 1, 300)
    outcomes += executor.poll(2.0)  # nothing else may arrive for this trial
    assert [o.number for o in outcomes] == [3]
    result = outcomes[0].result
    assert result["state"] == "complete", result["failure_reason"]
    assert result["worker"]["pid"] != victim and result["worker"]["attempt"] == 2
    assert len(marker.read_text().split()) == 2  # the killed attempt and the one that finished


def test_poison_pill_fails_after_k_attempts(pool: Any, executor: CeleryExecutor, tmp_path: Path) -> None:
    marker = tmp_path / "starts"
    model = write_model(tmp_path, "crash", marker)
    executor.submit(4, payload(model, 4, max_attempts=2))
    outcomes = poll_all(executor, 1, 120)
    assert [o.number for o in outcomes] == [4]
    result = outcomes[0].result
    assert result["state"] == "failed"
    assert result["failure_reason"].startswith("trial killed its worker 2 times")
    assert len(marker.read_text().split()) == 2


def test_resume_reuses_finished_and_running_trials(pool: Any, executor: CeleryExecutor, redis_url: str,
                                                   tmp_path: Path) -> None:
    fast, slow = write_model(tmp_path), write_model(tmp_path, "slow")
    executor.submit(10, payload(fast, 10))
    first = poll_all(executor, 1, 300)[0].result
    executor.submit(11, payload(slow, 11))
    time.sleep(0.5)
    executor.close()  # the coordinator dies with trial 11 in flight

    again = CeleryExecutor(redis_url, pool.queue, executor.job_key, secret=SECRET)
    try:
        again.submit(10, payload(fast, 10))  # finished: delivered from the backend, not re-run
        again.submit(11, payload(slow, 11))  # sent and running: not sent a second time
        assert again.in_flight() == {10, 11}
        outcomes = poll_all(again, 2, 300)
        by_number = {o.number: o.result for o in outcomes}
        assert sorted(by_number) == [10, 11]
        assert by_number[10] == first
        assert by_number[11]["state"] == "complete", by_number[11]["failure_reason"]
        for n in (10, 11):
            assert int(again._redis.get(keys(task_id(executor.job_key, n))["attempts"])) == 1
        assert again.poll(1.0) == []
    finally:
        again.close()


def test_cancel_stops_running_and_queued_trials_and_resume_runs_them(pool: Any, executor: CeleryExecutor,
                                                                     redis_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "starts"
    model = write_model(tmp_path, "stuck", marker)
    for n in range(20, 24):  # 2 workers: two run, two wait in the queue
        executor.submit(n, payload(model, n))
    deadline = time.monotonic() + 300  # generous: a busy machine starts workers slowly
    while (not marker.exists() or len(marker.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    executor.cancel()
    assert executor.in_flight() == set()
    deadline = time.monotonic() + 120  # running trials stop at their next heartbeat (5 s on an idle machine)
    while pool.logs().count("job cancelled: stopping the trial") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool.logs().count("job cancelled: stopping the trial") >= 2
    time.sleep(7)  # the freed workers would take the queued trials now if they were still queued
    assert len(marker.read_text().split()) == 2
    assert executor.poll(0.5) == []

    resumed = CeleryExecutor(redis_url, pool.queue, executor.job_key, secret=SECRET)
    try:  # an interrupted job that is resumed: the same numbers run again, attempts not charged
        resumed.submit(20, payload(write_model(tmp_path), 20))
        outcomes = poll_all(resumed, 1, 300)
        assert [o.number for o in outcomes] == [20]
        assert outcomes[0].result["state"] == "complete" and outcomes[0].result["worker"]["attempt"] == 1
    finally:
        resumed.close()


def test_trial_survives_its_whole_worker_dying(pool: Any, executor: CeleryExecutor, tmp_path: Path) -> None:
    """The machine dies: pool child and worker parent SIGKILLed, the message stuck unacknowledged."""
    marker = tmp_path / "starts"
    model = write_model(tmp_path, "slow", marker)
    executor.submit(30, payload(model, 30))
    deadline = time.monotonic() + 300  # generous: a busy machine starts workers slowly
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the trial never started on the worker"
    victim = json.loads(executor._redis.get(keys(task_id(executor.job_key, 30))["lease"]))["pid"]
    assert os.getpgid(victim) != os.getpgid(0)
    os.killpg(os.getpgid(victim), signal.SIGKILL)  # the whole `optagent worker` process group
    outcomes = poll_all(executor, 1, 300)
    assert [o.number for o in outcomes] == [30]
    result = outcomes[0].result
    assert result["state"] == "complete", result["failure_reason"]
    assert result["worker"]["attempt"] == 2 and result["worker"]["pid"] != victim


def test_worker_logs_hold_no_secret(pool: Any) -> None:
    assert SECRET not in pool.logs()


def test_bad_broker_urls_are_one_line_user_errors() -> None:
    with pytest.raises(UserError, match=r"redis://:\*\*\*@127.0.0.1:1/0.*start Redis"):
        CeleryExecutor("redis://:pw-hidden@127.0.0.1:1/0", "q", "job")
    with pytest.raises(UserError, match="unsupported broker URL"):
        CeleryExecutor("amqp://guest:pw-hidden@localhost//", "q", "job")
    with pytest.raises(UserError) as info:
        CeleryExecutor("rediss://:pw-hidden@127.0.0.1:1/0?ssl_cert_reqs=maybe", "q", "job")
    assert "pw-hidden" not in str(info.value)


def _tls_files(tmp: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl binary."""
    files = {n: tmp / f"{n}.pem" for n in ("ca", "ca-key", "cert", "key")}
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=tmp)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=optagent-test-ca",
        "-keyout", str(files["ca-key"]), "-out", str(files["ca"]))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(files["key"]),
        "-out", str(tmp / "req.csr"))
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(tmp / "req.csr"), "-CA", str(files["ca"]), "-CAkey", str(files["ca-key"]),
        "-CAcreateserial", "-days", "1", "-extfile", str(tmp / "ext.cnf"), "-out", str(files["cert"]))
    return files


def test_tls_and_password_work_and_stay_hidden(worker_pool: Any, tmp_path: Path) -> None:
    import shutil

    from conftest import _stop_group, _wait, free_port, start_redis

    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("needs the openssl and redis-server binaries")
    password = "pw-" + uuid.uuid4().hex[:12]
    tls = _tls_files(tmp_path)
    port = free_port()
    server, _ = start_redis(tmp_path, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls["cert"]),
                            "--tls-key-file", str(tls["key"]), "--tls-ca-cert-file", str(tls["ca"]),
                            "--tls-auth-clients", "no", "--requirepass", password)
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={tls['ca']}"
    assert password not in redact_url(url)
    try:
        _wait(lambda: CeleryExecutor(url, "q", "probe").close() is None, 15, "TLS redis")
        worker_pool.broker = url
        worker_pool.start(1)
        ex = CeleryExecutor(url, worker_pool.queue, f"tls{uuid.uuid4().hex[:6]}", secret=None)
        try:
            ex.submit(1, payload(write_model(tmp_path), 1))
            outcomes = poll_all(ex, 1, 300)
        finally:
            ex.close()
        assert outcomes and outcomes[0].result["state"] == "complete", outcomes
        assert password not in worker_pool.logs()
        assert ":***@" in worker_pool.logs()  # the banner names the broker, masked
    finally:
        worker_pool.stop()
        _stop_group(server)


def test_signature_and_redaction_units() -> None:
    from optagent.security import RedactingFilter, secrets_in, signature_problem, verify_payload

    body = {"trial": 1, "model": {"source_b64": "eA=="}, "params": {"prune": {"amount": 0.5}}}
    signed = sign_payload(body, "k1")
    assert verify_payload(signed, "k1") and not verify_payload(signed, "k2")
    assert verify_payload(dict(reversed(list(signed.items()))), "k1")  # key order does not matter
    tampered = {**signed, "params": {"prune": {"amount": 0.9}}}
    assert "altered" in (signature_problem(tampered, "k1") or "")
    assert "unsigned" in (signature_problem(body, "k1") or "")
    url = "rediss://user:p%40ss@host:6380/2?ssl_cert_reqs=required&password=q"
    assert redact_url(url) == "rediss://user:***@host:6380/2?ssl_cert_reqs=required&password=***"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_url("redis://:pw@host:bad/0") in ("***", "redis://:***@host:bad/0")
    filt = RedactingFilter(secrets_in(url) + ["k1-secret"])
    assert filt.redact("connect rediss://user:p%40ss@host with k1-secret") == "connect rediss://user:***@host with ***"
