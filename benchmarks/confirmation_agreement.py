"""Do the confirmed speedups agree with the search-time speedups, within the reported noise band?

1. Runs the README's demo search (`optagent search examples/digits_cnn.py`, 12 trials, 2 local workers,
   pruning + finetune + quantization + batch_size, SQLite in a temp dir) with its confirmation pass: the
   Pareto trials re-measured interleaved with the baseline in `--processes` fresh processes.
2. Runs the same confirmation on every other completed trial too (one payload, the product's own
   `optagent.trial.confirm`), so the check covers int8, bf16, pruned and unchanged models, not just the front.

For each trial it prints the search-time speedup (measured in the trial's own process, as the search
stored it), the confirmed speedup with its 95% noise band, the per-process speedups, the in-process
bootstrap band of one process (what the band was before it included the process-to-process spread) and
whether the search-time speedup falls inside each band. Target: every Pareto trial inside its band, and
about 95% of all trials (a 95% band misses one measurement in twenty by design).

    python benchmarks/confirmation_agreement.py [--seed 0] [--trials 12] [--workers 2] [--processes 3]
                                                [--json out.json]
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


def _search(args: argparse.Namespace, db: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "optagent.cli", "search", str(MODEL), "--trials", str(args.trials),
                    "--workers", str(args.workers), "--seed", str(args.seed), "--db", db, "--quiet",
                    "--strategies", "pruning,finetune,quantization,batch_size",
                    "--confirm-processes", str(args.processes)], check=True, env=env)
    return time.perf_counter() - started


def _confirm_rest(db: str, numbers: list[int], processes: int) -> dict[str, Any]:
    """The product's confirmation pass on the given trials, run from this process."""
    from sqlmodel import Session

    from optagent.job import JobConfig, payload_for
    from optagent.search.confirmation import confirmation_payload
    from optagent.storage import engine_for, find_job, job_trials
    from optagent.trial import run_trial

    with Session(engine_for(db)) as s:
        job = find_job(s, "1")
        rows = {t.number: t for t in job_trials(s, job.id)}
        cfg = JobConfig.of(job)
        cfg.confirm_processes = processes
        base = payload_for(job, rows[0])
    payload = confirmation_payload(cfg, base, {n: rows[n] for n in numbers}).replace(time_limit_s=None).to_json()
    result = run_trial(payload)
    if result["state"] != "complete":
        raise SystemExit(f"confirmation failed: {result['failure_reason']}")
    return result


