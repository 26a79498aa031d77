"""Runtimes on vs off: two searches of the digits example with the same budget and seed.

Search A uses the eager strategies only; search B adds the `runtime` strategy (torch.compile, ONNX
Runtime; quantization then follows the runtime). For each search it reports the best speedup within the
1% accuracy constraint and the hypervolume of its (accuracy, latency) front. Latency is taken relative
to the baseline timed interleaved with each trial (latency / baseline latency = 1 / speedup), so the two
searches stay comparable even when the machine's load differs between them. Hypervolume reference point:
(baseline accuracy - 0.05, 1.5 x baseline latency), normalised by the area of that box (1.0 = a trial
with baseline accuracy and zero latency). Then the best feasible trial of each search is rebuilt and
re-measured with the baseline interleaved in this one process, the figure to trust on a noisy machine.

    python benchmarks/runtimes.py [--trials 40] [--workers 1] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "digits_cnn.py"
EAGER = "pruning,finetune,quantization"
ACC_MARGIN, LAT_FACTOR = 0.05, 1.5


def hypervolume(points: list[tuple[float, float]], acc0: float) -> float:
    """Exact 2-D hypervolume of (accuracy up, relative latency down) points, normalised to the ref box."""
    ref_acc, ref_lat = acc0 - ACC_MARGIN, LAT_FACTOR
    pts = sorted({(a, r) for a, r in points if a > ref_acc and r < ref_lat}, key=lambda p: (-p[0], p[1]))
    area, best_lat = 0.0, ref_lat
    for acc, lat in pts:  # sweep from the most accurate down; each point adds the strip it newly dominates
        if lat < best_lat:
            area += (acc - ref_acc) * (best_lat - lat)
            best_lat = lat
    return area / (ACC_MARGIN * LAT_FACTOR)


def search(name: str, strategies: str, args: argparse.Namespace, db: str, env: dict[str, str]) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "optagent.cli", "search", str(MODEL), "--trials", str(args.trials),
                           "--workers", str(args.workers), "--threads", str(args.threads), "--seed", str(args.seed),
                           "--sampler", args.sampler, "--strategies", strategies, "--db", db, "--name", name,
                           "--json", "--quiet"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"search {name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    out["wall_s"] = time.perf_counter() - started
    return out


def summarise(name: str, out: dict[str, Any]) -> dict[str, Any]:
    trials = out["trials"]
    base = trials[0]["metrics"]
    done = [t for t in trials[1:] if t["state"] == "complete"]
    feasible = sorted((t for t in done if t["feasible"]), key=lambda t: -t["metrics"]["speedup"])
    points = [(t["metrics"]["accuracy"], 1.0 / t["metrics"]["speedup"]) for t in done]
    points.append((base["accuracy"], 1.0))  # the baseline is always on offer
    engines: dict[str, int] = {}
    for t in done:
        engine = (t["params"].get("runtime") or {}).get("engine", "eager")
        engines[engine] = engines.get(engine, 0) + 1
    failed = [t for t in trials[1:] if t["state"] != "complete"]
    summary = {"name": name, "base": base, "feasible": feasible, "hv": hypervolume(points, base["accuracy"]),
               "best": feasible[0] if feasible else None, "engines": engines, "failed": failed, "wall": out["wall_s"]}
    best = summary["best"]
    print(f"[{name}] {len(trials) - 1} trials in {out['wall_s']:.0f} s: {len(done)} complete {engines}, "
          f"{len(failed)} failed, {len(feasible)} feasible; hypervolume {summary['hv']:.3f}")
    for t in failed[:5]:
        print(f"    failed trial {t['number']}: {(t.get('failure_reason') or '')[:160]}")
    if best:
        m = best["metrics"]
        extra = {k: round(m[k], 1) for k in ("compile_time_s", "export_time_s") if k in m}
        print(f"    best feasible: trial {best['number']} speedup {m['speedup']:.2f}x, accuracy "
              f"{m['accuracy'] - base['accuracy']:+.4f}, {best['params']} {extra}")
    return summary


def remeasure(db: str, names: dict[str, int], threads: int) -> dict[str, float]:
    """Rebuild each search's best trial and time them with the baseline, interleaved, in this process."""
    import torch
    from sqlmodel import Session

    from optagent.job import payload_for
    from optagent.storage import engine_for, find_job, get_trial
    from optagent.trial.measure import MeasureSettings, interleaved
    from optagent.trial.pipeline import _batch, build

    torch.set_num_threads(threads)
    engine = engine_for(db)
    models, baseline, batch = {}, None, None
    for name, number in names.items():
        with Session(engine) as s:
            job = find_job(s, name)
            payload = payload_for(job, get_trial(s, job.id, number)).replace(threads=threads)
        built = build(payload)
        models[name] = built.model
        baseline = built.ctx.baseline
        batch = _batch(built.model_file, built.ctx.infer_batch_size, built.ctx.device)
    assert baseline is not None
    calls = {"baseline": lambda: baseline(batch), **{n: (lambda m=m: m(batch)) for n, m in models.items()}}
    stats = interleaved(calls, MeasureSettings(warmup=20, min_reps=100, max_reps=400, min_time_s=3, max_time_s=10))
    b = stats["baseline"]
    print(f"\nre-measured interleaved in one process ({threads} threads, {b.reps} rounds, baseline "
          f"{b.median_ms:.2f} ms, spread {b.spread:.1%}):")
    out = {}
    for name in names:
        out[name] = b.median_ms / stats[name].median_ms
        print(f"    {name:>9}: {out[name]:.2f}x (spread {stats[name].spread:.1%})")
    return out


