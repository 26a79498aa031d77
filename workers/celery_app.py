"""The Celery application and its configuration for long, crash-prone trials (no task logic here).

Settings follow the lessons in PRODUCT.md: JSON only; late acks plus reject-on-worker-lost so a
SIGKILLed pool child puts its trial back on the queue (celery #1628); prefetch of one; and time limits
kept below the Redis visibility timeout, which is set identically for the broker and the result
backend, otherwise Redis hands a still-running trial to a second worker (celery #5306, #5935).

`make_app(url)` builds an app for a broker URL; `app` (module attribute, built on first access from
OPTAGENT_BROKER_URL) is the entry point for `celery -A optagent.workers.celery_app worker`.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from optagent.errors import UserError
from optagent.security import redact_url

if TYPE_CHECKING:
    from celery import Celery

TASK_NAME = "optagent.run_trial"
DEFAULT_QUEUE = "optagent"
RESULT_EXPIRES_S = 7 * 24 * 3600
DEFAULT_VISIBILITY_TIMEOUT_S = 12 * 3600
LIMIT_MARGIN_S = 60  # a hard limit must end a trial this long before Redis would redeliver it
HEARTBEAT_S = 5.0  # a running trial refreshes its lease this often...
LEASE_TTL_S = 20  # ...and the lease lapses this long after its worker died

_SSL_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "cert_required": ssl.CERT_REQUIRED,
              "optional": ssl.CERT_OPTIONAL, "cert_optional": ssl.CERT_OPTIONAL,
              "none": ssl.CERT_NONE, "cert_none": ssl.CERT_NONE}


def visibility_timeout() -> int:
    """Seconds Redis waits before redelivering an unacknowledged trial (OPTAGENT_VISIBILITY_TIMEOUT).

    It must be the same on the coordinator and on every worker, and above every trial's hard limit.
    """
    raw = os.environ.get("OPTAGENT_VISIBILITY_TIMEOUT")
    try:
        value = int(raw) if raw else DEFAULT_VISIBILITY_TIMEOUT_S
    except ValueError:
        raise UserError(f"OPTAGENT_VISIBILITY_TIMEOUT={raw!r} is not a whole number of seconds; "
                        "set it to e.g. 43200 (12 h) on the coordinator and every worker") from None
    if value <= 2 * LIMIT_MARGIN_S:
        raise UserError(f"OPTAGENT_VISIBILITY_TIMEOUT={value} is too short; use more than {2 * LIMIT_MARGIN_S} s")
    return value


def time_limits(soft: float | None, hard: float | None, vt: int | None = None) -> tuple[float, float]:
    """(soft, hard) seconds for one trial: defaults fill gaps; the hard limit must stay below `vt`."""
    vt = vt or visibility_timeout()
    ceiling = vt - LIMIT_MARGIN_S
    hard = float(hard) if hard else (float(soft) + LIMIT_MARGIN_S if soft else ceiling / 2)
    if hard > ceiling:
        raise UserError(f"trial time limit {hard:.0f} s is not below the Redis visibility timeout ({vt} s) "
                        f"minus {LIMIT_MARGIN_S} s; lower the limit or raise OPTAGENT_VISIBILITY_TIMEOUT "
                        "on the coordinator and every worker")
    soft = float(soft) if soft else max(hard - min(300.0, hard / 10), hard * 0.9)
    if soft >= hard:
        raise UserError(f"soft time limit {soft:.0f} s must be below the hard limit {hard:.0f} s")
    return soft, hard


@dataclass(frozen=True)
class BrokerUrl:
    """A Redis URL split into what Celery needs: the URL without TLS query options, and those options."""

    url: str
    ssl: dict[str, Any] | None

    @classmethod
    def parse(cls, raw: str) -> BrokerUrl:
        fix = "pass redis://[:PASSWORD@]HOST:PORT/DB or rediss://... (TLS) with --broker or OPTAGENT_BROKER_URL"
        try:
            parts = urlsplit(raw.strip())
            _ = parts.port  # raises on a bad port
        except ValueError:
            raise UserError(f"cannot parse the broker URL {redact_url(raw)}; {fix}") from None
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise UserError(f"unsupported broker URL {redact_url(raw)}; {fix}")
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise UserError(f"broker URL {redact_url(raw)} has a database {parts.path!r} that is not a number; {fix}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        options = {k: v for k, v in query if k in _SSL_KEYS}
        if parts.scheme == "redis":
            if options:
                raise UserError(f"broker URL {redact_url(raw)} has TLS options but the redis:// scheme; "
                                "use rediss:// for TLS")
            return cls(raw.strip(), None)
        reqs = options.pop("ssl_cert_reqs", "required").lower()
        if reqs not in _CERT_REQS:
            raise UserError(f"ssl_cert_reqs={reqs!r} in the broker URL is not one of required, optional, none")
        tls: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[reqs], **options}
        rest = urlencode([(k, v) for k, v in query if k not in _SSL_KEYS])
        return cls(urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), tls)


def make_app(broker_url: str, *, result_expires: int = RESULT_EXPIRES_S, vt: int | None = None) -> Celery:
    """A Celery app whose broker and result backend are the same Redis, configured for long trials."""
    from celery import Celery

    broker = BrokerUrl.parse(broker_url)
    vt = vt or visibility_timeout()
    soft, hard = time_limits(None, None, vt)
    transport = {"visibility_timeout": vt, "socket_keepalive": True, "health_check_interval": 30}
    app = Celery("optagent", broker=broker.url, backend=broker.url, include=["optagent.workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # a trial over its hard limit is failed, not retried
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,  # a busy worker reserves nothing, so an idle one takes the next trial
        task_soft_time_limit=soft,
        task_time_limit=hard,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=result_expires,
        result_extended=False,
        task_default_queue=DEFAULT_QUEUE,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        # a lost broker (restart, failover) is waited for: `optagent worker` watches it and gives up after
        # --broker-retry-s; running trials go on meanwhile, and their results are stored once Redis is back
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        result_backend_max_sleep_between_retries_ms=5000,
        redis_socket_connect_timeout=5,
        redis_backend_health_check_interval=30,
        worker_hijack_root_logger=True,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    if broker.ssl:
        app.conf.broker_use_ssl = dict(broker.ssl)
        app.conf.redis_backend_use_ssl = dict(broker.ssl)
    return app


def broker_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the broker is not answering" (not "the broker refused this")."""
    import redis.exceptions as rex
    from kombu.exceptions import OperationalError

    return (rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, OperationalError, ConnectionError,
            TimeoutError)


