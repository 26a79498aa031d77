"""End-to-end searches through the real CLI on a tiny model (local processes, SQLite)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import Session

from optagent.search.front import dominates
from optagent.storage import engine_for, find_job, job_trials

FIXTURES = Path(__file__).parent / "fixtures"
OPTAGENT = [sys.executable, "-m", "optagent.cli"]


def run(*args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OPTAGENT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("search")
    for name in ("tiny_model.py", "broken_quant_model.py"):
        shutil.copy(FIXTURES / name, path / name)
    os.environ.setdefault("OPTAGENT_CACHE_DIR", str(path / "cache"))
    return path


@pytest.fixture(scope="module")
def finished_job(workdir: Path) -> dict:
    # the runtime engines have their own search test (test_runtime.py): without them the warm start does not
    # spend this search's trials on torch.compile, whose compile alone takes most of a minute here
    proc = run("search", "tiny_model.py", "--trials", "6", "--workers", "2", "--seed", "0", "--name", "tiny",
               "--strategies", "pruning,finetune,quantization,mixed_precision,batch_size", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_search_stores_every_trial_and_a_non_dominated_feasible_front(finished_job: dict, workdir: Path) -> None:
    trials = finished_job["trials"]
    assert [t["number"] for t in trials] == list(range(len(trials)))
    # baseline + 6 that ran; a parameter set drawn again is answered from its stored result and costs no budget
    assert len([t for t in trials if "reused_from" not in t["metrics"]]) == 7
    # pruned: recovery fine-tuning stopped early because it could not meet the constraint (--pruner)
    assert all(t["state"] in ("complete", "pruned") for t in trials) and trials[0]["state"] == "complete"
    baseline = trials[0]
    assert baseline["recipe"] == "baseline"
    # the baseline is measured like any trial: against itself its interleaved speedup is ~1
    assert 0.7 < baseline["metrics"]["speedup"] < 1.4
    front = [t for t in trials if t["on_front"]]
    assert front, "a search always has a Pareto front"
    signs = [1.0, -1.0]  # accuracy max, latency min
    for t in front:
        assert t["feasible"]
        assert t["metrics"]["accuracy"] >= baseline["metrics"]["accuracy"] - 0.01
        assert not any(dominates(o["values"], t["values"], signs) for o in trials if o["feasible"] and o is not t)
    for t in front:  # the confirmation pass re-measured every Pareto trial against the baseline, 3 times
        if t["number"] > 0:
            m = t["metrics"]
            assert m["confirmed_speedup_low"] <= m["confirmed_speedup_ci_low"] <= m["confirmed_speedup"]
            assert m["confirmed_speedup"] <= m["confirmed_speedup_ci_high"] <= m["confirmed_speedup_high"]
            assert m["confirmed_processes"] == len(m["confirmed_speedup_runs"]) == 3
            assert m["tie_group"] >= 1
    for t in trials:  # every feasible trial not on the front is dominated by a front member
        if t["feasible"] and not t["on_front"]:
            assert any(dominates(f["values"], t["values"], signs) for f in front)
    measured = [t for t in trials if t["state"] == "complete"]  # a pruned trial stopped before its timing
    assert len(measured) >= 4
    for t in measured:
        for key in ("accuracy", "latency_ms", "latency_per_sample_ms", "throughput", "model_size_mb",
                    "peak_memory_mb", "baseline_latency_ms"):
            assert key in t["metrics"], key
        assert t["hardware"]["threads"] == 1 and t["hardware"]["torch"]
    # every trial is on the job's one latency scale: the baseline trial's interleaved baseline latency over
    # the trial's paired speedup (two local workers on one host, one batch size: one reference)
    reference = baseline["metrics"]["baseline_latency_ms"]
    for t in measured:
        m = t["metrics"]
        assert m["latency_reference_ms"] == pytest.approx(reference)
        assert m["latency_ms"] == pytest.approx(reference / m["speedup"]) and m["latency_measured_ms"] > 0
        assert t["values"][1] == pytest.approx(m["latency_ms"])  # the objective is the calibrated latency


def test_study_lives_in_the_same_database(finished_job: dict, workdir: Path) -> None:
    import optuna

    engine = engine_for(f"sqlite:///{workdir / 'optagent.db'}")
    with Session(engine) as s:
        job = find_job(s, "tiny")
        rows = job_trials(s, job.id)
    study = optuna.load_study(study_name=job.study_name, storage=f"sqlite:///{workdir / 'optagent.db'}")
    assert len(study.trials) == len(rows) == len(finished_job["trials"])
    assert study.metric_names == ["accuracy", "latency_ms"]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)


def test_read_commands_have_json_and_tables(finished_job: dict, workdir: Path) -> None:
    jobs = json.loads(run("jobs", "--json", cwd=workdir).stdout)
    searched = len([t for t in finished_job["trials"] if t["state"] == "complete"]) - 1  # besides the baseline
    assert any(j["name"] == "tiny" and j["status"] == "completed" and j["complete"] == searched for j in jobs)
    status = json.loads(run("status", "tiny", "--json", cwd=workdir).stdout)
    assert status["complete"] == searched and len(status["trials"]) == len(finished_job["trials"])
    assert all(t["worker"]["host"] for t in status["trials"])
    pareto = json.loads(run("pareto", "tiny", "--json", cwd=workdir).stdout)
    assert {p["number"] for p in pareto["pareto"]} == {t["number"] for t in finished_job["trials"] if t["on_front"]}
    assert all("accuracy_change" in p and p["speedup"] > 0 for p in pareto["pareto"])
    table = run("pareto", "tiny", cwd=workdir)
    assert table.returncode == 0 and "speedup" in table.stdout and "baseline (trial 0)" in table.stdout


def test_failing_trials_are_recorded_and_the_search_goes_on(workdir: Path) -> None:
    proc = run("search", "broken_quant_model.py", "--trials", "6", "--strategies", "quantization,pruning",
               "--sampler", "random", "--seed", "3", "--name", "broken", "--confirm-processes", "1", "--json",
               cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    trials = json.loads(proc.stdout)["trials"]
    # the budget counts trials that ran: a parameter set drawn again is answered from its stored result
    ran = [t for t in trials if "reused_from" not in t["metrics"]]
    assert len(ran) == 7, [t["params"] for t in trials]
    by_number = {t["number"]: t for t in ran}
    for t in trials:
        if t not in ran:
            source = by_number[int(t["metrics"]["reused_from"])]
            assert source["recipe"] == t["recipe"] and source["state"] == t["state"]
    failed = [t for t in trials if t["state"] == "failed"]
    assert failed, "random sampling over 6 trials picks a quantization mode at least once with seed 3"
    assert all("only supports the original Net" in t["failure_reason"] for t in failed)
    assert any(t["state"] == "complete" for t in trials[1:])


@pytest.mark.parametrize("args, message", [
    (["search", "missing.py"], "does not exist"),
    (["search", "tiny_model.py", "--trials", "0"], "--trials must be at least 1"),
    (["search", "tiny_model.py", "--objective", "accuracy"], "NAME:max or NAME:min"),
    (["search", "tiny_model.py", "--strategies", "pruning,warp"], "unknown strategy 'warp'"),
    (["search", "tiny_model.py", "--sampler", "grid"], "--sampler 'grid' is unknown"),
    (["search", "tiny_model.py", "--max-accuracy-drop", "5"], "fraction between 0 and 1"),
    (["search", "tiny_model.py", "--db", "nodb"], "is not a URL"),
    (["search", "tiny_model.py", "--confirm-processes", "0"], "--confirm-processes must be at least 1"),
    (["status", "no-such-job"], "no job 'no-such-job'"),
    (["pareto", "12345"], "no job '12345'"),
])
def test_bad_input_is_one_line_and_exit_2(workdir: Path, args: list[str], message: str) -> None:
    proc = run(*args, cwd=workdir)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(workdir: Path) -> None:
    proc = run("--debug", "status", "no-such-job", cwd=workdir)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unknown_objective_metric_is_refused_before_the_job_exists(workdir: Path) -> None:
    proc = run("search", "tiny_model.py", "--trials", "1", "--objective", "bleu:max", "--name", "bad-objective",
               cwd=workdir)
    assert proc.returncode == 2
    assert "no trial measures 'bleu'" in proc.stderr and "evaluate() returns accuracy" in proc.stderr
    assert run("status", "bad-objective", cwd=workdir).returncode == 2  # no job was created


def test_check_names_missing_pieces(tmp_path: Path) -> None:
    bad = tmp_path / "bad_model.py"
    bad.write_text("def load_model():\n    return 3\n")
    proc = run("check", str(bad), cwd=tmp_path)
    assert proc.returncode == 2
    assert "load_data" in proc.stderr and "evaluate" in proc.stderr and "example_input" in proc.stderr


def test_a_trial_that_kills_or_hangs_its_process_fails_alone(workdir: Path) -> None:
    """crashy_model kills the process evaluating a smaller `Net` (dynamic int8, pruned) and hangs on any other
    model class (static int8's FX graph, a bf16 wrapper). The warm start tries each precision alone first, so
    the search meets both; each fails alone, with its reason, and the search completes."""
    shutil.copy(FIXTURES / "crashy_model.py", workdir / "crashy_model.py")
    # the limit is far above what a trial of this model needs (a few seconds), so a busy machine cannot make an
    # ordinary trial hit it; only the hanging ones do
    proc = run("search", "crashy_model.py", "--trials", "4", "--workers", "2", "--strategies", "pruning,quantization",
               "--sampler", "random", "--seed", "1", "--trial-timeout", "60", "--name", "crashy",
               "--confirm-processes", "1", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    trials = json.loads(proc.stdout)["trials"]
    ran = [t for t in trials if t["number"] > 0 and "reused_from" not in t["metrics"]]
    assert len(ran) == 4 and trials[0]["state"] == "complete"
    reasons = [t["failure_reason"] for t in trials if t["state"] == "failed"]
    assert any("signal SIGKILL" in r for r in reasons), reasons
    assert any("time limit of 60 s" in r for r in reasons), reasons
    assert all("signal SIGKILL" in r or "time limit of 60 s" in r for r in reasons), reasons
    assert all(t["state"] in ("complete", "failed") for t in trials)


CRASH_BETWEEN_SEND_AND_RECORD = '''
import hashlib, os, sys
from optagent.job import JobConfig
from optagent.search import Coordinator, create_job
from optagent.search.records import Records
from optagent.executors.local import LocalExecutor
from optagent.registry import build_registry
from optagent.storage import init_db

url, model = sys.argv[1], os.path.abspath("tiny_model.py")
engine = init_db(url)
cfg = JobConfig(model_path=model, strategies=["pruning", "quantization"], n_trials=4, sampler="random", seed=5,
                confirm=False, measure={"max_time_s": 1.0})
job = create_job(engine, cfg, "crash-unrecorded", hashlib.sha256(open(model, "rb").read()).hexdigest())
coordinator = Coordinator(engine, url, job.id, build_registry(), LocalExecutor(workers=1))
record = Records.dispatched

def dispatched(self, number, params, recipe, new=False):
    if number == 2:  # trial 2 is sent, then the coordinator dies before recording it...
        coordinator.study.ask()  # ...and right after asking trial 3, before sampling it
        os._exit(3)
    record(self, number, params, recipe, new)

Records.dispatched = dispatched
coordinator.run()
'''


def test_resume_recovers_trials_sent_but_not_recorded(workdir: Path) -> None:
    """The coordinator sends a trial before writing its row: a crash in between leaves an Optuna trial with
    no row. Resume rebuilds its params from the study and runs it; a trial asked but never sampled is
    failed in Optuna (it never ran) and does not count against the budget."""
    import optuna

    from optagent.strategy import flatten

    url = f"sqlite:///{workdir / 'crash.db'}"
    proc = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_SEND_AND_RECORD, url], cwd=workdir,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    engine = engine_for(url)
    with Session(engine) as s:
        job = find_job(s, "crash-unrecorded")
        assert [t.number for t in job_trials(s, job.id)] == [0, 1]
        study_name = job.study_name
    study = optuna.load_study(study_name=study_name, storage=url)
    sent = study.trials[2]
    assert sent.state == optuna.trial.TrialState.RUNNING and sent.params
    assert study.trials[3].state == optuna.trial.TrialState.RUNNING and not study.trials[3].params

    resumed = run("resume", "crash-unrecorded", "--db", url, "--json", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    with Session(engine) as s:
        rows = {t.number: t for t in job_trials(s, find_job(s, "crash-unrecorded").id)}
    assert sorted(rows) == [0, 1, 2, 4, 5]  # 4 searched trials: the budget, without trial 3
    assert all(t.state in ("complete", "failed") for t in rows.values())
    assert flatten(rows[2].params) == {k.partition("@")[0]: v for k, v in sent.params.items()}
    study = optuna.load_study(study_name=study_name, storage=url)
    assert not [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert study.trials[3].state == optuna.trial.TrialState.FAIL
    assert "stopped before the trial was sent" in study.trials[3].user_attrs["optagent"]["failure_reason"]
    for n in (1, 2, 4, 5):  # each result, its constraint and its dashboard attribute went in with its tell
        t = study.trials[n]
        assert t.user_attrs["optagent"]["optagent_number"] == n
        if rows[n].state == "complete":
            assert t.values == rows[n].values and "constraints:accuracy_drop" in t.system_attrs
