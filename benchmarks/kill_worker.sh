#!/usr/bin/env bash
# Kill-a-worker, repeated: each run starts 2 real workers, SIGKILLs the process evaluating a trial mid-trial,
# and checks the job ends with exactly the requested completed trials, each number once, none RUNNING
# (tests/test_distributed_search.py::test_a_worker_killed_mid_trial_costs_a_rerun_not_a_trial).
#     benchmarks/kill_worker.sh [REPETITIONS]   (default 10; needs Redis and PostgreSQL like the tests)
set -u
cd "$(dirname "$0")/.."
n="${1:-10}"
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
ok=0
for i in $(seq 1 "$n"); do
  start=$(date +%s)
  if "$py" -m pytest -q -p no:cacheprovider \
      "tests/test_distributed_search.py::test_a_worker_killed_mid_trial_costs_a_rerun_not_a_trial" >/tmp/kill-worker-$i.log 2>&1; then
    ok=$((ok + 1)); echo "run $i: exactly-once ($(( $(date +%s) - start )) s)"
  else
    echo "run $i: FAILED, see /tmp/kill-worker-$i.log"
  fi
done
echo "kill-a-worker: $ok of $n runs ended with exactly the requested completed trials, no duplicates"