def _bootstrap_band(samples: dict[str, dict[str, list[float]]], number: int) -> tuple[float, float] | None:
    """The in-process 95% band of one process's samples (the band a single-process confirmation gives)."""
    from optagent.trial.measure import speedup_band

    for by_name in samples.values():
        if str(number) in by_name:
            band = speedup_band(by_name["baseline"], by_name[str(number)])
            return band.low, band.high
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="local workers of the search")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    from sqlmodel import Session

    from optagent.storage import engine_for, find_job, job_trials

    work = Path(tempfile.mkdtemp(prefix="optagent-agree-"))
    db = f"sqlite:///{work / 'agree.db'}"
    env = {**os.environ, "OPTAGENT_CACHE_DIR": os.environ.get("OPTAGENT_CACHE_DIR", str(work / "cache"))}
    os.environ["OPTAGENT_CACHE_DIR"] = env["OPTAGENT_CACHE_DIR"]
    search_s = _search(args, db, env)
    with Session(engine_for(db)) as s:
        job = find_job(s, "1")
        trials = [t for t in job_trials(s, job.id) if t.number > 0 and t.state == "complete"]
    front = {t.number: t.metrics for t in trials if "confirmed_speedup" in t.metrics}
    rest = [t.number for t in trials if t.number not in front]
    started = time.perf_counter()
    extra = (_confirm_rest(db, rest, args.processes) if rest
             else {"confirmations": {}, "samples": [], "noise": None, "phase_noise": None})
    rest_s = time.perf_counter() - started

    searched = {t.number: t.metrics["speedup"] for t in trials}
    rows: list[dict[str, Any]] = []
    for t in trials:
        if t.number in front:
            m = front[t.number]
            conf = {"speedup": m["confirmed_speedup"], "low": m["confirmed_speedup_low"],
                    "high": m["confirmed_speedup_high"], "runs": m.get("confirmed_speedup_runs", [])}
            one = None
        else:
            conf = extra["confirmations"].get(str(t.number), {})
            one = _bootstrap_band(extra["samples"][0], t.number) if extra["samples"] else None
        if "speedup" not in conf:
            rows.append({"trial": t.number, "error": conf.get("error", "not confirmed")})
            continue
        s = searched[t.number]
        rows.append({"trial": t.number, "front": t.number in front, "recipe": t.recipe, "search": s,
                     "confirmed": conf["speedup"], "low": conf["low"], "high": conf["high"], "runs": conf["runs"],
                     "inside": conf["low"] <= s <= conf["high"], "one_process_band": one,
                     "inside_one_process": None if one is None else one[0] <= s <= one[1],
                     "off": s / conf["speedup"] - 1})

    print(f"search: {args.trials} trials, {args.workers} workers, seed {args.seed}, {search_s:.0f} s (with the "
          f"confirmation of the Pareto trials); confirming the other {len(rest)} completed trials: {rest_s:.0f} s; "
          f"{args.processes} fresh processes each")
    front_phase = next((m["confirmed_phase_noise"] for m in front.values() if "confirmed_phase_noise" in m),
                       float("nan"))
    print(f"process-to-process noise (sd of log speedup, pooled): Pareto pass "
          f"{next((m.get('confirmed_noise') for m in front.values() if 'confirmed_noise' in m), float('nan')):.4f}, "
          f"other trials {extra['noise'] if extra['noise'] is not None else float('nan'):.4f}; phase noise within a "
          f"process: Pareto pass {front_phase:.4f}, "
          f"other trials {extra.get('phase_noise') or 0.0:.4f}")
    print(f"{'trial':>5} {'front':>5} {'search':>8} {'confirmed':>10} {'95% noise band':>17} {'off':>7} "
          f"{'in':>3} {'one-process band':>17} {'in':>3}  per-process speedups")
    for r in rows:
        if "error" in r:
            print(f"{r['trial']:>5} not confirmed: {r['error']}")
            continue
        one = r["one_process_band"]
        print(f"{r['trial']:>5} {'yes' if r['front'] else '':>5} {r['search']:>7.3f}x {r['confirmed']:>9.3f}x "
              f"{r['low']:>7.3f}-{r['high']:<7.3f}x {r['off']:>+6.1%} {'Y' if r['inside'] else 'N':>3} "
              f"{(f'{one[0]:.3f}-{one[1]:.3f}x' if one else '(front)'):>17} "
              f"{'' if r['inside_one_process'] is None else ('Y' if r['inside_one_process'] else 'N'):>3}  "
              + ", ".join(f"{v:.3f}" for v in r["runs"]))
    ok = [r for r in rows if "error" not in r]
    fronts = [r for r in ok if r["front"]]
    ones = [r for r in ok if r["inside_one_process"] is not None]
    print(f"inside the noise band: Pareto trials {sum(r['inside'] for r in fronts)}/{len(fronts)}, "
          f"all trials {sum(r['inside'] for r in ok)}/{len(ok)}; inside a one-process bootstrap band: "
          f"{sum(r['inside_one_process'] for r in ones)}/{len(ones)}")
    if ok:
        print(f"|search / confirmed - 1|: median {statistics.median(abs(r['off']) for r in ok):.2%}, "
              f"max {max(abs(r['off']) for r in ok):.2%}; band half-width: median "
              f"{statistics.median((r['high'] - r['low']) / 2 / r['confirmed'] for r in ok):.2%}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "search_s": search_s, "rest_s": rest_s,
                                         "noise_rest": extra["noise"]}, indent=1))


if __name__ == "__main__":
    main()
