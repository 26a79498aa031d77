"""Run trials on Celery workers over Redis, with deterministic task ids and resume after a coordinator crash.

Trial `number` of job `job_key` is always task `optagent-{job_key}-{number}`. That makes submission
idempotent across coordinator restarts: `submit` sends a trial only if no one sent it before (an atomic
`SET NX` on its *sent* key, which lasts as long as results do). After a crash the coordinator builds a new
executor and calls `submit` again for every trial it had in flight; each is then

1. delivered by the next `poll` if its result is already in the result backend,
2. left alone (not re-sent) if it was sent earlier and is still queued or running,
3. sent otherwise (the message or its bookkeeping was lost).

Each number is reported at most once per executor; Redis redeliveries of the same task id share one
result key, so a trial killed mid-run and run again still yields one outcome.

A lost broker (a Redis restart, a failover, a network blip) is ridden out: the executor logs one line, keeps
new trials in memory, retries with backoff for `broker_retry_s` seconds, logs one line when Redis is back,
and then reconciles every trial in flight through the same `submit` path a resume uses (above). Only when
the broker stays away longer does it raise `BrokerLost`, which ends the job `interrupted`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optagent.contract import sha256_bytes
from optagent.errors import UserError
from optagent.executors._base import Outcome
from optagent.protocol import TrialResult
from optagent.security import redact_url, secret_from_env, sign_payload

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)
_UNSET: Any = object()
_READY = {"SUCCESS", "FAILURE", "REVOKED"}


# submit in one round trip: clear a cancel mark, see whether a result is stored, claim the sent marker.
# KEYS: cancelled, result meta, sent; ARGV: sent ttl. Returns {cleared cancel mark, result or false, claimed}.
_SUBMIT = """
local cleared = redis.call('DEL', KEYS[1])
local meta = redis.call('GET', KEYS[2])
local claimed = 0
if not meta and redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[1])) then claimed = 1 end
return {cleared, meta or false, claimed}
"""


def task_id(job_key: str, number: int | str) -> str:
    """The one task id trial `number` of a job ever has."""
    return f"optagent-{job_key}-{number}"


class BrokerLost(Exception):
    """The broker stayed unreachable past `broker_retry_s`. The job stops `interrupted` (the coordinator reads
    `resumable`); the trials on the workers keep their results in Redis for `optagent resume`."""

    resumable = True


class CeleryExecutor:
    """The Executor protocol on Celery: payloads go to `queue` signed, results come back from Redis."""

    def __init__(self, broker_url: str, queue: str, job_key: str, *, capacity: int | None = None,
                 secret: str | None = _UNSET, max_attempts: int = 3, soft_time_limit: float | None = None,
                 time_limit: float | None = None, app: Celery | None = None, broker_retry_s: float = 120.0,
                 job_name: str | None = None):
        from optagent.workers.celery_app import broker_errors, keys, make_app, time_limits

        if not job_key or any(c in job_key for c in " :*?[]"):
            raise UserError(f"job key {job_key!r} must be non-empty without spaces, ':' or glob characters")
        self.queue, self.job_key, self.max_attempts = queue, job_key, max_attempts
        self.broker_retry_s, self.job_name = float(broker_retry_s), job_name or job_key
        self._errors = broker_errors()
        self._lost_at: float | None = None  # monotonic time the broker was lost, None while it answers
        self._retry_at, self._backoff = 0.0, 0.5
        self._unsent: set[int] = set()  # pending trials whose message surely never reached Redis
        self.secret: str | None = secret_from_env() if secret is _UNSET else secret
        self.app = app or make_app(broker_url)
        self._url = redact_url(broker_url)
        self._limits = time_limits(soft_time_limit, time_limit)
        self._keys = keys
        self._fixed_capacity = capacity
        self._capacity_at = (0.0, 1)
        self._redis = self.app.backend.client
        # Celery's send_task subscribes its own result consumer to every task's result channel (a SUBSCRIBE
        # and, later, an UNSUBSCRIBE per trial); this executor reads results through one pattern
        # subscription per job and MGET instead, so that consumer is switched off for this app alone.
        self.app.backend.on_task_call = lambda producer, task_id: None
        self._submit_script = self._redis.register_script(_SUBMIT)
        self._pubsub: Any = None
        self._pending: dict[int, str] = {}  # number -> task id, not yet reported
        self._reported: set[int] = set()
        self._sources: dict[str, tuple[str, str]] = {}  # path -> (source_b64, sha256)
        self._messages: dict[int, tuple[dict[str, Any], float, float]] = {}  # number -> (message, soft, hard)
        self._orphans: dict[int, float] = {}  # number -> when first seen started, unleased and not queued
        self._rescued_at = 0.0
        self._check_broker()

    # -- the Executor protocol ------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Live pool processes on the queue plus one queued spare, so a freed worker never waits."""
        if self._fixed_capacity:
            return self._fixed_capacity
        at, value = self._capacity_at
        if time.monotonic() - at > 5 and self._lost_at is None:
            try:
                value = self.workers() + 1
            except self._errors as exc:
                self._lose(exc)  # keep the last known value meanwhile
            self._capacity_at = (time.monotonic(), value)
        return value

    def submit(self, number: int, payload: dict[str, Any]) -> None:
        if number in self._pending or number in self._reported:
            return
        message = self._prepare(number, payload)
        self._pending[number] = task_id(self.job_key, number)
        self._messages[number] = (message, *self._limits_for(payload))
        if self._lost_at is not None:  # kept until the broker is back; the reconciliation sends it
            self._unsent.add(number)
            return
        try:
            self._dispatch(number)
        except self._errors as exc:
            self._lose(exc)

    def _dispatch(self, number: int) -> None:
        """Make sure trial `number` is out there exactly once: delivered from a stored result, left alone if
        it was sent before, sent otherwise (one Lua round trip, then the send). `submit` and the
        reconciliation after a lost broker both come here, as a resumed coordinator's submits do."""
        tid = self._pending[number]
        k = self._keys(tid)
        if number in self._unsent:  # a send that failed may have claimed the marker before the broker went
            self._redis.delete(k["sent"])
        self._subscribe()  # before looking for a stored result, so a result published meanwhile wakes poll
        cleared, meta, claimed = self._submit_script(
            keys=[k["cancelled"], self.app.backend.get_key_for_task(tid), k["sent"]],
            args=[int(self.app.conf.result_expires)])
        if cleared:
            log.info("job %s was cancelled on the workers before; submitting to it again resumes it", self.job_key)
        if meta and self._ready_meta(meta) is not None:
            self._unsent.discard(number)
            return  # finished while no coordinator listened: the next poll delivers it
        if not claimed:  # sent before (queued or running), or a stored state that is not final: it is out there
            self._unsent.discard(number)
            log.debug("trial %s was sent before (queued or running); not sending it again", number)
            return
        self._unsent.add(number)
        try:
            self._send(number)
        except self._errors:
            raise
        except Exception as exc:
            self._redis.delete(k["sent"])
            self._pending.pop(number, None)
            self._messages.pop(number, None)
            self._unsent.discard(number)
            raise UserError(f"cannot send trial {number} to {self._url}: {type(exc).__name__}; "
                            "check that Redis is running and the URL is right") from exc
        self._unsent.discard(number)

    # -- a lost broker -------------------------------------------------------------------------------------
    def _lose(self, exc: BaseException) -> None:
        """The broker stopped answering: say so once, and start retrying (BrokerLost past the limit)."""
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at, self._backoff, self._retry_at = now, 0.5, now + 0.5
            log.warning("lost the broker at %s (%s); retrying for up to %.0f s (--broker-retry-s); trials on the "
                        "workers go on", self._url, type(exc).__name__, self.broker_retry_s)
            self._drop_pubsub()
        self._give_up_if_late()

    def _give_up_if_late(self) -> None:
        if self._lost_at is not None and time.monotonic() - self._lost_at >= self.broker_retry_s:
            raise BrokerLost(f"the broker at {self._url} was unreachable for more than {self.broker_retry_s:.0f} s "
                             f"(--broker-retry-s); once Redis is back, `optagent resume {self.job_name}` continues "
                             "the job (trials finished meanwhile are kept)")

    def _reconnect(self, wait: float) -> bool:
        """Try the broker again when the backoff allows (sleeping at most `wait`); on success, reconcile."""
        assert self._lost_at is not None
        pause = self._retry_at - time.monotonic()
        if pause > 0:
            time.sleep(min(pause, max(0.0, wait)))
            self._give_up_if_late()
            if time.monotonic() < self._retry_at:
                return False
        try:
            self._redis.ping()
        except self._errors:
            self._backoff = min(self._backoff * 2, 5.0)
            self._retry_at = time.monotonic() + self._backoff
            self._give_up_if_late()
            return False
        lost_for = time.monotonic() - self._lost_at
        self._lost_at = None
        log.warning("the broker at %s is back after %.0f s; reconciling %d trial(s) in flight", self._url, lost_for,
                    len(self._pending))
        try:
            for number in sorted(self._pending):
                self._dispatch(number)
        except self._errors as exc:
            self._lose(exc)
            return False
        return True

    def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                self._pubsub.close()
            self._pubsub = None

    def poll(self, timeout: float) -> list[Outcome]:
        """Results stored since the last poll (one MGET), else the first ones published within `timeout`:
        the backend publishes each result's state on its key, so a published result is reported from the
        message itself, without another round trip. While the broker is lost: nothing, after a retry."""
        if self._lost_at is not None and not self._reconnect(timeout):
            return []
        try:
            return self._poll(timeout)
        except self._errors as exc:
            self._lose(exc)
            return []

    def _poll(self, timeout: float) -> list[Outcome]:
        deadline = time.monotonic() + max(0.0, timeout)
        self._rescue()
        outcomes = self._collect()
        while not outcomes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if not self._pending:
                time.sleep(remaining)
                return []
            self._subscribe()
            message = self._pubsub.get_message(timeout=min(remaining, 1.0))
            while message is not None:
                outcomes += self._published(message)
                message = self._pubsub.get_message(timeout=0)
        return outcomes

    def in_flight(self) -> set[int]:
        return set(self._pending)

    def cancel(self) -> None:
        """Drop queued trials of this job everywhere, kill running ones; nothing more is reported."""
        try:
            self.revoke(self._pending)
        except self._errors as exc:  # the job ends anyway; its queued trials then run to no one
            log.warning("could not mark the job cancelled on the workers: the broker at %s is unreachable (%s)",
                        self._url, type(exc).__name__)
        self._pending.clear()
        self._messages.clear()
        self._unsent.clear()

    def revoke(self, numbers: Iterable[int]) -> None:
        """Cancel the job on the workers (also usable by `optagent cancel` when no coordinator runs).

        Marks the whole job cancelled in Redis: a worker drops any queued trial of the job unrun (even
        one that was offline meanwhile), and a running trial's heartbeat kills its own process within
        a few seconds. Celery's revoke is not used: it remembers task ids in worker memory, and these
        ids are deterministic, so a resumed job could never run them again. The trials' sent markers are
        cleared, so a later `submit` of the same numbers (a resumed job) sends them afresh.
        """
        k = self._keys(task_id(self.job_key, 0))
        self._redis.set(k["cancelled"], "1", ex=int(self.app.conf.result_expires))
        sent = [self._keys(task_id(self.job_key, n))["sent"] for n in numbers]
        if sent:
            self._redis.delete(*sent)

    def close(self) -> None:
        self._drop_pubsub()
        with contextlib.suppress(Exception):  # a lost broker must not hide why the job ended
            self.app.close()

    # -- helpers ----------------------------------------------------------------------------------------
    def workers(self) -> int:
        """Pool processes that announced themselves on this queue in the last minute."""
        from optagent.workers.celery_app import LEASE_TTL_S, workers_key

        return int(self._redis.zcount(workers_key(self.queue), time.time() - 3 * LEASE_TTL_S, "+inf"))

    def _send(self, number: int) -> None:
        message, soft, hard = self._messages[number]
        # argsrepr: the message headers name the trial instead of carrying a repr of the payload (the model's
        # source), which monitoring tools show and which Celery would build for every trial
        self.app.send_task("optagent.run_trial", args=[message], task_id=self._pending[number], queue=self.queue,
                           soft_time_limit=soft, time_limit=hard, argsrepr=f"(trial {number} of {self.job_key})",
                           kwargsrepr="{}")

    def _rescue(self) -> None:
        """Re-send trials whose worker *host* died mid-trial.

        A killed pool child is requeued by its parent at once, but when the whole worker dies (machine
        lost, pod SIGKILLed) its message sits unacknowledged until the visibility timeout (hours). A
        trial that has started, holds no lease (its heartbeat stopped), has no result and is not in
        the queue is such an orphan; after a grace period it is sent again under the same task id.
        The late original, once Redis restores it, finds the stored result and does not run again.
        """
        from optagent.workers.celery_app import HEARTBEAT_S

        now = time.monotonic()
        if not self._pending or now - self._rescued_at < HEARTBEAT_S:
            return
        self._rescued_at = now
        numbers = list(self._pending)
        pipe = self._redis.pipeline(transaction=False)
        for n in numbers:
            k = self._keys(self._pending[n])
            pipe.exists(k["attempts"]).exists(k["lease"])
        flags = pipe.execute()
        suspects = [n for i, n in enumerate(numbers) if flags[2 * i] and not flags[2 * i + 1]]
        self._orphans = {n: t for n, t in self._orphans.items() if n in suspects}
        if not suspects:
            return
        queued = self._queued_ids()
        for n in suspects:
            if self._pending[n] in queued or n not in self._messages:
                self._orphans.pop(n, None)
                continue
            first = self._orphans.setdefault(n, now)
            if now - first >= 2 * HEARTBEAT_S and self._meta(self._pending[n]) is None:
                log.warning("trial %s lost its worker mid-trial (no heartbeat); sending it again", n)
                self._send(n)
                self._orphans.pop(n)

    def _queued_ids(self) -> set[str]:
        """Task ids waiting in this queue's Redis list (Celery's message headers)."""
        ids = set()
        for raw in self._redis.lrange(self.queue, 0, -1):
            try:
                ids.add(json.loads(raw)["headers"]["id"])
            except (ValueError, KeyError, TypeError):
                continue
        return ids

    def _check_broker(self) -> None:
        try:
            self._redis.ping()
        except Exception as exc:
            raise UserError(f"cannot reach the broker at {self._url} ({type(exc).__name__}); start Redis or "
                            "fix --broker / OPTAGENT_BROKER_URL") from None
        if self.broker_retry_s < 0:
            raise UserError(f"--broker-retry-s must be zero or more seconds (got {self.broker_retry_s:g})")

    def _prepare(self, number: int, payload: dict[str, Any]) -> dict[str, Any]:
        """The message: the payload with the model's source inlined, the attempt bound, then signed."""
        message = dict(payload, trial=number)
        message.setdefault("max_attempts", self.max_attempts)
        model = dict(message["model"])
        if not model.get("source_b64"):
            model["source_b64"], digest = self._source(model["path"])
            if model.setdefault("sha256", digest) != digest:
                raise UserError(f"model file {model['path']} changed since the job started (hash mismatch); "
                                "restore it or start a new job")
        message["model"] = model
        return sign_payload(message, self.secret) if self.secret else message

    def _source(self, path: str) -> tuple[str, str]:
        if path not in self._sources:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise UserError(f"cannot read model file {path} ({exc.strerror}); it must stay readable "
                                "by the coordinator while the job runs") from None
            self._sources[path] = (base64.b64encode(data).decode(), sha256_bytes(data))
        return self._sources[path]

    def _limits_for(self, payload: dict[str, Any]) -> tuple[float, float]:
        from optagent.workers.celery_app import time_limits

        hard = payload.get("time_limit_s")
        return time_limits(None, hard) if hard else self._limits

    def _subscribe(self) -> None:
        """One pattern subscription for all of this job's result keys (the backend publishes each result)."""
        if self._pubsub is None:
            self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub.psubscribe(self.app.backend.get_key_for_task(task_id(self.job_key, "*")))

    def _meta(self, tid: str) -> dict[str, Any] | None:
        raw = self._redis.get(self.app.backend.get_key_for_task(tid))
        return self._ready_meta(raw)

    def _ready_meta(self, raw: bytes | str | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        meta = self.app.backend.decode(raw)
        return meta if meta.get("status") in _READY else None

    def _collect(self) -> list[Outcome]:
        """Every pending trial whose result is stored (one MGET)."""
        if not self._pending:
            return []
        numbers = list(self._pending)
        raws = self._redis.mget([self.app.backend.get_key_for_task(self._pending[n]) for n in numbers])
        return [self._report(n, meta) for n, meta in zip(numbers, map(self._ready_meta, raws), strict=True) if meta]

    def _published(self, message: dict[str, Any]) -> list[Outcome]:
        """The outcome a pattern-subscription message carries, if it is a final state of a pending trial."""
        channel = message.get("channel")
        channel = channel.encode() if isinstance(channel, str) else channel  # result keys are bytes
        number = next((n for n, tid in self._pending.items()
                       if self.app.backend.get_key_for_task(tid) == channel), None)
        meta = self._ready_meta(message.get("data")) if number is not None else None
        return [self._report(number, meta)] if number is not None and meta is not None else []

    def _report(self, number: int, meta: dict[str, Any]) -> Outcome:
        from optagent.executors.local import finite_metrics

        self._pending.pop(number)
        self._messages.pop(number, None)
        self._reported.add(number)
        return Outcome(number, finite_metrics(self._to_result(number, meta)))

    @staticmethod
    def _to_result(number: int, meta: dict[str, Any]) -> dict[str, Any]:
        """A stored task state as a result dict; Celery-level failures become failed results with a reason."""
        result = meta.get("result")
        if meta["status"] == "SUCCESS" and isinstance(result, dict):
            return {**result, "trial": number}
        if meta["status"] == "REVOKED":
            return _failed(number, "trial was revoked on the workers")
        exc = result if isinstance(result, dict) else {}
        kind, message = exc.get("exc_type", "error"), exc.get("exc_message", result)
        if kind == "TimeLimitExceeded":
            return _failed(number, f"trial exceeded its hard time limit ({message} s); the worker killed it")
        if kind == "WorkerLostError":
            return _failed(number, f"the worker running the trial died: {message}")
        return _failed(number, f"worker task failed: {kind}: {message}")


def _failed(number: int, reason: str) -> dict[str, Any]:
    return TrialResult.failed(number, reason, worker={}).to_json()