def main() -> None:
    from optagent.trial.pipeline import steady_allocator

    # time like a trial process (glibc keeps large allocations on the heap): without it, eager fp32 at
    # batch 64 timed 62 ms here against 48.5 ms in the search's trial processes, inflating ratios to eager
    steady_allocator()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--workers", type=int, default=1, help="1 keeps trials from disturbing each other's timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--strategies", default=EAGER, help="the eager-only set; the other search adds runtime")
    ap.add_argument("--no-remeasure", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="optagent-runtimes-"))
    db = f"sqlite:///{work / 'bench.db'}"
    env = {**os.environ, "OPTAGENT_CACHE_DIR": os.environ.get("OPTAGENT_CACHE_DIR", str(work / "cache"))}
    os.environ["OPTAGENT_CACHE_DIR"] = env["OPTAGENT_CACHE_DIR"]
    print(f"digits CNN, {args.trials} trials each, sampler {args.sampler}, seed {args.seed}, {args.threads} threads")
    eager = summarise("eager", search("eager", args.strategies, args, db, env))
    runtimes = summarise("runtimes", search("runtimes", args.strategies + ",runtime", args, db, env))

    best_e = eager["best"]["metrics"]["speedup"] if eager["best"] else 1.0
    best_r = runtimes["best"]["metrics"]["speedup"] if runtimes["best"] else 1.0
    print(f"\nsearch-time figures: best feasible speedup runtimes/eager = {best_r:.2f}x / {best_e:.2f}x = "
          f"{best_r / best_e:.2f}; hypervolume runtimes/eager = {runtimes['hv']:.3f} / {eager['hv']:.3f} = "
          f"{runtimes['hv'] / eager['hv'] if eager['hv'] else float('inf'):.2f}")
    if not args.no_remeasure and eager["best"] and runtimes["best"]:
        ratio = remeasure(db, {"eager": eager["best"]["number"], "runtimes": runtimes["best"]["number"]}, args.threads)
        print(f"re-measured best feasible speedup runtimes/eager = {ratio['runtimes'] / ratio['eager']:.2f}")


if __name__ == "__main__":
    main()