def check_broker(broker_url: str) -> None:
    """A broker URL that parses and a Redis that answers, or UserError with the fix (nothing is sent)."""
    app = make_app(broker_url)
    try:
        app.backend.client.ping()
    except Exception as exc:
        raise UserError(f"cannot reach the broker at {redact_url(broker_url)} ({type(exc).__name__}); start "
                        "Redis there, or fix --broker / OPTAGENT_BROKER_URL (password, host, port, TLS)") from None
    finally:
        app.close()


def keys(task_id: str) -> dict[str, str]:
    """Redis keys the executor and the task share for one trial (prefixed by the deterministic task id).

    sent: set once by the executor when it sends (never re-sent while present; lasts as long as results);
    lease: held by the process running the trial, refreshed every HEARTBEAT_S;
    attempts: how many times a worker started it (the poison-pill counter);
    cancelled: set for the whole job by cancel(); queued copies are then dropped unrun.
    """
    job = task_id.rsplit("-", 1)[0]
    return {"sent": f"optagent:{task_id}:sent", "lease": f"optagent:{task_id}:lease",
            "attempts": f"optagent:{task_id}:attempts", "cancelled": f"optagent:{job}:cancelled"}


def workers_key(queue: str) -> str:
    """Sorted set of live pool processes consuming `queue` (member host:pid, score last heartbeat)."""
    return f"optagent:workers:{queue}"


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """`app`, built on first access from OPTAGENT_BROKER_URL (no broker is touched at import time)."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        url = os.environ.get("OPTAGENT_BROKER_URL")
        if not url:
            raise UserError("OPTAGENT_BROKER_URL is not set; export it (redis://HOST:6379/0) or use "
                            "`optagent worker --broker URL`")
        _app = make_app(url)
    return _app
