"""The confirmation round trip, coordinator side: what to send when a search ends, and what to store back.

The Pareto trials are re-measured together, interleaved with the baseline, in fresh processes on a worker
(optagent.trial.confirm does the measuring and the statistics). Here: the payload, and the confirmed
figures written onto each trial's row, on the job's latency scale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from optagent.job import JobConfig
from optagent.protocol import Candidate, ConfirmPayload, ConfirmResult, TrialPayload
from optagent.search.calibration import References
from optagent.search.records import Records
from optagent.storage import Trial

log = logging.getLogger(__name__)


def concurrency(cfg: JobConfig, exclusive_measure: bool) -> int:
    """How many confirmation processes run at once: local workers time under the host lock, so one process
    can build while another times; elsewhere one at a time."""
    return min(max(1, cfg.confirm_processes), cfg.workers) if exclusive_measure else 1


def confirmation_payload(cfg: JobConfig, base: TrialPayload, candidates: dict[int, Trial]) -> ConfirmPayload:
    processes = max(1, cfg.confirm_processes)
    limit = cfg.trial_timeout_s * (len(candidates) + 1) * processes if cfg.trial_timeout_s else None
    fields = {k: v for k, v in base.__dict__.items() if k not in ("params", "trial")}
    return ConfirmPayload(
        **{**fields, "trial": -1, "seed": cfg.seed, "time_limit_s": limit},
        processes=processes, parallel=concurrency(cfg, base.exclusive_measure),
        candidates={str(n): Candidate(params=row.params, seed=cfg.seed + n,
                                      speedup_low=row.metrics.get("speedup_low"),
                                      speedup_high=row.metrics.get("speedup_high"))
                    for n, row in candidates.items()})


def confirmed_metrics(conf: dict[str, Any]) -> dict[str, Any]:
    """A trial's metrics from its entry in a confirmation result (optagent.trial.confirm)."""
    out = {"confirmed_speedup": conf["speedup"], "confirmed_speedup_low": conf["low"],
           "confirmed_speedup_high": conf["high"], "tie_group": conf["tie_group"]}
    if "ci_low" in conf:
        out.update(confirmed_speedup_ci_low=conf["ci_low"], confirmed_speedup_ci_high=conf["ci_high"],
                   confirmed_speedup_runs=conf["runs"], confirmed_processes=conf["processes"])
    if conf.get("noise") is not None:
        out["confirmed_noise"] = conf["noise"]
    if conf.get("phase_noise") is not None:
        out["confirmed_phase_noise"] = conf["phase_noise"]
    return out


def store_confirmation(records: Records, references: References, result: ConfirmResult) -> None:
    """Each confirmed trial's figures (or why it could not be confirmed) onto its row."""
    for key, conf in result.confirmations.items():
        if "error" in conf:
            records.add_notes(int(key), [f"confirmation failed: {conf['error']}"])
            continue
        ref = references.get(result.worker, conf.get("batch_size"))
        latency = ref / conf["speedup"] if ref and conf["speedup"] > 0 else conf["latency_ms"]
        records.add_notes(int(key), [f"confirmed vs baseline: {conf['vs_baseline']}"],
                          {**confirmed_metrics(conf), "confirmed_latency_ms": latency})


def confirm_front(cfg: JobConfig, records: Records, references: References, front: list[int], base: TrialPayload,
                  run: Callable[[ConfirmPayload], dict[str, Any]], emit: Callable[..., None]) -> None:
    """Send the Pareto trials (`front`, baseline excluded) for confirmation with `run`, store what comes back."""
    candidates = {n: row for n, row in ((n, records.row(n)) for n in front if n > 0) if row}
    if not candidates:
        return
    payload = confirmation_payload(cfg, base, candidates)
    emit("confirm_started", trials=sorted(candidates), processes=payload.processes, parallel=payload.parallel)
    result = ConfirmResult.from_json(run(payload))
    if result.state != "complete":
        log.warning("confirmation pass failed: %s", result.failure_reason)
        emit("confirmed", ok=False, reason=result.failure_reason)
        return
    store_confirmation(records, references, result)
    emit("confirmed", ok=True, confirmations=result.confirmations, notes=result.notes)
