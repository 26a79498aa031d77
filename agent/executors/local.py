"""The embedded default: each trial in its own local process, at most `workers` at a time.

A fresh process per trial means a crash, a hang or a memory blow-up costs one trial, never the search,
and memory (including GPU memory, which PyTorch does not return between tasks) is released when the
trial ends. A trial process also ends when its coordinator does, however that dies (SIGKILL included).
Processes come from a forkserver that has already imported torch, so a trial does not pay the import
again; the forkserver never initialises CUDA.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from optagent.executors._base import Outcome
from optagent.protocol import failed_json

_PRELOAD = ["torch", "optagent.trial.entry", "optagent.trial.pipeline", "optagent.registry", "optagent.plugins"]


def _child(payload: dict[str, Any], conn: mpc.Connection, coordinator_pid: int | None = None) -> None:
    from optagent.trial.entry import run_trial

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    if coordinator_pid is not None:
        # a SIGKILLed coordinator takes its trials with it, so `optagent resume` never runs a trial twice side by side
        from optagent.preflight import die_with_parent

        die_with_parent(coordinator_pid)
    try:
        conn.send(run_trial(payload))
    finally:
        conn.close()


@dataclass
class _Running:
    process: Any
    conn: mpc.Connection
    started: float
    deadline: float | None
    limit: float | None
    payload: dict[str, Any]


def finite_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """A result whose non-finite metrics (an evaluate() that returned NaN for this trial's model) are left
    out, with a note: a NaN cannot be compared, stored as JSON or told to Optuna, so the trial then fails
    as missing that metric (if it is an objective) instead of failing the whole job."""
    metrics = result.get("metrics")
    if not isinstance(metrics, dict):
        return result
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if not bad:
        return result
    notes = [*result.get("notes", []), f"non-finite values for {', '.join(bad)} were left out"]
    return {**result, "metrics": {k: v for k, v in metrics.items() if k not in bad}, "notes": notes}


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        hint = " (killed: out of memory?)" if sig == signal.SIGKILL else ""
        return f"trial process died from signal {name}{hint}"
    return f"trial process exited with code {exitcode} before reporting a result"


class LocalExecutor:
    """Runs payloads in local processes. Implements optagent.executors.Executor."""

    def __init__(self, workers: int = 1, time_limit_s: float | None = None, start_method: str = "forkserver"):
        self.capacity = max(1, int(workers))
        self.time_limit_s = time_limit_s
        self._ctx: Any
        if start_method == "forkserver" and "forkserver" in mp.get_all_start_methods():
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(_PRELOAD)
        else:
            self._ctx = mp.get_context("spawn")
        self._running: dict[int, _Running] = {}

    def submit(self, number: int, payload: dict[str, Any]) -> None:
        if number in self._running:
            return
        parent, child = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=_child, args=(payload, child, os.getpid()),
                                    name=f"optagent-trial-{number}", daemon=True)
        process.start()
        child.close()
        now = time.monotonic()
        limit = payload.get("time_limit_s") or self.time_limit_s
        self._running[number] = _Running(process, parent, now, now + limit if limit else None, limit, payload)

    def in_flight(self) -> set[int]:
        return set(self._running)

    def poll(self, timeout: float) -> list[Outcome]:
        if not self._running:
            time.sleep(min(timeout, 0.05))
            return []
        waitables: list[Any] = []
        for r in self._running.values():
            waitables += [r.conn, r.process.sentinel]
        mpc.wait(waitables, timeout=timeout)
        done: list[Outcome] = []
        now = time.monotonic()
        for number, r in list(self._running.items()):
            result = None
            if r.conn.poll():
                try:
                    result = r.conn.recv()
                except (EOFError, OSError):
                    result = None
            if result is None and not r.process.is_alive():
                r.process.join(timeout=1)
                result = failed_json(r.payload, _death_reason(r.process.exitcode), duration_s=now - r.started)
            if result is None and r.deadline is not None and now > r.deadline:
                r.process.kill()
                r.process.join(timeout=5)
                result = failed_json(r.payload, f"trial exceeded its time limit of {r.limit:.0f} s "
                                       "(raise --trial-timeout)", duration_s=now - r.started)
            if result is not None:
                r.process.join(timeout=5)
                if r.process.is_alive():  # reported, but held up by threads the model file left running
                    r.process.kill()
                    r.process.join(timeout=5)
                r.conn.close()
                del self._running[number]
                done.append(Outcome(number, finite_metrics(result)))
        return done

    def cancel(self) -> None:
        for r in self._running.values():
            r.process.kill()
        for r in self._running.values():
            r.process.join(timeout=5)
            r.conn.close()
        self._running.clear()

    def close(self) -> None:
        self.cancel()
