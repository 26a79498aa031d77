"""A Redis restart mid-search, several times in a row (issue 18 target: 5 of 5 with exactly N trials, none
twice, exit 0).

Each round starts a throwaway redis-server (append-only, own data directory), two `optagent worker`
processes and an `optagent search` coordinator; once two trials are complete, Redis is stopped, kept down
for --down seconds and started again on the same port and data directory (tests/_redis_restart.py).

    python benchmarks/redis_restart.py [--rounds 5] [--trials 8] [--down 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    from _redis_restart import restart_mid_search

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--down", type=float, default=8.0, help="seconds Redis stays down")
    args = parser.parse_args()
    good = 0
    for i in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory(prefix="optagent-restart-") as tmp:
            run = restart_mid_search(Path(tmp), trials=args.trials, down_s=args.down)
        rows = run.status["trials"]
        numbers = [t["number"] for t in rows]
        complete = [t for t in run.measured if t["state"] == "complete"]
        unique = len(numbers) == len(set(numbers))
        lost_back = (run.stderr.count("lost the broker"), run.stderr.count("is back after"))
        ok = (run.returncode == 0 and run.status["status"] == "completed" and len(complete) == args.trials
              and len(run.measured) == args.trials and unique and all(t["state"] == "complete" for t in rows))
        good += ok
        print(f"round {i}: exit {run.returncode}, job {run.status['status']}, {len(complete)}/{args.trials} measured "
              f"trials complete ({len(rows) - 1 - len(run.measured)} answered from a twin), numbers unique: {unique}, "
              f"Redis restarted after {run.restarted_after} measured, broker lost/back lines {lost_back}, "
              f"{run.seconds:.0f} s -> {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            print(run.stderr[-3000:], file=sys.stderr)
    print(f"{good} of {args.rounds} rounds: exactly {args.trials} trials, none twice, exit 0")
    return 0 if good == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
