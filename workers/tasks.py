"""The one Celery task: run a trial payload with `optagent.trial.run_trial` and return its result JSON.

The trial runs in the prefork pool child itself. If the child dies (SIGKILL, OOM killer, a segfault in a
kernel), late acknowledgement plus reject-on-worker-lost put the message back on the queue and another
worker runs the same trial (same task id). Around that the task adds what Celery does not:

- payload authentication: with OPTAGENT_SECRET set on the worker, an unsigned or altered payload is not
  run; the reason is logged and returned as a *failed result* (so the coordinator records why instead of
  waiting forever; an attacker who can write to Redis could forge results anyway, but never run code);
- a poison-pill bound: attempts are counted per task id in Redis; once a trial has killed its worker
  `max_attempts` times (payload, default 3) it comes back failed instead of running again;
- a lease with a heartbeat, so a duplicate delivery of a trial that is running or finished elsewhere
  waits for (or reuses) that result rather than running twice;
- job cancellation: a trial of a cancelled job is dropped unrun (no result).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import asdict
from typing import Any

from celery import Task, shared_task
from celery import signals as celery_signals
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from optagent.protocol import WorkerInfo, failed_json
from optagent.security import RedactingFilter, secret_from_env, secrets_in, signature_problem
from optagent.workers.celery_app import HEARTBEAT_S, LEASE_TTL_S, RESULT_EXPIRES_S, TASK_NAME, keys, workers_key

log = logging.getLogger("optagent.worker")
DEFAULT_MAX_ATTEMPTS = 3


def _owner() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid()})


def _owner_dead(raw: bytes | str) -> bool:
    """True when a lease belongs to a process on this host that no longer exists."""
    try:
        owner = json.loads(raw)
        if owner["host"] != socket.gethostname():
            return False
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, PermissionError):
        return False
    return False


class _Lease:
    """A running trial's lease, kept alive by a heartbeat thread (it lapses LEASE_TTL_S after this process
    dies). The heartbeat also ends the trial if its job is cancelled: killing this pool process is the only
    way to stop arbitrary model code; the redelivered message then finds the job cancelled and is dropped.

    It is released on `task_postrun`, which Celery sends after it stored the result (or the failure) and
    also when storing failed: a duplicate delivery then finds the result, never a free lease with no
    result yet, and the release is off the path between the trial's end and its published result."""

    def __init__(self, redis: Any, k: dict[str, str], owner: str):
        self.redis, self.k, self.owner = redis, k, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="optagent-lease", daemon=True)

    def start(self) -> _Lease:
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a Redis blip must not kill the trial
                if not _script(self.redis, _REFRESH)(keys=[self.k["lease"]], args=[self.owner, LEASE_TTL_S]):
                    log.warning("lost the lease of the running trial to another process")
                if self.redis.exists(self.k["cancelled"]):
                    log.warning("job cancelled: stopping the trial by ending its process")
                    self.redis.decr(self.k["attempts"])  # a cancelled attempt is not a crash
                    self.redis.delete(self.k["lease"])
                    os.kill(os.getpid(), signal.SIGKILL)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        with contextlib.suppress(Exception):
            _script(self.redis, _RELEASE)(keys=[self.k["lease"]], args=[self.owner])


_held: _Lease | None = None  # the lease of the trial this pool process is running (one at a time)


def _release_held(sender: Any = None, **_: Any) -> None:
    """task_postrun: Celery has stored the result (or failed to): now the lease can go."""
    global _held
    if getattr(sender, "name", None) != TASK_NAME:
        return
    lease, _held = _held, None
    if lease is not None:
        lease.release()


# One round trip for the common case of a first delivery: not cancelled, no stored result, lease free.
# KEYS: cancelled, result meta, lease, attempts; ARGV: owner, lease ttl, attempts ttl.
_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'cancelled'} end
local meta = redis.call('GET', KEYS[2])
if meta then return {'stored', meta} end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then
  local n = redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[3]))
  return {'leased', n}
end
return {'busy'}
"""
# refresh the lease if this process still holds it, or take it back if it lapsed while no one else took it (a
# broker restart longer than the lease's TTL) (KEYS: lease; ARGV: owner, ttl)
_REFRESH = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or not holder then return redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2])) end
return false
"""
# release the lease only if this process still holds it (KEYS: lease; ARGV: owner)
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


_SCRIPTS: dict[tuple[int, str], Any] = {}


def _script(redis: Any, source: str) -> Any:
    """The script registered once per Redis client (sent by SHA after the first call)."""
    key = (id(redis), source)
    if key not in _SCRIPTS:
        _SCRIPTS[key] = redis.register_script(source)
    return _SCRIPTS[key]


def _begin(task: Task, redis: Any, k: dict[str, str], owner: str) -> tuple[str, Any]:
    """('cancelled' | 'stored' | 'leased' | 'busy', detail) in one Redis call (a Lua script)."""
    meta_key = task.backend.get_key_for_task(task.request.id)
    reply = _script(redis, _BEGIN)(keys=[k["cancelled"], meta_key, k["lease"], k["attempts"]],
                                   args=[owner, LEASE_TTL_S, RESULT_EXPIRES_S])
    kind = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if kind == "stored":
        return kind, _success_result(task.backend.decode(reply[1]))
    return kind, (int(reply[1]) if kind == "leased" else None)


