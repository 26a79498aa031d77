"""How fast the search finds a good front: optagent's default against plain random search, over seeds.

On the digits example with runtimes searched, each seed runs two searches through the library API:

- optagent's default: TPE with failures as violated constraints, the warm start, early stopping of
  hopeless fine-tuning, dedup of repeated parameter sets;
- plain random: `sampler=random`, no warm start, no early stopping, no dedup (every sample runs).

It prints the hypervolume (optagent.search.front.hypervolume_history: unitless, 0 until a trial beats the
baseline on latency within the constraint) after each trial, the median over seeds after 20 and after
`--random-trials` trials, and the median wall time to reach 95% of each search's final hypervolume. The
hypervolume uses each trial's paired speedup (latency relative to its own interleaved baseline), so
searches run at different moments of machine load stay comparable.

    python benchmarks/search_efficiency.py [--seeds 5] [--trials 20] [--random-trials 60] [--workers 2]

Targets (issue 17): the default's median hypervolume after 20 trials >= random search's after 60; its
median time to 95% of the final hypervolume at most half of the previous release's (give that figure with
--before-s, measured by running this benchmark at the earlier commit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "digits_cnn.py"


def run(name: str, seed: int, trials: int, args: argparse.Namespace, db: str, plain: bool) -> dict[str, Any]:
    from optagent import api
    from optagent.search.front import hypervolume_history

    started = time.perf_counter()
    options: dict[str, Any] = {"sampler": "random", "warm_start": False, "pruner": "none", "dedup": False} \
        if plain else {}
    report = api.search(MODEL, db=db, name=name, n_trials=trials, seed=seed, workers=args.workers,
                        threads=args.threads, confirm=False, **options)
    history = hypervolume_history(report.job, report.trials)
    numbers, volumes = (history[0], history[1]) if history else ([], [])
    final = volumes[-1] if volumes else 0.0
    # when each trial finished, from its row: the job's start to the trial's end
    begun = _aware(report.job.started_at or report.job.created_at)
    done = {t.number: (_aware(t.finished_at) - begun).total_seconds() for t in report.trials if t.finished_at}
    reach = next((done.get(n, 0.0) for n, v in zip(numbers, volumes, strict=True) if v >= 0.95 * final),
                 None) if final > 0 else None
    return {"numbers": numbers, "volumes": volumes, "final": final, "time_to_95_s": reach,
            "wall_s": time.perf_counter() - started,
            "failed": sum(t.state == "failed" for t in report.trials if t.number > 0)}


def _aware(when: Any) -> Any:
    import datetime as dt

    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def after(result: dict[str, Any], n: int) -> float:
    """Hypervolume once `n` trials (besides the baseline) have finished."""
    done = [v for i, v in enumerate(result["volumes"]) if i <= n]
    return done[-1] if done else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=20, help="trials of optagent's default search")
    ap.add_argument("--random-trials", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before-s", type=float, help="median time to 95%% of the final hypervolume before this change")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="optagent-efficiency-"))
    os.environ.setdefault("OPTAGENT_CACHE_DIR", str(work / "cache"))
    db = f"sqlite:///{work / 'efficiency.db'}"
    results: dict[str, list[dict[str, Any]]] = {"default": [], "random": []}
    for seed in range(args.seeds):
        for kind, trials, plain in (("default", args.trials, False), ("random", args.random_trials, True)):
            r = run(f"{kind}-{seed}", seed, trials, args, db, plain)
            results[kind].append(r)
            print(f"seed {seed} {kind:<7}: hypervolume after 20 {after(r, 20):.4f}, final {r['final']:.4f} after "
                  f"{len(r['volumes']) - 1} trials ({r['failed']} failed), 95% reached at "
                  f"{r['time_to_95_s'] or float('nan'):.0f} s of {r['wall_s']:.0f} s", flush=True)
    default20 = statistics.median(after(r, 20) for r in results["default"])
    random_n = statistics.median(after(r, args.random_trials) for r in results["random"])
    reach = [r["time_to_95_s"] for r in results["default"] if r["time_to_95_s"] is not None]
    print(f"median hypervolume: default after 20 = {default20:.4f}; random after {args.random_trials} = "
          f"{random_n:.4f} ({'met' if default20 >= random_n else 'not met'})")
    if reach:
        median_reach = statistics.median(reach)
        verdict = "" if args.before_s is None else \
            f" against {args.before_s:.0f} s before ({'met' if median_reach <= args.before_s / 2 else 'not met'})"
        print(f"median time to 95% of the final hypervolume (default): {median_reach:.0f} s{verdict}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
