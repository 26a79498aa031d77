"""Fixed-budget search on the digits example: best speedup within the 1% accuracy constraint.

Runs `optagent search examples/digits_cnn.py` (local processes, SQLite in a temp dir), then re-measures
the best feasible candidates against the baseline *interleaved in this one process* (same inputs, same
threads, round-robin) so the reported ratio does not depend on how loaded the machine was during the
search. Prints the search-time and re-measured speedups, the accuracy change and the wall time.

    python benchmarks/digits_search.py [--trials 40] [--workers 2] [--threads 2] [--seed 0]
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

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "digits_cnn.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads for the final re-measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=3, help="feasible candidates to re-measure")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="optagent-bench-"))
    db = f"sqlite:///{work / 'bench.db'}"
    env = {**os.environ, "OPTAGENT_CACHE_DIR": os.environ.get("OPTAGENT_CACHE_DIR", str(work / "cache"))}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "optagent.cli", "search", str(MODEL), "--trials", str(args.trials),
                           "--workers", str(args.workers), "--seed", str(args.seed), "--db", db, "--name", "bench",
                           "--json", "--quiet"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"search failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    trials = out["trials"]
    base = trials[0]["metrics"]
    done = [t for t in trials[1:] if t["state"] == "complete"]
    feasible = sorted((t for t in done if t["feasible"]), key=lambda t: -t["metrics"]["speedup"])
    print(f"search: {args.trials} trials + baseline, {args.workers} workers, wall {wall:.0f} s "
          f"({len(done)} complete, {len(trials) - 1 - len(done)} failed, {len(feasible)} feasible, "
          f"front {sum(t['on_front'] for t in trials)})")
    print(f"baseline: accuracy {base['accuracy']:.4f}, latency {base['latency_ms']:.2f} ms at batch "
          f"{base['batch_size']:.0f}, self-speedup {base['speedup']:.3f} (noise floor)")
    if not feasible:
        sys.exit("no feasible trial")

    os.environ["OPTAGENT_CACHE_DIR"] = env["OPTAGENT_CACHE_DIR"]
    import torch
    from sqlmodel import Session

    from optagent.job import payload_for
    from optagent.storage import engine_for, find_job, get_trial
    from optagent.trial.measure import MeasureSettings, interleaved
    from optagent.trial.pipeline import _batch, build

    torch.set_num_threads(args.threads)
    engine = engine_for(db)
    with Session(engine) as s:
        job = find_job(s, "bench")
        rows = {t["number"]: get_trial(s, job.id, t["number"]) for t in feasible[: args.top]}
        payloads = {n: payload_for(job, row).replace(threads=args.threads) for n, row in rows.items()}
    models = {}
    baseline = None
    for n, payload in payloads.items():
        built = build(payload)
        models[n] = built.model
        baseline = built.ctx.baseline
        mf = built.model_file
        batch = _batch(mf, built.ctx.infer_batch_size, built.ctx.device)
    assert baseline is not None
    calls = {"baseline": lambda: baseline(batch), **{f"t{n}": (lambda m=m: m(batch)) for n, m in models.items()}}
    stats = interleaved(calls, MeasureSettings(warmup=20, min_reps=200, max_reps=400, min_time_s=3, max_time_s=12))
    b = stats["baseline"]
    print(f"\nre-measured in one process, {args.threads} threads, interleaved, {b.reps} rounds each "
          f"(baseline {b.median_ms:.2f} ms, spread IQR/median {b.spread:.1%}):")
    print(f"{'trial':>6} {'search speedup':>15} {'re-measured':>12} {'paired band (IQR)':>18} "
          f"{'Δaccuracy':>10}  recipe")
    for t in feasible[: args.top]:
        n = t["number"]
        c = stats[f"t{n}"]
        ratios = sorted(x / y for x, y in zip(b.samples_ms, c.samples_ms, strict=False))
        q = statistics.quantiles(ratios, n=4)
        change = t["metrics"]["accuracy"] - base["accuracy"]
        print(f"{n:>6} {t['metrics']['speedup']:>14.2f}x {b.median_ms / c.median_ms:>11.2f}x "
              f"{q[0]:>8.2f}-{q[2]:<8.2f} {change:>+10.4f}  {t['recipe']}")
    best = feasible[0]
    c = stats[f"t{best['number']}"]
    print(f"\nBEST within {0.01:.0%} accuracy drop: trial {best['number']}, {b.median_ms / c.median_ms:.2f}x lower "
          f"latency than the fp32 baseline (re-measured), accuracy change "
          f"{best['metrics']['accuracy'] - base['accuracy']:+.4f}, search wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
