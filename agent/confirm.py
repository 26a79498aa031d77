"""The confirmation pass: re-measure a search's Pareto candidates together, in one process.

During a search each trial times itself against the baseline in its own process, at its own moment of
machine load. When the search ends, the coordinator sends one payload with every Pareto candidate; this
worker-side function rebuilds each one exactly (`pipeline.build` with the trial's own seed), times all of
them and the baseline round-robin in the same process at their inference batch size, and returns each
candidate's paired speedup with a bootstrap band. Candidates whose bands overlap share a tie group.

payload = the usual trial fields (model, strategies, objectives, threads, device, measure, job) plus
    "kind": "confirm", "trial": -1,
    "candidates": {"<trial number>": {"params": {strategy: {param: value}}, "seed": int}}
"""

from __future__ import annotations

import time
import traceback
from typing import Any

# Confirmation compares several candidates at once, so it takes more rounds than a single trial.
CONFIRM_MIN_REPS = 60
CONFIRMATION = 0.95


def _reason(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def confirm(payload: dict[str, Any], worker: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rebuild and time every candidate interleaved with the baseline; see the module docstring."""
    from optagent.errors import TrialFailed, UserError
    from optagent.measure import MIN_EFFECT, MeasureSettings, speedup_band, tie_groups
    from optagent.pipeline import _batch, build, time_models

    started = time.perf_counter()
    candidates: dict[str, dict[str, Any]] = {str(k): v for k, v in (payload.get("candidates") or {}).items()}
    if not candidates:
        raise TrialFailed("confirmation payload has no candidates")
    settings = MeasureSettings.from_json(payload.get("measure"))
    measure = {**settings.to_json(), "min_reps": max(settings.min_reps, CONFIRM_MIN_REPS)}

    confirmations: dict[str, dict[str, Any]] = {}
    models: dict[int, dict[str, Any]] = {}  # inference batch size -> {number: model}
    baseline = mf = device = None
    hardware: dict[str, Any] = {}
    for number, spec in candidates.items():
        sub = {**payload, "kind": "trial", "trial": int(number), "params": spec.get("params") or {},
               "seed": int(spec.get("seed", payload.get("seed", 0)))}
        try:
            built = build(sub, (worker or {}).get("host"))
        except (TrialFailed, UserError) as exc:
            confirmations[number] = {"error": str(exc)}
            continue
        except Exception as exc:  # one candidate failing to rebuild does not void the others
            confirmations[number] = {"error": _reason(exc)}
            continue
        if baseline is None:
            baseline, mf, device = built.ctx.baseline, built.model_file, built.ctx.device
            hardware = built.hardware
        models.setdefault(built.ctx.infer_batch_size, {})[number] = built.model
    if baseline is None:
        raise TrialFailed("no candidate could be rebuilt: " + "; ".join(
            f"trial {n}: {c['error']}" for n, c in confirmations.items()))

    samples: dict[str, dict[str, list[float]]] = {}
    bands = {}
    for bs, group in sorted(models.items()):
        batch = _batch(mf, bs, device)
        stats = time_models({"baseline": baseline, **group}, batch, {**payload, "measure": measure}, device,
                            int(payload.get("seed", 0)))
        base = stats["baseline"]
        samples[str(bs)] = {name: list(s.samples_ms) for name, s in stats.items()}
        for number in group:
            band = speedup_band(base.samples_ms, stats[number].samples_ms, CONFIRMATION,
                                seed=int(payload.get("seed", 0)))
            bands[number] = band
            confirmations[number] = {
                "speedup": band.ratio, "low": band.low, "high": band.high, "rounds": band.rounds,
                "latency_ms": stats[number].median_ms, "latency_spread": stats[number].spread,
                "baseline_latency_ms": base.median_ms, "baseline_latency_spread": base.spread,
                "batch_size": bs, "vs_baseline": band.verdict(MIN_EFFECT),
            }
    for number, group_no in tie_groups(bands).items():
        confirmations[number]["tie_group"] = group_no
    return {
        "trial": -1, "kind": "confirm", "state": "complete", "confirmations": confirmations,
        "samples": samples, "confidence": CONFIRMATION, "hardware": hardware,
        "failure_reason": None, "notes": [], "duration_s": time.perf_counter() - started,
        "worker": worker or {},
    }
