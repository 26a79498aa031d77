"""A fake executor: the coordinator's loop tested in-process, in milliseconds, with no model and no worker.

    executor = FakeExecutor(answer=fake_answer())
    Coordinator(engine, url, job_id, registry, executor).run()
    assert [n for n, _ in executor.sent] == [0, 1, 2, ...]

`answer(payload) -> result` is called when a trial is reported (payload and result are the JSON of
optagent.protocol). `hold` keeps trials in flight until released, so tests can order results, lose them or
stop the coordinator mid-search. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from optagent.executors import Outcome
from optagent.protocol import ConfirmResult, TrialResult, WorkerInfo

Answer = Callable[[dict[str, Any]], dict[str, Any]]

FAKE_CAPABILITIES: dict[str, Any] = {
    "device": "cpu", "cpu_model": "fake CPU", "cpu_flags": ["avx2", "fma"], "quantized_engines": ["x86"],
    "cuda": False, "gpu_name": None, "gpu_capability": None, "gpu_bf16": False, "extra": {}}


def fake_metrics(params: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Deterministic figures for a recipe: pruning and int8 make it faster and a little less accurate."""
    amount = float((params.get("pruning") or {}).get("amount", 0.0)) \
        if (params.get("pruning") or {}).get("method", "none") != "none" else 0.0
    mode = (params.get("quantization") or {}).get("mode", "none")
    speedup = (1.0 + 2.0 * amount) * (2.0 if mode in ("dynamic_int8", "static_int8") else 1.0)
    accuracy = 0.95 - 0.2 * amount ** 2 - (0.005 if mode != "none" else 0.0)
    latency = 10.0 / speedup
    return {"accuracy": accuracy, "latency_ms": latency, "speedup": speedup, "speedup_low": speedup * 0.98,
            "speedup_high": speedup * 1.02, "baseline_latency_ms": 10.0, "batch_size": 8.0,
            "throughput": 8000.0 / latency}


def fake_answer(metrics: Callable[[dict[str, dict[str, Any]]], dict[str, float]] = fake_metrics,
                fail: Callable[[dict[str, Any]], str | None] | None = None) -> Answer:
    """An answer function: a complete result with `metrics(params)`, or failed with `fail(payload)`'s reason."""

    def answer(payload: dict[str, Any]) -> dict[str, Any]:
        worker = asdict(WorkerInfo("fake-host", 1))
        if payload.get("kind") == "confirm":
            confirmations = {n: {**_confirmed(metrics(c["params"]))} for n, c in payload["candidates"].items()}
            for rank, n in enumerate(sorted(confirmations, key=lambda n: -confirmations[n]["speedup"]), 1):
                confirmations[n]["tie_group"] = rank
            return ConfirmResult(state="complete", confirmations=confirmations, worker=worker).to_json()
        reason = fail(payload) if fail else None
        number = int(payload["trial"])
        if reason:
            return TrialResult.failed(number, reason, worker=worker).to_json()
        return TrialResult(trial=number, state="complete", metrics=metrics(payload.get("params") or {}),
                           worker=worker, capabilities=dict(FAKE_CAPABILITIES),
                           model_info={"default_batch_size": 8, "has_conv": True, "has_linear": True}).to_json()

    return answer


def _confirmed(m: dict[str, float]) -> dict[str, Any]:
    return {"speedup": m["speedup"], "low": m["speedup"] * 0.95, "high": m["speedup"] * 1.05,
            "latency_ms": m["latency_ms"], "batch_size": m["batch_size"], "vs_baseline": "faster"}


class FakeExecutor:
    """Implements optagent.executors.Executor in memory. `sent` lists (number, payload) in send order."""

    def __init__(self, answer: Answer | None = None, capacity: int = 1, hold: set[int] | None = None):
        self.answer = answer or fake_answer()
        self.capacity = capacity
        self.hold = set(hold or ())
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self._pending: dict[int, dict[str, Any]] = {}
        self.cancelled = False
        self.closed = False

    def submit(self, number: int, payload: dict[str, Any]) -> None:
        if number in self._pending:
            return
        self.sent.append((number, payload))
        self._pending[number] = payload

    def release(self, *numbers: int) -> None:
        self.hold -= set(numbers)

    def poll(self, timeout: float) -> list[Outcome]:
        ready = [n for n in self._pending if n not in self.hold]
        return [Outcome(n, self.answer(self._pending.pop(n))) for n in ready]

    def in_flight(self) -> set[int]:
        return set(self._pending)

    def cancel(self) -> None:
        self.cancelled = True
        self._pending.clear()

    def close(self) -> None:
        self.closed = True
