"""Orchestration benchmarks for distributed search (issue 3 targets), on real Redis and real workers.

1. Overhead: a near-no-op trial (tiny model, minimal timing) through the whole path -- coordinator, Redis,
   worker, result, SQL -- minus the trial's own duration, against the floor of in-process Optuna ask/tell on
   the same storage, serial (one trial in flight) and pipelined (the default window: one trial queued
   behind each worker). Target: at most 10 ms (median) above the floor.
2. Throughput of 1 against 2 workers on compute-bound trials (one thread each). Target: >= 1.8x.
3. Coordinator overhead per trial at trial 100 against trial N (default 2,000), with an executor that
   answers instantly, so only Optuna, SQL and bookkeeping are timed. Target: at most 1.5x.

    python benchmarks/orchestration.py [--broker redis://127.0.0.1:6379/13] [--db sqlite:///x.db]
                                       [--trials 40] [--rounds 3] [--compute-trials 8]
                                       [--scaling-trials 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
import optagent

WIDTH = {width}

def load_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 3)).eval()

def load_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, WIDTH, generator=g), torch.randint(0, 3, (32,), generator=g)
    return optagent.Data(train=TensorDataset(x, y), eval=TensorDataset(x, y))

def evaluate(model, loader):
    correct = total = 0
    for xb, yb in loader:
        correct += int((model(xb).argmax(1) == yb).sum())
        total += len(yb)
    return {{"accuracy": correct / total}}

def example_input():
    return torch.randn(8, WIDTH)
'''
NOOP_MEASURE = {"warmup": 1, "min_reps": 3, "max_reps": 3, "min_time_s": 0.0, "max_time_s": 0.05}
COMPUTE_MEASURE = {"warmup": 5, "min_reps": 50, "max_reps": 100000, "min_time_s": 1.5, "max_time_s": 1.5,
                   "target_spread": 0.0}


def _model(tmp: Path, width: int) -> Path:
    path = tmp / f"bench_model_{width}.py"
    path.write_text(MODEL.format(width=width))
    return path


@contextlib.contextmanager
def workers(broker: str, queue: str, n: int, tmp: Path) -> Iterator[None]:
    """n real `optagent worker` processes (own process groups), stopped by pid."""
    env = {**os.environ, "OPTAGENT_BROKER_URL": broker, "OMP_NUM_THREADS": "1",
           "OPTAGENT_CACHE_DIR": str(tmp / "cache")}
    procs, logs = [], []
    for i in range(n):
        log = tmp / f"worker-{queue}-{i}.log"
        logs.append(log)
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", "from optagent.cli.worker import main; main()", "--queue", queue,
                 "--concurrency", "1", "--hostname", f"bench{i}-{queue}@%h", "--loglevel", "warning"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        from optagent.executors.celery import CeleryExecutor

        probe = CeleryExecutor(broker, queue, "probe", capacity=1)
        deadline = time.monotonic() + 90
        while probe.workers() < n:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start:\n" + "\n".join(p.read_text()[-2000:] for p in logs))
            time.sleep(0.2)
        probe.close()
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def run_job(db: str, model: Path, n_trials: int, executor_factory: Any, measure: dict[str, Any],
            strategies: list[str] | None = None, executor: str = "celery") -> dict[str, Any]:
    """Run one search job; returns per-trial start/end times and durations from the coordinator's events."""
    from optagent.job import JobConfig
    from optagent.registry import build_registry
    from optagent.search import Coordinator, create_job
    from optagent.storage import init_db

    engine = init_db(db)
    cfg = JobConfig(model_path=str(model), objectives=["accuracy:max", "latency_ms:min"],
                    strategies=strategies or [], n_trials=n_trials, threads=1, device="cpu", measure=measure,
                    executor=executor, sampler="tpe")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    job = create_job(engine, cfg, f"bench-{uuid.uuid4().hex[:8]}", digest)
    started: dict[int, float] = {}
    finished: dict[int, float] = {}
    durations: dict[int, float] = {}

    def on_event(kind: str, data: dict[str, Any]) -> None:
        now = time.perf_counter()
        if kind == "trial_started":
            started[data["number"]] = now
        elif kind == "trial_finished":
            number = data["trial"]["number"]
            finished[number] = now
            durations[number] = float(data["trial"].get("duration_s") or 0.0)

    registry = build_registry()
    assert job.id is not None
    coordinator = Coordinator(engine, db, job.id, registry,
                              executor_factory(f"{job.id}-{digest[:8]}-{uuid.uuid4().hex[:4]}"), on_event=on_event)
    optuna_ms: dict[int, float] = {}  # Optuna's own work per trial: ask, sampling (suggest) and tell
    ask = coordinator.study.ask

    def timed_ask(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        trial = ask(*a, **k)
        optuna_ms[trial.number] = (time.perf_counter() - t0) * 1000
        return trial

    import optagent.search.study as glue

    tell = glue.tell  # the coordinator's tell (Study.tell without reading the finished trial back)

    def timed_tell(study: Any, trial: Any, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = tell(study, trial, *a, **k)
        number = trial if isinstance(trial, int) else trial.number
        optuna_ms[number] = optuna_ms.get(number, 0.0) + (time.perf_counter() - t0) * 1000
        return out

    coordinator.study.ask = timed_ask  # type: ignore[method-assign]
    glue.tell = timed_tell  # type: ignore[assignment]

    suggest = coordinator.space.suggest  # define-by-run: the sampler does its work inside trial.suggest_* calls

    def timed_suggest(trial: Any) -> Any:
        t0 = time.perf_counter()
        out = suggest(trial)
        optuna_ms[trial.number] = optuna_ms.get(trial.number, 0.0) + (time.perf_counter() - t0) * 1000
        return out

    coordinator.space.suggest = timed_suggest  # type: ignore[method-assign]
    try:
        coordinator.run()
    finally:
        glue.tell = tell  # type: ignore[assignment]
    return {"started": started, "finished": finished, "durations": durations, "optuna_ms": optuna_ms}


def optuna_floor(db: str, n: int, sampler: str = "tpe") -> float:
    """Median ms per in-process ask/tell on the same storage, with the sampler a job of `n` trials uses
    (TPE: multivariate, grouped, constant liar): the cost no orchestration can avoid."""
    import optuna

    from optagent.job import JobConfig
    from optagent.search.study import make_sampler, optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = JobConfig(model_path="floor", objectives=["accuracy:max", "latency_ms:min"], n_trials=n, sampler=sampler)
    study = optuna.create_study(storage=optuna_storage(db), study_name=f"floor-{uuid.uuid4().hex[:8]}",
                                directions=["maximize", "minimize"], sampler=make_sampler(cfg))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        trial = study.ask()
        study.tell(trial, [1.0, 1.0])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[2:])


def _serial_overhead(run: dict[str, Any]) -> float:
    """Median wall time per trial outside the trial's own duration, one trial in flight."""
    numbers = sorted(n for n in run["finished"] if n in run["started"])[2:]  # skip warm-up trials
    walls = [(run["finished"][n] - run["started"][n]) * 1000 for n in numbers]
    # the next trial starts only after the previous one is told, so the gap between them is overhead too
    gaps = [(run["started"][n + 1] - run["finished"][n]) * 1000 for n in numbers if n + 1 in run["started"]]
    overhead = [w - run["durations"][n] * 1000 for w, n in zip(walls, numbers, strict=True)]
    return statistics.median(overhead) + (statistics.median(gaps) if gaps else 0.0)


def bench_overhead(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Two figures. Serial: one trial in flight (capacity 1), so every step -- ask, SQL, Redis, worker, result,
    tell -- is on the critical path: wall time per trial outside the trial's own duration. It is measured in
    `--rounds` rounds, each a job and then the floor on the same storage, so slow phases of a shared machine
    hit both alike; the figure is the median over rounds of (job - floor). Pipelined: the executor's default
    window (live workers + 1 queued), as `optagent search --broker` runs: the median gap between consecutive
    trial completions minus the trial's duration, i.e. what a trial costs in wall time beyond its own work
    when the coordinator asks and tells while the worker computes."""
    from optagent.executors.celery import CeleryExecutor

    queue = f"bench-{uuid.uuid4().hex[:6]}"
    model = _model(tmp, 4)
    rounds: list[dict[str, float]] = []
    with workers(args.broker, queue, 1, tmp):
        for _ in range(args.rounds):
            serial = run_job(args.db, model, args.trials,
                             lambda key: CeleryExecutor(args.broker, queue, key, capacity=1), NOOP_MEASURE)
            floor = optuna_floor(args.db, args.trials)
            per_trial = _serial_overhead(serial)
            rounds.append({"serial_ms": per_trial, "optuna_floor_ms": floor, "added_ms": per_trial - floor,
                           "trial_duration_ms": statistics.median(d * 1000 for d in serial["durations"].values())})
        piped = run_job(args.db, model, args.trials, lambda key: CeleryExecutor(args.broker, queue, key),
                        NOOP_MEASURE)
        floor = optuna_floor(args.db, args.trials)
    done = sorted(piped["finished"].items(), key=lambda kv: kv[1])[2:]
    intervals = [(b[1] - a[1]) * 1000 - piped["durations"][b[0]] * 1000 for a, b in zip(done, done[1:], strict=False)]
    pipelined = statistics.median(intervals)
    added = [r["added_ms"] for r in rounds]
    return {"serial_added_ms": statistics.median(added), "serial_added_ms_range": [min(added), max(added)],
            "serial_ms": statistics.median(r["serial_ms"] for r in rounds),
            "optuna_floor_ms": statistics.median(r["optuna_floor_ms"] for r in rounds),
            "serial_ratio": statistics.median(r["serial_ms"] / r["optuna_floor_ms"] for r in rounds),
            "rounds": rounds, "pipelined_ms": pipelined, "pipelined_floor_ms": floor,
            "pipelined_added_ms": pipelined - floor}


def bench_throughput(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    from optagent.executors.celery import CeleryExecutor

    model = _model(tmp, 256)
    rates = {}
    for n in (1, 2):
        queue = f"bench-{uuid.uuid4().hex[:6]}"
        with workers(args.broker, queue, n, tmp):
            run = run_job(args.db, model, args.compute_trials,
                          lambda key, q=queue: CeleryExecutor(args.broker, q, key), COMPUTE_MEASURE)
        numbers = [k for k in run["finished"] if k > 0]
        span = max(run["finished"][k] for k in numbers) - min(run["started"][k] for k in numbers)
        rates[n] = len(numbers) / span
    return {"trials_per_s_1_worker": rates[1], "trials_per_s_2_workers": rates[2], "speedup": rates[2] / rates[1]}


class InstantExecutor:
    """Answers every trial at once with a copy of a real result: only the coordinator's own work is timed."""

    capacity = 1

    def __init__(self, result: dict[str, Any]):
        self.result, self.pending = result, []  # type: ignore[var-annotated]

    def submit(self, number: int, payload: dict[str, Any]) -> None:
        self.pending.append(number)

    def poll(self, timeout: float) -> list[Any]:
        from optagent.executors import Outcome

        out = []
        for n in self.pending:
            r = copy.deepcopy(self.result)
            r["trial"] = n
            r["metrics"]["latency_ms"] *= 1 + (n % 17) / 100
            out.append(Outcome(n, r))
        self.pending = []
        return out

    def in_flight(self) -> set[int]:
        return set(self.pending)

    def cancel(self) -> None:
        self.pending = []

    def close(self) -> None:
        pass


def bench_scaling(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    from optagent.registry import build_registry
    from optagent.trial import run_trial

    model = _model(tmp, 16)
    source = model.read_bytes()
    result = run_trial({"version": 1, "trial": 0, "job": {"id": 0, "name": "bench"},
                        "model": {"path": str(model), "sha256": hashlib.sha256(source).hexdigest()},
                        "params": {}, "strategies": [], "objectives": ["accuracy:max"], "seed": 0, "threads": 1,
                        "device": "cpu", "measure": NOOP_MEASURE})
    assert result["state"] == "complete", result["failure_reason"]
    strategies = list(build_registry().strategies)  # the real search space, so the sampler does real work
    run = run_job(args.db, model, args.scaling_trials, lambda key: InstantExecutor(result), NOOP_MEASURE,
                  strategies=strategies, executor="local")
    ends = run["finished"]
    per = {n: (ends[n] - ends[n - 1]) * 1000 for n in ends if n - 1 in ends}
    own = {n: per[n] - run["optuna_ms"].get(n, 0.0) for n in per}  # optagent's share: all but Optuna's

    def around(values: dict[int, float], k: int) -> float:
        return statistics.median([values[n] for n in range(k - 10, k + 10) if n in values])

    last = max(per)
    early, late = around(per, 100), around(per, last - 10)
    own_early, own_late = around(own, 100), around(own, last - 10)
    return {"ms_per_trial_at_100": early, f"ms_per_trial_at_{last}": late, "ratio": late / early,
            "optagent_ms_per_trial_at_100": own_early, f"optagent_ms_per_trial_at_{last}": own_late,
            "optagent_ratio": own_late / own_early,
            "optuna_ms_at_100": early - own_early, f"optuna_ms_at_{last}": late - own_late}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default=os.environ.get("OPTAGENT_BROKER_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--db", default=None, help="storage URL [default: a fresh SQLite file]")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="serial overhead rounds (job, then floor)")
    parser.add_argument("--compute-trials", type=int, default=8)
    parser.add_argument("--scaling-trials", type=int, default=2000, help="0 skips the scaling benchmark")
    parser.add_argument("--only", choices=["overhead", "throughput", "scaling"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="optagent-bench-") as name:
        tmp = Path(name)
        args.db = args.db or f"sqlite:///{tmp / 'bench.db'}"
        os.environ.setdefault("OPTAGENT_CACHE_DIR", str(tmp / "cache"))
        report: dict[str, Any] = {"broker": "redacted", "db": args.db.split("@")[-1]}
        if args.only in (None, "overhead"):
            report["overhead"] = bench_overhead(args, tmp)
        if args.only in (None, "throughput"):
            report["throughput"] = bench_throughput(args, tmp)
        if args.only in (None, "scaling") and args.scaling_trials:
            report["scaling"] = bench_scaling(args, tmp)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
