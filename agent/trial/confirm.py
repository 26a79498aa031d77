"""The confirmation pass: re-measure a search's Pareto candidates together, in fresh processes.

During a search each trial times itself against the baseline in its own process, at its own moment of
machine load. When the search ends, the coordinator sends one payload with every Pareto candidate. This
worker-side function runs it `processes` times, each time in a fresh Python process on this host (one
after another, or `parallel` at once under the local workers' host lock): each process rebuilds every
candidate exactly (`pipeline.build` with the trial's own seed) and times all of them and the baseline
round-robin at their inference batch size (`confirm_in_process`).

One process gives each candidate a paired speedup with a bootstrap band over its rounds, but that band
cannot see what changes from one process to the next (memory layout, allocator and cache state), which
on a CPU is often the larger part of the noise. So the processes are combined (`combine`): a candidate's
confirmed speedup is the geometric mean of its per-process speedups, and
  - the noise band (`low`, `high`) is where 95% of single search-time measurements of that speedup fall
    (a t prediction interval, log scale): the spread between processes pooled over the candidates, the
    drift of the ratio over time within a process (`_phase_noise`) and the trial's own sampling noise
    (from its search-time band) added up; the band a search-time speedup is checked against;
  - the confidence band (`ci_low`, `ci_high`) is that of the confirmed speedup itself, from the spread
    between processes; candidates whose ratio, taken within each process, is within the noise share a
    tie group.

The payload is an `optagent.protocol.ConfirmPayload`; the answer a `ConfirmResult`.
`python -m optagent.trial.confirm PAYLOAD.json RESULT.json` is one such process.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from optagent.errors import TrialFailed, UserError, describe
from optagent.protocol import ConfirmPayload, ConfirmResult, TrialPayload, WorkerInfo, parse_payload

# Confirmation compares several candidates at once, so it takes more rounds than a single trial.
CONFIRM_MIN_REPS = 60
CONFIRMATION = 0.95
# Fresh processes per confirmation: three give the process-to-process spread (pooled over candidates).
CONFIRM_PROCESSES = 3


def confirm(payload: ConfirmPayload, worker: dict[str, Any] | None = None) -> ConfirmResult:
    """Run the confirmation in `processes` fresh processes and combine them.

    The processes run one after another, or `parallel` at a time when the payload times under the
    host lock (`exclusive_measure`: local workers), where one process's build waits while another times.
    """
    processes = int(payload.processes or CONFIRM_PROCESSES)
    if processes <= 1:
        return _as_result(confirm_in_process(payload, worker))
    if not payload.candidates:
        raise TrialFailed("confirmation payload has no candidates")
    started = time.perf_counter()
    limit = payload.time_limit_s
    parallel = max(1, int(payload.parallel or 1)) if payload.exclusive_measure else 1
    outcomes = _in_fresh_processes(payload, processes, parallel,
                                   started + float(limit) if limit else None)
    runs = [o for o in outcomes if isinstance(o, dict)]
    failures = [f"process {i + 1}: {o}" for i, o in enumerate(outcomes) if isinstance(o, str)]
    if not runs:
        raise TrialFailed("every confirmation process failed: " + "; ".join(failures))
    searched = {str(n): (float(c.speedup_low), float(c.speedup_high))
                for n, c in payload.candidates.items() if c.speedup_low and c.speedup_high}
    result = combine(runs, searched=searched)
    result["notes"] = [f"confirmation {f}" for f in failures]
    result["duration_s"] = time.perf_counter() - started
    result["worker"] = worker or {}
    return _as_result(result)


def _as_result(data: dict[str, Any]) -> ConfirmResult:
    known = {f.name for f in fields(ConfirmResult)}
    return ConfirmResult(**{k: v for k, v in data.items() if k in known})


def _in_fresh_processes(payload: ConfirmPayload, processes: int, parallel: int,
                        deadline: float | None) -> list[dict[str, Any] | str]:
    """Each confirmation in a new interpreter on this host (same environment, so the same GPU), at most
    `parallel` at once: per process, its result, or why it gave none."""
    outcomes: dict[int, dict[str, Any] | str] = {}
    with tempfile.TemporaryDirectory(prefix="optagent-confirm-") as tmp:
        src = Path(tmp) / "payload.json"
        src.write_text(json.dumps(payload.to_json()))  # `main` runs it as one process
        waiting = list(range(processes))
        running: dict[int, subprocess.Popen[bytes]] = {}
        try:
            while waiting or running:
                while waiting and len(running) < parallel:
                    i = waiting.pop(0)
                    log = (Path(tmp) / f"stderr-{i}").open("w")
                    cmd = [sys.executable, "-m", "optagent.trial.confirm", str(src),
                           str(Path(tmp) / f"result-{i}.json")]
                    running[i] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                  stderr=log)
                    log.close()
                for i, proc in list(running.items()):
                    if proc.poll() is not None:
                        outcomes[i] = _outcome(Path(tmp), i, proc.returncode)
                        del running[i]
                if deadline is not None and time.perf_counter() > deadline:
                    for i in [*running, *waiting]:
                        outcomes[i] = "did not finish within the confirmation's time limit"
                    break
                time.sleep(0.1)
        finally:
            for proc in running.values():  # a time limit, or this worker being stopped
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return [outcomes[i] for i in range(processes)]


def _outcome(tmp: Path, index: int, code: int) -> dict[str, Any] | str:
    out = tmp / f"result-{index}.json"
    if not out.exists():
        lines = [line for line in (tmp / f"stderr-{index}").read_text().splitlines() if line.strip()]
        return f"exited with code {code}" + (f": {lines[-1].strip()}" if lines else "")
    result: dict[str, Any] = json.loads(out.read_text())
    if result.get("state") != "complete":
        return str(result.get("failure_reason"))
    return result


PHASE_BLOCKS = 4  # consecutive blocks of rounds per process, to see how the ratio moves over time
MIN_BLOCK_ROUNDS = 10


def _phase_noise(reference: list[float] | tuple[float, ...],
                 candidate: list[float] | tuple[float, ...]) -> tuple[float, int]:
    """How much the paired log ratio moves between stretches of time within one process, beyond what its
    rounds' sampling noise explains: (variance, degrees of freedom).

    A trial times its model in one stretch of a few seconds; a shared machine goes through phases (other
    tenants' load) that slow an int8 model more than its fp32 baseline, so a trial's speedup depends on
    the phase it met, more than the long, round-robin confirmation shows. The rounds are split into
    consecutive blocks; the variance of the block medians less each block median's own sampling variance
    (0.8 IQR / sqrt(n), the normal approximation) is that phase component.
    """
    from optagent.trial.measure import paired_ratios

    logs = [math.log(r) for r in paired_ratios(reference, candidate) if r > 0]
    blocks = min(PHASE_BLOCKS, len(logs) // MIN_BLOCK_ROUNDS)
    if blocks < 2:
        return 0.0, 0
    size = len(logs) // blocks
    medians, sampling = [], []
    for b in range(blocks):
        chunk = sorted(logs[b * size:(b + 1) * size])
        q1, q3 = chunk[len(chunk) // 4], chunk[(3 * len(chunk)) // 4]
        medians.append(statistics.median(chunk))
        sampling.append((0.8 * (q3 - q1) / math.sqrt(len(chunk))) ** 2)
    return max(0.0, statistics.variance(medians) - statistics.fmean(sampling)), blocks - 1


def _t_quantile(confidence: float, df: int) -> float:
    """The two-sided t quantile: mean +- this many standard errors covers `confidence`."""
    from scipy.stats import t  # scikit-learn, a dependency, brings scipy

    return float(t.ppf(1 - (1 - confidence) / 2, df))


def combine(runs: list[dict[str, Any]], confidence: float = CONFIRMATION,
            searched: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """Combine single-process confirmations (`confirm_in_process` results) of the same candidates;
    `searched` has each candidate's search-time speedup band (low, high), whose width is part of the
    noise of that measurement."""
    from optagent.trial.measure import MIN_EFFECT, Speedup, tie_groups

    searched = searched or {}
    numbers = sorted({n for run in runs for n in run["confirmations"]}, key=int)
    measured = {n: [run["confirmations"][n] for run in runs if "speedup" in run["confirmations"].get(n, {})]
                for n in numbers}
    logs = {n: [math.log(c["speedup"]) for c in cs if c["speedup"] > 0] for n, cs in measured.items()}
    df = sum(len(ys) - 1 for ys in logs.values() if len(ys) > 1)
    ss = sum(sum((y - statistics.fmean(ys)) ** 2 for y in ys) for ys in logs.values() if len(ys) > 1)
    noise = math.sqrt(ss / df) if df else None
    t = _t_quantile(confidence, df) if df else None
    phase_df = sum(c.get("phase_df", 0) for cs in measured.values() for c in cs)
    phase_var = (sum(c.get("phase_var", 0.0) * c.get("phase_df", 0) for cs in measured.values() for c in cs)
                 / phase_df if phase_df else 0.0)

    confirmations: dict[str, dict[str, Any]] = {}
    ci: dict[str, Speedup] = {}
    for n in numbers:
        cs, ys = measured[n], logs[n]
        if not ys:
            errors = [run["confirmations"][n]["error"] for run in runs if "error" in run["confirmations"].get(n, {})]
            confirmations[n] = {"error": errors[0] if errors else "not measured"}
            continue
        centre, k = statistics.fmean(ys), len(ys)
        point = math.exp(centre)
        rounds = sum(c["rounds"] for c in cs)
        if noise is None or t is None or k < 2:  # one process: only the within-process band is known
            low, high = statistics.median(c["low"] for c in cs), statistics.median(c["high"] for c in cs)
            ci[n] = Speedup(point, low, high, rounds)
        else:
            # a search-time speedup is one measurement in one process, at one moment, with its own rounds:
            # process-to-process, phase and its own sampling noise (from its band), around this mean
            own = searched.get(n)
            own_var = ((math.log(own[1]) - math.log(own[0])) / (2 * 1.96)) ** 2 if own else 0.0
            reach = t * math.sqrt(noise ** 2 * (1 + 1 / k) + phase_var + own_var)
            mean_reach = t * noise / math.sqrt(k)
            low = min(math.exp(centre - reach), statistics.median(c["low"] for c in cs))
            high = max(math.exp(centre + reach), statistics.median(c["high"] for c in cs))
            ci[n] = Speedup(point, math.exp(centre - mean_reach), math.exp(centre + mean_reach), rounds)
        confirmations[n] = {
            "speedup": point, "low": min(low, point), "high": max(high, point),
            "ci_low": min(ci[n].low, point), "ci_high": max(ci[n].high, point),
            "runs": [c["speedup"] for c in cs], "processes": k, "rounds": rounds, "noise": noise,
            "phase_noise": math.sqrt(phase_var),
            "latency_ms": statistics.median(c["latency_ms"] for c in cs),
            "latency_spread": statistics.median(c["latency_spread"] for c in cs),
            "baseline_latency_ms": statistics.median(c["baseline_latency_ms"] for c in cs),
            "baseline_latency_spread": statistics.median(c["baseline_latency_spread"] for c in cs),
            "batch_size": cs[0]["batch_size"], "vs_baseline": ci[n].verdict(MIN_EFFECT),
        }

    def differ(leader: str, other: str) -> bool:
        """The leader is faster beyond the noise: the ratio between the two, taken within each process
        (where a process's own layout and cache state affects both alike), has a confidence band wholly
        above 1 + MIN_EFFECT. With fewer than two processes the bands decide."""
        d = [math.log(a["speedup"] / b["speedup"]) for a, b in
             ((run["confirmations"].get(leader, {}), run["confirmations"].get(other, {})) for run in runs)
             if a.get("speedup", 0) > 0 and b.get("speedup", 0) > 0]
        if len(d) < 2:
            return not ci[leader].overlaps(ci[other], MIN_EFFECT)
        reach = _t_quantile(confidence, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
        return statistics.fmean(d) - reach > math.log1p(MIN_EFFECT)

    for n, group_no in tie_groups(ci, MIN_EFFECT, differ).items():
        confirmations[n]["tie_group"] = group_no
    return {
        "trial": -1, "kind": "confirm", "state": "complete", "confirmations": confirmations,
        "samples": [run["samples"] for run in runs], "confidence": confidence, "processes": len(runs),
        "noise": noise, "phase_noise": math.sqrt(phase_var), "hardware": runs[0].get("hardware", {}),
        "failure_reason": None, "notes": [],
        "duration_s": sum(run.get("duration_s", 0.0) for run in runs), "worker": runs[0].get("worker", {}),
    }


def confirm_in_process(payload: ConfirmPayload, worker: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rebuild and time every candidate interleaved with the baseline in this process (one run, as JSON)."""
    from optagent.trial.measure import MIN_EFFECT, MeasureSettings, speedup_band, tie_groups
    from optagent.trial.pipeline import _batch, build, time_models

    started = time.perf_counter()
    candidates = dict(payload.candidates)
    if not candidates:
        raise TrialFailed("confirmation payload has no candidates")
    settings = MeasureSettings.from_json(payload.measure)
    measure = {**settings.to_json(), "min_reps": max(settings.min_reps, CONFIRM_MIN_REPS)}
    common = {f.name: getattr(payload, f.name) for f in fields(TrialPayload) if hasattr(payload, f.name)}

    confirmations: dict[str, dict[str, Any]] = {}
    models: dict[int, dict[str, Any]] = {}  # inference batch size -> {number: model}
    baseline = mf = device = None
    hardware: dict[str, Any] = {}
    for number, spec in candidates.items():
        sub = TrialPayload(**{**common, "trial": int(number), "params": spec.params or {}, "seed": int(spec.seed)})
        try:
            built = build(sub, (worker or {}).get("host"))
        except (TrialFailed, UserError) as exc:
            confirmations[number] = {"error": str(exc)}
            continue
        except Exception as exc:  # one candidate failing to rebuild does not void the others
            confirmations[number] = {"error": describe(exc)}
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
        stats = time_models({"baseline": baseline, **group}, batch, measure, payload.exclusive_measure, device,
                            int(payload.seed))
        base = stats["baseline"]
        samples[str(bs)] = {name: list(s.samples_ms) for name, s in stats.items()}
        for number in group:
            band = speedup_band(base.samples_ms, stats[number].samples_ms, CONFIRMATION,
                                seed=int(payload.seed))
            bands[number] = band
            phase_var, phase_df = _phase_noise(base.samples_ms, stats[number].samples_ms)
            confirmations[number] = {
                "speedup": band.ratio, "low": band.low, "high": band.high, "rounds": band.rounds,
                "phase_var": phase_var, "phase_df": phase_df,
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


def _exit_with_parent() -> None:
    """A confirmation process outlives no parent (a killed worker must not leave it timing alone)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="optagent-parent-watch").start()


def main(argv: list[str]) -> int:
    """`python -m optagent.trial.confirm PAYLOAD.json RESULT.json`: one confirmation process."""
    from optagent.trial.pipeline import steady_allocator

    if len(argv) != 2:
        print("usage: python -m optagent.trial.confirm PAYLOAD.json RESULT.json", file=sys.stderr)
        return 2
    _exit_with_parent()
    steady_allocator()
    payload = parse_payload(json.loads(Path(argv[0]).read_text()))
    assert isinstance(payload, ConfirmPayload)
    try:
        result = confirm_in_process(payload, asdict(WorkerInfo.here()))
    except (TrialFailed, UserError) as exc:
        result = {"state": "failed", "failure_reason": str(exc)}
    except Exception as exc:
        result = {"state": "failed", "failure_reason": describe(exc)}
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
