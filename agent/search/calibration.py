"""A job's latency scale: every trial's latency on the reference of the worker and batch it ran at.

A slow phase of the machine, or a slower process, moves a candidate and its interleaved baseline alike,
so a trial's paired speedup survives it and its raw median does not. The coordinator therefore puts each
result on the job's scale when it is told: `latency_ms` becomes the reference baseline latency over the
trial's speedup (docs/metrics.md, "calibration"). The reference per worker host and batch is the
interleaved baseline latency of the first trial told there; it is stored with every trial
(`latency_reference_ms`), so a resumed job keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def reference_key(host: str, gpu: str | None, batch: int) -> str:
    """Which reference latency applies: one per worker host (and GPU) and batch size."""
    return f"{host}/{gpu or 'cpu'}/{batch}"


def result_key(worker: Mapping[str, Any] | None, batch: Any) -> str:
    """The reference key of a result from `worker` at inference batch `batch`."""
    worker = worker or {}
    return reference_key(str(worker.get("host", "")), worker.get("gpu"), int(batch))


def calibrate(metrics: Mapping[str, float], reference_ms: float | None = None) -> dict[str, float]:
    """A trial's latencies on the job's reference scale.

    The tails, per-sample latency and throughput follow `latency_ms` by the same factor; the raw median is
    kept as `latency_measured_ms`. Without a reference (the first trial on a worker at a batch size) the
    trial's own interleaved baseline is the reference. Metrics without a positive speedup, or already
    calibrated, come back unchanged.
    """
    out = dict(metrics)
    measured, ratio, base = out.get("latency_ms"), out.get("speedup"), out.get("baseline_latency_ms")
    if "latency_reference_ms" in out or not measured or not ratio or not base or ratio <= 0 or measured <= 0:
        return out
    reference = reference_ms if reference_ms and reference_ms > 0 else base
    latency = reference / ratio
    factor = latency / measured
    out.update(latency_ms=latency, latency_measured_ms=measured, latency_reference_ms=reference,
               baseline_drift=base / reference - 1.0)
    return _scaled(out, factor)


def _scaled(metrics: dict[str, Any], factor: float) -> dict[str, Any]:
    """The latency tails and per-sample latency times `factor`, throughput divided by it."""
    for key in ("latency_p90_ms", "latency_p99_ms", "latency_per_sample_ms"):
        if key in metrics:
            metrics[key] = metrics[key] * factor
    if "throughput" in metrics:
        metrics["throughput"] = metrics["throughput"] / factor
    return metrics


def uncalibrated(metrics: dict[str, Any]) -> dict[str, Any]:
    """A trial's metrics as its worker measured them, before another job's calibration (for `--reuse`)."""
    out = {k: v for k, v in metrics.items() if k not in ("latency_reference_ms", "baseline_drift")}
    measured, latency = out.pop("latency_measured_ms", None), out.get("latency_ms")
    if measured and latency:
        out["latency_ms"] = measured
        _scaled(out, measured / latency)
    return out


class References:
    """The job's reference latency per worker and batch."""

    def __init__(self) -> None:
        self._by_key: dict[str, float] = {}

    def calibrated(self, metrics: dict[str, Any], worker: Mapping[str, Any] | None) -> dict[str, Any]:
        """`metrics` on the job's scale; the first result at a worker and batch sets the reference."""
        if "batch_size" not in metrics:
            return metrics
        key = result_key(worker, metrics["batch_size"])
        out = calibrate(metrics, self._by_key.get(key))
        if "latency_reference_ms" in out:
            self._by_key.setdefault(key, float(out["latency_reference_ms"]))
        return out

    def note(self, metrics: Mapping[str, Any], worker: Mapping[str, Any] | None) -> None:
        """On resume: the reference a stored trial was calibrated by."""
        if worker and "latency_reference_ms" in metrics and "batch_size" in metrics:
            self._by_key.setdefault(result_key(worker, metrics["batch_size"]), float(metrics["latency_reference_ms"]))

    def get(self, worker: Mapping[str, Any] | None, batch: Any) -> float | None:
        return self._by_key.get(result_key(worker, batch or 0))