def _success_result(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The result of a stored task state if it is a successful trial result."""
    return meta["result"] if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict) else None


def _stored_result(task: Task, task_id: str) -> dict[str, Any] | None:
    return _success_result(task.backend.get_task_meta(task_id))


def _acquire_lease(task: Task, redis: Any, k: dict[str, str], owner: str) -> dict[str, Any] | None:
    """Take the trial's lease; returns a stored result instead when another delivery finished it."""
    while True:
        if redis.set(k["lease"], owner, nx=True, ex=LEASE_TTL_S):
            return None
        current = redis.get(k["lease"])
        if current is not None and _owner_dead(current):
            log.warning("trial %s: taking over the lease of dead process %s", task.request.id, current)
            redis.set(k["lease"], owner, ex=LEASE_TTL_S)
            return None
        done = _stored_result(task, task.request.id)
        if done is not None:
            return done
        if redis.exists(k["cancelled"]):
            raise Ignore()
        time.sleep(HEARTBEAT_S / 2)


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=False)
def run_trial(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one trial payload (plain JSON in, plain JSON out); see the module docstring for the guards."""
    task_id: str = self.request.id
    number = int(payload.get("trial", -1))
    secret = secret_from_env()
    if secret:
        problem = signature_problem(payload, secret)
        if problem:
            log.error("refused trial %s (task %s): %s", number, task_id, problem)
            return failed_json(payload, f"worker refused the payload: {problem}")
    redis = self.backend.client
    k = keys(task_id)
    owner = _owner()
    kind, detail = _begin(self, redis, k, owner)
    if kind == "cancelled":
        log.info("trial %s dropped: its job was cancelled", number)
        raise Ignore()
    if kind == "stored" and detail is not None:
        log.info("trial %s already has a result; not running it again", number)
        return detail
    if kind == "leased":
        attempt = int(detail)
    else:  # another delivery holds the lease (or left a non-success state): the careful path
        done = _acquire_lease(self, redis, k, owner)
        if done is not None:
            return done
        attempt = int(redis.incr(k["attempts"]))
        redis.expire(k["attempts"], RESULT_EXPIRES_S)
    limit = int(payload.get("max_attempts") or DEFAULT_MAX_ATTEMPTS)
    if attempt > limit:
        redis.delete(k["lease"])
        reason = f"trial killed its worker {attempt - 1} times; not retried after {limit} attempts"
        log.error("trial %s: %s", number, reason)
        return failed_json(payload, reason, worker=asdict(WorkerInfo.here(attempt)))
    log.info("trial %s: attempt %d of %d", number, attempt, limit)
    from optagent.trial.entry import run_trial as run  # torch stays out of the worker's parent process

    global _held
    if _held is not None:  # pragma: no cover - an earlier task ended without after_return
        _held.release()
    _held = _Lease(redis, k, owner).start()  # released on task_postrun, once the result is stored
    try:
        result = run({**payload, "attempt": attempt})
    except SoftTimeLimitExceeded:  # raised outside the pipeline's own handler
        result = failed_json(payload, "trial exceeded its soft time limit", worker=asdict(WorkerInfo.here(attempt)))
    if str(result.get("failure_reason") or "").startswith("SoftTimeLimitExceeded"):
        limit_s = self.request.timelimit[1] if self.request.timelimit else None
        result["failure_reason"] = f"trial exceeded its soft time limit{f' of {limit_s:.0f} s' if limit_s else ''}"
    return result


# -- worker process hooks ------------------------------------------------------------------------------
def _redact_handlers(**_: Any) -> None:
    """Mask the broker password and OPTAGENT_SECRET in everything the worker logs."""
    secrets = secrets_in(os.environ.get("OPTAGENT_BROKER_URL")) + [secret_from_env() or ""]
    filt = RedactingFilter(secrets)
    for logger in (logging.getLogger(), logging.getLogger("celery")):
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(filt)


celery_signals.task_postrun.connect(_release_held, weak=False)
celery_signals.after_setup_logger.connect(_redact_handlers, weak=False)
celery_signals.after_setup_task_logger.connect(_redact_handlers, weak=False)


@celery_signals.worker_process_init.connect(weak=False)
def _advertise(**_: Any) -> None:
    """Each pool process announces itself per queue so the coordinator can size its in-flight window."""
    from optagent.workers import celery_app

    queues = [q for q in os.environ.get("OPTAGENT_WORKER_QUEUES", "").split(",") if q]
    if not queues:
        return
    member = f"{socket.gethostname()}:{os.getpid()}"
    client = celery_app.app.backend.client

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):
                now = time.time()
                for q in queues:
                    client.zadd(workers_key(q), {member: now})
                    client.zremrangebyscore(workers_key(q), 0, now - 3 * LEASE_TTL_S)
            time.sleep(LEASE_TTL_S / 2)

    threading.Thread(target=beat, name="optagent-advertise", daemon=True).start()
