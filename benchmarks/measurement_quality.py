"""Measurement quality: is a latency figure repeatable, and does a ranking of models survive a re-run?

(a) Repeatability. The digits CNN baseline (batch 32, fixed threads) is measured in N separate *trials*:
    each is a fresh Python process running `optagent.trial.run_trial` on the baseline payload (load,
    evaluate, warm up, time interleaved against the baseline copy, metrics), exactly what a search does.
    As in a search, a first trial sets the job's reference (its interleaved baseline latency on this
    worker at this batch), and the N trials report `latency_ms` calibrated by it (the reference over the
    trial's paired speedup) beside their raw median, `latency_measured_ms`. Reported: the coefficient of
    variation (stdev / mean) over the N trials of both (target <= 3% for `latency_ms`), and the CV of the
    paired `speedup` (candidate == baseline, so ~1.0).
(b) Ranking. Five digits CNNs of widths 8/16/24/32/48 (untrained: latency does not depend on the weight
    values) are each timed in their own `interleaved` call against a width-32 reference, as separate trials
    would be, in one fresh process per run; two independent runs. Reported: Kendall tau between the two
    runs' latency rankings (1.0 = identical order) and whether the order matches exactly.

    python benchmarks/measurement_quality.py [--runs 10] [--threads 2] [--batch 32]

Runtime is about 2-4 minutes on 2 cores. On a shared, busy machine the absolute medians drift with the
load of other processes; the paired speedup is the figure built to survive that (see docs/metrics.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "digits_cnn.py"
WIDTHS = (8, 16, 24, 32, 48)


def _trial_payload(threads: int, measure: dict[str, Any]) -> dict[str, Any]:
    from optagent.contract import sha256_bytes

    return {"version": 1, "trial": 0, "job": {"id": 0, "name": "measurement-quality"},
            "model": {"path": str(MODEL), "sha256": sha256_bytes(MODEL.read_bytes()), "source_b64": None},
            "params": {}, "strategies": [], "objectives": ["accuracy:max", "latency_ms:min"], "seed": 0,
            "threads": threads, "device": "cpu", "measure": measure, "exclusive_measure": False}


def child_trial(threads: int, measure: dict[str, Any]) -> dict[str, Any]:
    """One separate measurement: the baseline trial, as a search would run it (raw figures; the coordinator
    calibrates them, see main)."""
    from optagent.trial import run_trial

    result = run_trial(_trial_payload(threads, measure))
    if result["state"] != "complete":
        raise SystemExit(f"trial failed: {result['failure_reason']}")
    from optagent.trial.measure import speedup_band

    m, samples = result["metrics"], result["samples"]
    band = speedup_band(samples["baseline_latency_ms"], samples["latency_ms"])
    return dict(m) | {"reps": len(samples["latency_ms"]), "paired_low": band.low, "paired_high": band.high}


def child_ranking(threads: int, batch: int) -> dict[str, Any]:
    """Each width timed in its own interleaved call against the width-32 reference (like separate trials)."""
    import importlib.util

    import torch

    from optagent.trial.measure import MeasureSettings, interleaved, speedup_band

    torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("digits_cnn", MODEL)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = module.example_input()
    x = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
    torch.manual_seed(0)
    reference = module.DigitsCNN(32).eval()
    out: dict[str, Any] = {}
    for width in WIDTHS:
        torch.manual_seed(width)
        model = module.DigitsCNN(width).eval()
        stats = interleaved({"candidate": lambda m=model: m(x), "reference": lambda: reference(x)},
                            MeasureSettings(), seed=width)
        band = speedup_band(stats["reference"].samples_ms, stats["candidate"].samples_ms)
        out[str(width)] = {"latency_ms": stats["candidate"].median_ms, "stable_ms": stats["candidate"].stable_ms,
                           "speedup": band.ratio}
    return out


def _child(mode: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads), "--batch", str(args.batch),
           "--measure", args.measure]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        raise SystemExit(f"child {mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kendall_tau(a: list[float], b: list[float]) -> float:
    n, score = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            score += (1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1)
    return score / (n * (n - 1) / 2)


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.fmean(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="separate measurements for the CV")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="batch of the ranking models (the trial uses the "
                                                          "model file's serving batch, 32)")
    ap.add_argument("--child", choices=("trial", "ranking"), help=argparse.SUPPRESS)
    ap.add_argument("--measure", default="{}", help="measure settings of the trials, as JSON, e.g. "
                                                    "'{\"max_time_s\": 8}' (default: optagent's defaults)")
    args = ap.parse_args()
    if args.child == "trial":
        print(json.dumps(child_trial(args.threads, json.loads(args.measure))))
        return
    if args.child == "ranking":
        print(json.dumps(child_ranking(args.threads, args.batch)))
        return

    env = {**os.environ, "OPTAGENT_CACHE_DIR": os.environ.get("OPTAGENT_CACHE_DIR")
           or str(Path(tempfile.gettempdir()) / "optagent-bench-cache")}
    started = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"# measurement quality: digits CNN, batch 32, {args.threads} threads, measure settings {args.measure}; "
          f"load average {load:.2f} on {os.cpu_count()} cores")
    from optagent.search.calibration import calibrate

    first = calibrate(_child("trial", args, env))  # the job's first trial: its own reference, as in a search
    reference = first["latency_reference_ms"]
    runs = []
    for i in range(args.runs):
        r = calibrate(_child("trial", args, env), reference)  # what the coordinator stores for each trial
        runs.append(r)
        print(f"  trial {i + 1:2d}: latency {r['latency_ms']:7.3f} ms, measured median {r['latency_measured_ms']:7.3f} "
              f"ms (spread {r['latency_spread']:.1%}, {r['reps']} reps)  baseline {r['baseline_latency_ms']:7.3f}  "
              f"paired speedup {r['speedup']:.3f} [{r['paired_low']:.3f}, {r['paired_high']:.3f}]")
    latency, measured = [r["latency_ms"] for r in runs], [r["latency_measured_ms"] for r in runs]
    print(f"(a) CV over {args.runs} separate trials of latency_ms (the job's reference {reference:.3f} ms / paired "
          f"speedup): {cv(latency):.2%}, target 3% ({'met' if cv(latency) <= 0.03 else 'missed'})")
    print(f"    CV of the raw measured median (latency_measured_ms), in the same trials: {cv(measured):.2%} "
          f"(range {min(measured):.3f}-{max(measured):.3f} ms)")
    print(f"    identical models, speedup should be 1: paired ratio CV {cv([r['speedup'] for r in runs]):.2%}"
          f" (range {min(r['speedup'] for r in runs):.3f}-{max(r['speedup'] for r in runs):.3f}); "
          f"band contains 1 in {sum(r['paired_low'] <= 1 <= r['paired_high'] for r in runs)}/{len(runs)}")

    first, second = _child("ranking", args, env), _child("ranking", args, env)
    def figures(run: dict[str, Any], key: str) -> list[float]:
        return [run[str(w)][key] for w in WIDTHS]

    def order(xs: list[float]) -> list[int]:
        return [WIDTHS[i] for i in sorted(range(len(xs)), key=xs.__getitem__)]

    print(f"(b) widths {WIDTHS} at batch {args.batch}, each timed separately against a width-32 reference:")
    for key, label in (("latency_ms", "median"), ("stable_ms", "quiet-block median"), ("speedup", "paired speedup")):
        a, b = figures(first, key), figures(second, key)
        print(f"    {label:18s} run 1 {', '.join(f'{v:.3g}' for v in a)}; run 2 {', '.join(f'{v:.3g}' for v in b)}"
              f"  -> order {order(a)} vs {order(b)}, Kendall tau {kendall_tau(a, b):.2f}")
    print(f"# {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
