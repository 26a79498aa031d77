"""`optagent worker`: start Celery worker processes that run trials from a queue.

The command is a small supervisor. It validates the broker, then spawns one `celery worker` child per
GPU (pinned with CUDA_VISIBLE_DEVICES, one trial at a time) or one CPU child with `--concurrency`
pool processes. This parent never imports torch, so CUDA is never initialised before a fork. The broker
URL reaches the children through the environment, not argv, so `ps` never shows its password. If any
child exits, the others are stopped and the command exits non-zero, so systemd or Kubernetes restarts
the whole unit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Annotated, Any

import typer

from optagent.errors import UserError
from optagent.security import redact_url, secret_from_env


def _gpu_list(spec: str) -> list[str]:
    if spec.strip().lower() == "all":
        smi = shutil.which("nvidia-smi")
        if smi is None:
            raise UserError("--gpus all needs nvidia-smi to count GPUs; list them instead, e.g. --gpus 0,1")
        lines = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False).stdout.splitlines()
        found = [str(i) for i, line in enumerate(lines) if line.startswith("GPU")]
        if not found:
            raise UserError("nvidia-smi lists no GPUs; drop --gpus to run a CPU worker")
        return found
    gpus = [g.strip() for g in spec.split(",") if g.strip()]
    if not gpus or len(set(gpus)) != len(gpus) or not all(g.isdigit() or g.startswith("GPU-") for g in gpus):
        raise UserError(f"--gpus {spec!r} is not a list of distinct GPU indices; use e.g. --gpus 0,1")
    return gpus


class BrokerWatch:
    """The supervisor's view of the broker: one line when it is lost, one when it is back, and a verdict
    once it has been away longer than --broker-retry-s (Celery itself reconnects without limit)."""

    CHECK_EVERY_S = 5.0

    def __init__(self, broker: str, retry_s: float):
        self.broker, self.retry_s = broker, retry_s
        self._client: Any = None
        self._checked = 0.0
        self.lost_at: float | None = None

    def _ping(self) -> bool:
        from optagent.workers.celery_app import broker_errors, make_app

        try:
            if self._client is None:
                app = make_app(self.broker)
                self._client = app.backend.client
            return bool(self._client.ping())
        except broker_errors():
            return False

    def gone_too_long(self) -> bool:
        """Check now and then; True once the broker has been unreachable past the limit."""
        now = time.monotonic()
        if now - self._checked < self.CHECK_EVERY_S:
            return False
        self._checked = now
        if self._ping():
            if self.lost_at is not None:
                print(f"optagent worker: the broker is back after {now - self.lost_at:.0f} s", file=sys.stderr)
                self.lost_at = None
            return False
        if self.lost_at is None:
            self.lost_at = now
            print(f"optagent worker: lost the broker at {redact_url(self.broker)}; Celery reconnects, running "
                  f"trials go on; giving up after {self.retry_s:.0f} s (--broker-retry-s)", file=sys.stderr)
        return now - self.lost_at > self.retry_s


def _command(queue: str, concurrency: int, hostname: str, loglevel: str, max_tasks: int) -> list[str]:
    cmd = [sys.executable, "-m", "celery", "-A", "optagent.workers.celery_app", "worker", "-Q", queue,
           "-c", str(concurrency), "-P", "prefork", "-n", hostname, "--loglevel", loglevel, "-O", "fair",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if max_tasks > 0:
        cmd += ["--max-tasks-per-child", str(max_tasks)]
    return cmd


def worker(
    broker: Annotated[str | None, typer.Option(
        "--broker", envvar="OPTAGENT_BROKER_URL", show_envvar=True, show_default=False,
        help="Redis URL: redis://[:PASSWORD@]HOST:6379/0, or rediss://...?ssl_cert_reqs=required for TLS.")] = None,
    queue: Annotated[str, typer.Option("--queue", "-Q", help="Queue(s) to take trials from, comma-separated "
                                       "(route jobs to hardware pools, e.g. a100).")] = "optagent",
    gpus: Annotated[str | None, typer.Option("--gpus", help="GPU indices, one worker process each "
                                             "(e.g. 0,1 or all); omit for a CPU worker.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1,
                                             help="CPU trials at once (ignored with --gpus).")] = 1,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l", help="debug, info, warning or error.")] = "info",
    hostname: Annotated[str | None, typer.Option("--hostname", "-n", help="Worker node name "
                                                 "(default: optagent@HOST; gpuN-optagent@HOST per GPU).")] = None,
    max_tasks_per_child: Annotated[int | None, typer.Option(
        "--max-tasks-per-child", min=0, help="Replace a pool process after N trials (0 = never) "
        "(default: 1 with --gpus, so GPU memory is returned after each trial; else 0).")] = None,
    broker_retry_s: Annotated[float, typer.Option(
        "--broker-retry-s", help="How long a lost broker is waited for before the worker exits (non-zero, so "
        "its service manager restarts it).")] = 120.0,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Run unsigned payloads from a broker other hosts can reach (no OPTAGENT_SECRET): "
        "only on a network you trust.")] = False,
) -> None:
    """Run trials from a Redis queue on this machine: one process per GPU, or N CPU processes."""
    from optagent.job import is_queue_name
    from optagent.security import require_secret
    from optagent.workers.celery_app import BrokerUrl, check_broker

    if not broker:
        raise UserError("no broker given; pass --broker redis://HOST:6379/0 or set OPTAGENT_BROKER_URL")
    if loglevel.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise UserError(f"--loglevel {loglevel!r} is not one of debug, info, warning, error")
    queues = [q.strip() for q in queue.split(",") if q.strip()]
    bad = [q for q in queues if not is_queue_name(q)]
    if not queues or bad:
        raise UserError(f"--queue {queue!r} is not a comma-separated list of queue names; use letters, digits, "
                        "'.', '_' and '-', e.g. --queue gpu-a100,optagent")
    if not broker_retry_s >= 0:
        raise UserError(f"--broker-retry-s must be zero or more seconds (got {broker_retry_s})")
    BrokerUrl.parse(broker)
    require_secret(broker, insecure, "optagent worker")
    check_broker(broker)
    pinned = _gpu_list(gpus) if gpus else []
    max_tasks = max_tasks_per_child if max_tasks_per_child is not None else (1 if pinned else 0)
    base = hostname or "optagent@%h"
    env = {**os.environ, "OPTAGENT_BROKER_URL": broker, "OPTAGENT_WORKER_QUEUES": ",".join(queues)}
    children: list[tuple[str, list[str], dict[str, str]]] = []
    if pinned:
        for gpu in pinned:
            name = f"gpu{gpu}-{base}"
            children.append((name, _command(",".join(queues), 1, name, loglevel, max_tasks),
                             {**env, "CUDA_VISIBLE_DEVICES": gpu}))
    else:
        children.append((base, _command(",".join(queues), concurrency, base, loglevel, max_tasks), env))
    where = f"GPUs {','.join(pinned)}" if pinned else f"{concurrency} CPU process(es)"
    print(f"optagent worker: broker {redact_url(broker)}, queue {','.join(queues)}, {where}", file=sys.stderr)
    from optagent.registry import build_registry

    registry = build_registry()  # plugin load warnings are logged here, once, not in every trial
    print(f"optagent worker: strategies {', '.join(registry.strategies) or '(none)'}", file=sys.stderr)
    if not secret_from_env():
        print("optagent worker: OPTAGENT_SECRET is not set, so payloads are not authenticated; set the same "
              "secret on the coordinator and every worker", file=sys.stderr)
    code = _supervise(children, BrokerWatch(broker, broker_retry_s))
    if code:
        raise typer.Exit(code)


def _supervise(children: list[tuple[str, list[str], dict[str, str]]], watch: BrokerWatch | None = None) -> int:
    """Run the children until one exits, we are told to stop, or the broker stays away past its limit;
    forward SIGTERM/SIGINT to all of them."""
    procs = [subprocess.Popen(cmd, env=env) for _, cmd, env in children]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    gave_up = False
    try:
        while all(p.poll() is None for p in procs) and not stopping:
            if watch is not None and watch.gone_too_long():
                print(f"optagent worker: the broker stayed unreachable for more than {watch.retry_s:.0f} s "
                      "(--broker-retry-s); stopping, so the service manager restarts the worker", file=sys.stderr)
                gave_up = True
                break
            time.sleep(0.2)
        if gave_up:
            stop(signal.SIGTERM, None)
            stopping = False
        elif not stopping:  # one child died on its own: take the rest down so the unit restarts cleanly
            for (name, _, _), p in zip(children, procs, strict=True):
                if p.returncode is not None:
                    print(f"optagent worker: {name} exited with code {p.returncode}; stopping", file=sys.stderr)
            stop(signal.SIGTERM, None)
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    if gave_up:
        return 1
    return 0 if stopping and all(c in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else max(1, *codes)


def main() -> None:
    """`python -m optagent.cli.worker`: the same command without the rest of the CLI."""
    try:
        typer.run(worker)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
