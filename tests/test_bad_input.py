"""Bad input, hostile names and broken model files, as a new user would try them (issue 18).

Every case runs the real CLI in a process of its own and must end with a non-zero exit (2: the user's to
fix) well within its time limit, exactly one line on stderr that names the fix (no traceback, no password,
user text never read as markup), nothing in the database, and no process left behind: every bad model file
leaves the pid of each process that imported it in the case's marker directory, and none may outlive the
command. The cases run a few at a time (each is mostly a child process waiting), then each is checked as
its own test.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
BAD = FIXTURES / "bad_models"
CLI = [sys.executable, "-m", "optagent.cli"]
HANG_LIMIT = "5"  # --import-timeout for the hanging files: the limit is what ends them, so no verdict rests on it
RUN_TIMEOUT_S = 300.0  # a command still running after this never returns: that is the failure being tested for
WITHIN_S = 150.0  # a command ends within its limit plus start-up, even on a busy host (idle: under 15 s)


@dataclass(frozen=True)
class Case:
    """One bad input: the command line (MODEL = a file in fixtures/bad_models, DB = the case's database) and
    what its one line of stderr must and must not say."""

    name: str
    args: tuple[str, ...]
    says: tuple[str, ...]
    never: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


def search(model: str, *extra: str) -> tuple[str, ...]:
    return ("search", f"MODEL:{model}", "--db", "DB", "--trials", "2", "--quiet", *extra)


def check(model: str, *extra: str) -> tuple[str, ...]:
    return ("check", f"MODEL:{model}", *extra)


SECRET = "hunter2-SECRET"
CASES = [
    # -- options, URLs, names: refused before the model file even runs -----------------------------------------
    Case("trials-not-an-integer", search("good", "--trials", "x"), ("--trials", "not a whole number", "--help")),
    Case("measure-seconds-zero", search("good", "--measure-seconds", "0"), ("--measure-seconds must be more than 0",)),
    Case("unknown-option", search("good", "--trails", "3"), ("No such option: --trails", "--trials")),
    Case("db-unknown-scheme", search("good", "--db", "bogus://x/y"), ("unknown scheme 'bogus'", "sqlite:///")),
    Case("db-malformed-with-password", search("good", "--db", f"postgresql+psycopg:/user:{SECRET}@host/db"),
         ("is not a URL", "postgresql+psycopg://"), never=(SECRET,)),
    Case("db-unreachable-with-password", search("good", "--db", f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/x"),
         ("cannot open database", "u:***@"), never=(SECRET,)),
    Case("strategies-empty", search("good", "--strategies", ","), ("no strategy to search", "--strategies")),
    Case("strategies-near-miss", search("good", "--strategies", "prunning"), ("did you mean pruning?",)),
    Case("sampler-near-miss", search("good", "--sampler", "tpee"), ("did you mean tpe?",)),
    Case("trial-timeout-negative", search("good", "--trial-timeout", "-1"), ("--trial-timeout must be positive",)),
    Case("import-timeout-zero", search("good", "--import-timeout", "0"), ("--import-timeout must be positive",)),
    Case("broker-retry-negative", search("good", "--broker-retry-s", "-1"), ("--broker-retry-s must be zero or more",)),
    Case("queue-with-space", search("good", "--queue", "a b", "--broker", "redis://127.0.0.1:1/0"),
         ("not a valid queue name",)),
    Case("broker-unreachable", search("good", "--broker", f"redis://:{SECRET}@127.0.0.1:1/0"),
         ("cannot reach the broker", ":***@"), never=(SECRET,)),
    Case("broker-remote-without-secret", search("good", "--broker", "redis://redis.example.invalid:6379/0"),
         ("OPTAGENT_SECRET", "--insecure")),
    Case("broker-remote-insecure-still-checked", search("good", "--broker", "redis://192.0.2.1:6379/0", "--insecure"),
         ("cannot reach the broker",)),
    Case("broker-bad-scheme", search("good", "--broker", f"amqp://u:{SECRET}@host//"),
         ("unsupported broker URL", "redis://"), never=(SECRET,)),
    Case("name-markup", search("good", "--name", "[bold red]fake[/]"), ("[bold red]fake[/]", "letters, digits")),
    Case("name-closing-tag", search("good", "--name", "[/]"), ("'[/]'", "letters, digits")),
    Case("name-path", search("good", "--name", "x/../../../../escaped"), ("letters, digits",)),
    Case("name-terminal-escape", search("good", "--name", "a\x1b]0;pwned\x07b"), ("letters, digits",),
         never=("\x1b", "\x07")),
    Case("name-newline", search("good", "--name", "two\nlines"), ("letters, digits",)),
    Case("name-numeric", search("good", "--name", "2"), ("is a number", "run-2")),
    Case("name-too-long", search("good", "--name", "n" * 201), ("201 characters", "at most 100")),
    Case("worker-remote-without-secret", ("worker", "--broker", "redis://redis.example.invalid:6379/0"),
         ("optagent worker", "OPTAGENT_SECRET", "--insecure")),
    Case("worker-insecure-still-checks-reachability",
         ("worker", "--broker", "redis://192.0.2.1:6379/0", "--insecure"), ("cannot reach the broker",)),
    Case("worker-bad-queue", ("worker", "--broker", "redis://127.0.0.1:1/0", "--queue", "a b"),
         ("queue names",)),
    # -- what the model file measures: known after one evaluation, before the job exists -----------------------
    Case("objective-near-miss", search("good", "--objective", "Accuracy:max"),
         ("no trial measures 'Accuracy'", "did you mean accuracy?")),
    Case("constraint-metric-unknown", search("good", "--constraint-metric", "f1"),
         ("no trial measures 'f1'", "evaluate() returns accuracy")),
    Case("device-cuda-without-cuda", search("good", "--device", "cuda"), ("--device cuda", "--device cpu")),
    # -- model files that hang, exit or leave threads: ended within the limit, nothing left running ------------
    *(Case(f"{verb}-hang-at-import", fn("hang_import", "--import-timeout", HANG_LIMIT),
           ("importing hang_import.py did not finish within 5 s", "--import-timeout"))
      for verb, fn in (("check", check), ("search", search))),
    *(Case(f"{verb}-hang-in-load-model", fn("hang_load_model", "--import-timeout", HANG_LIMIT),
           ("load_model(): did not return within 50 s (10 x --import-timeout)", "raise --import-timeout"))
      for verb, fn in (("check", check), ("search", search))),
    *(Case(f"{verb}-non-daemon-thread", fn("thread_import"), ("non-daemon thread(s) poller", "daemon=True"))
      for verb, fn in (("check", check), ("search", search))),
    *(Case(f"{verb}-sys-exit-{code}", fn(f"exit{code}_import"), (f"calls sys.exit({code}) at import", "__main__"))
      for verb, fn in (("check", check), ("search", search)) for code in (0, 3)),
    *(Case(f"{verb}-os-exit", fn("os_exit_import"), ("exit code 0 while importing", "os._exit"))
      for verb, fn in (("check", check), ("search", search))),
    *(Case(f"{verb}-raises-at-import", fn("raise_import"), ("importing", "RuntimeError: missing dependency"))
      for verb, fn in (("check", check), ("search", search))),
    # -- the contract, checked completely by `check` and first thing by `search` -------------------------------
    *(Case(f"{verb}-{model}", fn(model), says)
      for verb, fn in (("check", check), ("search", search))
      for model, says in (
          ("dict_model", ("load_model() returned dict, not a torch.nn.Module",)),
          ("list_data", ("load_data() returned list", "optagent.Data")),
          ("empty_eval", ("load_data().eval: is empty", "at least one sample")),
          ("nan_eval", ("non-finite values for accuracy", "finite floats")),
          ("reserved_metric", ("returns latency_ms, which optagent measures itself", "rename")),
          ("mismatched_example", ("does not match the eval samples", "same data and dtypes")),
          ("zero_batch", ("has batch size 0", "at least one sample")),
          ("markup_error", ("[bold red]/models[/] (see [/])", "load_model()")),
      )),
    Case("profile-hang-at-import", ("profile", "MODEL:hang_import", "--import-timeout", HANG_LIMIT),
         ("did not finish within 5 s",)),
    Case("apply-hang-at-import", ("apply", "RECIPE:ok", "MODEL:hang_import", "-o", "out", "--import-timeout",
                                  HANG_LIMIT), ("did not finish within 5 s",)),
    # -- recipes: validated against the strategies' spaces before anything is rebuilt --------------------------
    Case("recipe-epochs-outside-space", ("apply", "RECIPE:huge_epochs", "MODEL:good", "-o", "out"),
         ("params.finetune.epochs is 1000000000", "a whole number in [0,")),
    Case("recipe-list-for-dict", ("apply", "RECIPE:list_params", "MODEL:good", "-o", "out"),
         ("params.pruning is a list, not a dict",)),
    Case("recipe-missing-trial", ("apply", "RECIPE:no_trial", "MODEL:good", "-o", "out"), ("trial is missing",)),
    Case("recipe-string-for-int", ("apply", "RECIPE:string_seed", "MODEL:good", "-o", "out"),
         ('seed is "ten", not a whole number',)),
    Case("recipe-string-for-number", ("apply", "RECIPE:string_epochs", "MODEL:good", "-o", "out"),
         ('params.finetune.epochs is "ten"',)),
    Case("apply-into-non-empty-dir", ("apply", "RECIPE:ok", "MODEL:good", "-o", "mine"), ("is not empty", "--force")),
    # -- jobs by name: a near miss is named ------------------------------------------------------------------
    Case("status-near-miss", ("status", "shred", "--db", "DB:with-jobs"), ("no job 'shred'", "did you mean shared?")),
]

_RECIPE = {"format": "optagent-recipe/1", "trial": 1, "seed": 1, "threads": 1, "device": "cpu",
           "strategies": ["pruning", "finetune"], "objectives": ["accuracy:max", "latency_ms:min"],
           "params": {"pruning": {"method": "none"}, "finetune": {"epochs": 0}}, "model": {"sha256": "0" * 64}}
RECIPES: dict[str, dict[str, Any]] = {
    "ok": _RECIPE,
    "huge_epochs": {**_RECIPE, "params": {"pruning": {"method": "none"}, "finetune": {"epochs": 10 ** 9}}},
    "list_params": {**_RECIPE, "params": {"pruning": ["structured", 0.5]}},
    "no_trial": {k: v for k, v in _RECIPE.items() if k != "trial"},
    "string_seed": {**_RECIPE, "seed": "ten"},
    "string_epochs": {**_RECIPE, "params": {"finetune": {"epochs": "ten"}}},
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _jobs_in(db: Path) -> list[str]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        names = [r[0] for r in conn.execute("select name from optagent_jobs")] if "optagent_jobs" in tables else []
        studies = [r[0] for r in conn.execute("select study_name from studies")] if "studies" in tables else []
    return names + studies


def _with_jobs(path: Path) -> str:
    """A database holding one job named `shared` (for the near-miss lookup)."""
    from optagent.job import JobConfig
    from optagent.search import create_job
    from optagent.storage import init_db

    url = f"sqlite:///{path}"
    create_job(init_db(url), JobConfig(model_path="/m.py", strategies=["pruning"]), "shared", "0" * 64)
    return url


@dataclass
class Outcome:
    code: int | None
    stderr: str
    stdout: str
    seconds: float
    left_running: list[int]
    stored: list[str]


def _run(case: Case, root: Path) -> Outcome:
    workdir = root / case.name
    workdir.mkdir()
    markers, db = workdir / "markers", workdir / "optagent.db"
    args = []
    for arg in case.args:
        if arg.startswith("MODEL:"):
            arg = str(BAD / f"{arg[6:]}.py")
        elif arg.startswith("RECIPE:"):
            path = workdir / f"{arg[7:]}.json"
            path.write_text(json.dumps(RECIPES[arg[7:]]))
            arg = str(path)
        elif arg == "DB":
            arg = f"sqlite:///{db}"
        elif arg == "DB:with-jobs":
            arg = _with_jobs(workdir / "jobs.db")
        args.append(arg)
    (workdir / "mine").mkdir()
    (workdir / "mine" / "notes.txt").write_text("the user's own file")
    env = {k: v for k, v in os.environ.items() if k not in ("OPTAGENT_SECRET", "OPTAGENT_BROKER_URL", "OPTAGENT_DB")}
    env.update(OPTAGENT_TEST_MARKERS=str(markers), COLUMNS="80", **case.env)
    started = time.monotonic()
    try:
        proc = subprocess.run([*CLI, *args], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
        code, stderr, stdout = proc.returncode, proc.stderr, proc.stdout
    except subprocess.TimeoutExpired as exc:
        code, stderr, stdout = None, str(exc.stderr or ""), str(exc.stdout or "")
    seconds = time.monotonic() - started
    pids = [int(p.name) for p in markers.glob("*")] if markers.exists() else []
    deadline = time.monotonic() + 10  # killed processes are reaped by then even on a busy host
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for pid in left:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    return Outcome(code, stderr, stdout, seconds, left, _jobs_in(db))


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("bad-input")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case.name: pool.submit(_run, case, root) for case in CASES}
    return {name: f.result() for name, f in futures.items()}


def test_case_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(battery: dict[str, Outcome], case: Case) -> None:
    got = battery[case.name]
    assert got.code is not None, f"still running after {RUN_TIMEOUT_S:.0f} s: {got.stderr[-2000:]}"
    assert got.code == case.code, got.stderr
    lines = [line for line in got.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, got.stderr
    assert "Traceback" not in got.stderr
    for text in case.says:
        assert text in lines[0], lines[0]
    for text in case.never:
        assert text not in got.stderr + got.stdout
    assert got.seconds < WITHIN_S, got.seconds
    assert got.left_running == [], "processes outlived the command"
    assert got.stored == [], "a refused search left a job or a study in the database"


def test_the_battery_reports_its_counts(battery: dict[str, Outcome], capsys: pytest.CaptureFixture[str]) -> None:
    """One summary line (cases, handled) for the record, e.g. `pytest -s tests/test_bad_input.py`."""
    handled = 0
    for case in CASES:
        got = battery[case.name]
        lines = [line for line in got.stderr.splitlines() if line.strip()]
        handled += (got.code == case.code and len(lines) == 1 and all(t in lines[0] for t in case.says)
                    and not got.left_running and not got.stored)
    with capsys.disabled():
        print(f"\nbad-input battery: {len(CASES)} cases, {handled} handled cleanly, slowest "
              f"{max(o.seconds for o in battery.values()):.1f} s")
    assert handled == len(CASES)


# -- names stored before names were validated must not break the read commands ---------------------------------
HOSTILE = ["[bold red]fake[/]", "[/]", "a\x1b]0;pwned\x07b", "two\nlines", "x/../../../../escaped"]


def test_hostile_names_stored_earlier_are_shown_not_interpreted(tmp_path: Path) -> None:
    from sqlmodel import Session

    from optagent.storage import Job, init_db

    url = f"sqlite:///{tmp_path / 'old.db'}"
    with Session(init_db(url)) as s:
        for i, name in enumerate(HOSTILE):
            s.add(Job(name=name, study_name=f"s{i}", model_path="/m.py", model_hash="0" * 64, status="failed",
                      config={"model_path": "/m.py", "strategies": ["pruning"]},
                      error=f"boom [/] {name}"))
        s.commit()
    env = {**os.environ, "COLUMNS": "200"}
    listed = subprocess.run([*CLI, "jobs", "--db", url], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "[bold red]fake[/]" in listed.stdout and "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    for name in HOSTILE:
        status = subprocess.run([*CLI, "status", name, "--db", url], capture_output=True, text=True, env=env,
                                timeout=120)
        assert status.returncode == 0, status.stderr
        assert "boom [/]" in status.stdout and "\x1b" not in status.stdout
    workdir = tmp_path / "a" / "b" / "c" / "d" / "here"
    workdir.mkdir(parents=True)
    written = subprocess.run([*CLI, "report", "x/../../../../escaped", "--db", url, "--json"], cwd=workdir,
                             capture_output=True, text=True, env=env, timeout=300)
    assert written.returncode == 0, written.stderr
    assert [p.name for p in workdir.iterdir()] == ["report-x-escaped.html"]
    assert not list(tmp_path.rglob("escaped.html"))


def test_a_name_over_200_characters_is_refused_on_postgresql_too(postgres_url: str) -> None:
    proc = subprocess.run([*CLI, "search", str(BAD / "good.py"), "--db", postgres_url, "--name", "n" * 240],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "at most 100" in proc.stderr, proc.stderr


# -- the coordinator stopped from outside ----------------------------------------------------------------------
def _start_search(tmp_path: Path, name: str, *extra: str) -> tuple[subprocess.Popen[str], str, Path]:
    markers = tmp_path / "markers"
    url = f"sqlite:///{tmp_path / 'stop.db'}"
    env = {**os.environ, "OPTAGENT_TEST_MARKERS": str(markers), "OPTAGENT_TEST_EVAL_SLEEP": "600"}
    proc = subprocess.Popen([*CLI, "search", str(FIXTURES / "sleepy_model.py"), "--db", url, "--name", name,
                             "--trials", "2", "--strategies", "pruning", "--quiet", *extra], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180  # the baseline trial is evaluating (and sleeping) once its marker is there
    while not (markers.exists() and list(markers.iterdir())):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no trial started"
        time.sleep(0.2)
    return proc, url, markers


def _trial_pids(markers: Path) -> list[int]:
    return [int(p.name) for p in markers.iterdir()]


def test_sigterm_ends_the_job_interrupted_not_running(tmp_path: Path) -> None:
    from sqlmodel import Session

    from optagent.storage import engine_for, find_job

    proc, url, markers = _start_search(tmp_path, "stopped")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None)
    with Session(engine_for(url)) as s:
        job = find_job(s, "stopped")
        assert job.status == "interrupted" and "optagent resume stopped" in (job.error or ""), job.error
    assert "interrupted" in err.splitlines()[-1]
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in _trial_pids(markers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in _trial_pids(markers)), "a trial process outlived its coordinator"


def test_trial_processes_die_with_a_sigkilled_coordinator(tmp_path: Path) -> None:
    proc, url, markers = _start_search(tmp_path, "killed")
    pids = _trial_pids(markers)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30  # the kernel's death signal is immediate; the watcher polls
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "trial processes kept running after their coordinator was killed"


# -- export: a directory the user owns is not overwritten; a fallback says why ---------------------------------
def test_export_refuses_a_non_empty_directory_and_force_removes_only_its_own_files(tmp_path: Path) -> None:
    from optagent.errors import UserError
    from optagent.export import MANIFEST, _write_manifest, prepare_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty.*--force"):
        prepare_dir(target)
    earlier = [target / "state_dict.pt", target / "recipe.json"]
    for f in earlier:
        f.write_text("earlier export")
    _write_manifest(target, earlier)
    prepare_dir(target, force=True)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert not (target / MANIFEST).exists()


def test_a_state_dict_fallback_says_why(tmp_path: Path) -> None:
    import torch

    from optagent.export import save_model

    class Branchy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return {"logits": x * 2} if x.sum() > 0 else {"logits": x}

    why: list[str] = []
    files, fmt = save_model(Branchy(), torch.ones(2, 2), tmp_path, why)
    assert fmt == "state_dict" and len(why) == 2
    assert why[0].startswith("torch.export:") and why[1].startswith("TorchScript:")


# -- a trial whose evaluate() returns NaN fails alone --------------------------------------------------------
def test_a_nan_metric_fails_its_trial_not_the_job(tmp_path: Path) -> None:
    """The executors leave non-finite metrics out of a result (with a note), so a NaN accuracy makes that trial
    fail as missing its objective, and the search goes on to complete."""
    import hashlib

    from sqlmodel import Session

    from optagent.executors.local import finite_metrics
    from optagent.job import JobConfig
    from optagent.registry import build_registry
    from optagent.search import Coordinator, create_job
    from optagent.storage import init_db, job_trials
    from optagent.testing import FakeExecutor, fake_answer
    from optagent.testing.fake import fake_metrics

    class Finite(FakeExecutor):  # what LocalExecutor and CeleryExecutor do to every result
        def poll(self, timeout: float) -> list[Any]:
            return [type(o)(o.number, finite_metrics(o.result)) for o in super().poll(timeout)]

    def metrics(params: dict[str, Any]) -> dict[str, float]:
        m = fake_metrics(params)
        return {**m, "accuracy": float("nan")} if (params.get("pruning") or {}).get("method") == "structured" else m

    url = f"sqlite:///{tmp_path / 'nan.db'}"
    engine = init_db(url)
    model = tmp_path / "model.py"
    model.write_text("# never run: the fake executor answers\n")
    cfg = JobConfig(model_path=str(model), strategies=["pruning"], n_trials=6, sampler="random", seed=3,
                    confirm=False, warm_start=False).validate()
    job = create_job(engine, cfg, "nan", hashlib.sha256(model.read_bytes()).hexdigest())
    done = Coordinator(engine, url, job.id or 0, build_registry(), Finite(answer=fake_answer(metrics))).run()
    assert done.status == "completed"
    with Session(engine) as s:
        rows = job_trials(s, job.id or 0)
    nan_rows = [t for t in rows if (t.params.get("pruning") or {}).get("method") == "structured"]
    assert nan_rows, "seed 3 samples structured pruning at least once"
    assert all(t.state == "failed" and "accuracy" in (t.failure_reason or "") for t in nan_rows)
    assert all("non-finite values for accuracy" in " ".join(t.notes) for t in nan_rows)
