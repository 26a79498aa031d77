"""Trial 0, the baseline: every strategy off, measured exactly like every other trial.

Its result sets up the job: the worker's capabilities and the model's layout (what the space offers), the
one-off analyses the searched strategies asked for (cached by model hash), and the metrics the constraint
and the latency scale are relative to. A resumed job reads it back from its row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from optagent.errors import UserError
from optagent.protocol import TrialPayload, TrialResult
from optagent.search.calibration import References
from optagent.search.front import Goal
from optagent.search.records import Records


@dataclass
class Baseline:
    values: list[float]
    metrics: dict[str, Any]
    capabilities: dict[str, Any]
    model_info: dict[str, Any]
    analyses: dict[str, Any] = field(default_factory=dict)


def measure(records: Records, goal: Goal, references: References, *, model_hash: str, model_path: str,
            analysis_keys: dict[str, str], payload: Callable[[list[str]], TrialPayload],
            run: Callable[[TrialPayload], dict[str, Any]], emit: Callable[..., None]) -> Baseline:
    """The baseline of the job: measured now (sent with `run`), or read from its stored row on resume.

    `analysis_keys` names the strategies whose `Strategy.analysis` the baseline runs (stored ones are
    reused); `payload(analyze)` builds the baseline's payload. A failed baseline, or one that lacks an
    objective or the constraint metric, fails the job with the reason (stored on its row).
    """
    analyses = records.analyses(model_hash, analysis_keys)
    row = records.row(0)
    if row is not None and row.state == "complete" and row.values is not None:
        references.note(row.metrics, row.worker)
        return Baseline(list(row.values), dict(row.metrics), row.hardware.get("capabilities") or {},
                        row.hardware.get("model_info") or {}, analyses)
    records.dispatched(0, {}, "baseline")
    emit("baseline_started")
    result = TrialResult.from_json(run(payload([n for n in analysis_keys if n not in analyses])))
    result.metrics = references.calibrated(result.metrics, result.worker)
    if result.state != "complete":
        records.store_result(0, result, values=None, feasible=None)
        raise UserError(f"the baseline trial failed: {result.failure_reason or 'unknown'}; fix the model file "
                        f"(try `optagent check {model_path}`)")
    missing = goal.missing(result.metrics)
    if missing:
        reason = (f"metric {', '.join(missing)} is not measured; measured metrics: "
                  f"{', '.join(sorted(result.metrics))}; pick objectives/--constraint-metric from these")
        result.state, result.failure_reason = "failed", reason
        records.store_result(0, result, None, None)
        raise UserError(reason)
    if result.analyses:
        records.store_analyses(model_hash, analysis_keys, result.analyses)
        analyses.update(result.analyses)
    values = goal.values(result.metrics)
    assert values is not None
    records.store_result(0, result, values=values, feasible=True)
    return Baseline(values, result.metrics, result.capabilities or {}, result.model_info or {}, analyses)
