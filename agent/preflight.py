"""The model file checked in a child process, under a time limit, before any work starts.

Every command that takes a model file (`check`, `search`, `profile`, `export`, `apply`) first runs
`optagent.contract.inspect` on it here, in a fresh child process (`python -m optagent.preflight`), never in
the caller. A model file that hangs, calls `sys.exit` or `os._exit`, crashes, or leaves a non-daemon thread
behind costs that child only: the import has `timeout_s` seconds and each function's first call
(`load_model()`, `load_data()`, `example_input()`, `evaluate()`; they may train or download) ten times that,
and the child is killed with everything it started (its own process session) when a piece overruns or the
check ends. What the caller gets back is plain data: the problems
found, the metric names and values of one evaluation, the input form and default batch, and whether CUDA is
usable, so `optagent search` can check its objectives and --device before a job row exists, and the
coordinator never imports the user's file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from optagent.contract import Problem
from optagent.errors import UserError

DEFAULT_TIMEOUT_S = 60.0
STARTUP_S = 120.0  # the child's own imports (torch) before the model file's clock starts: a busy host is slow
CALL_FACTOR = 10  # a function's first call may train or download (the digits demo trains ~20 s): 10x the import's
_EXIT_FIX = "remove the exit call; keep script code under `if __name__ == \"__main__\":`"


@dataclass
class Preflight:
    """What the child found out about a model file."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    metrics: dict[str, float] | None = None  # one evaluation of the baseline (None when not evaluated)
    has_test: bool = False
    default_batch: int | None = None
    input: str = ""
    cuda: bool = False
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def metric_names(self) -> list[str]:
        """Names a trial reports from evaluate(): eval metrics, and test_<metric> with a test split."""
        names = list(self.metrics or {})
        return names + [f"test_{n}" for n in names] if self.has_test else names

    def raise_first(self, command: str = "optagent check") -> None:
        """UserError for the first problem (one line with its fix), naming the command that lists them all."""
        if self.problems:
            first = self.problems[0]
            more = f" ({len(self.problems) - 1} more: `{command} {self.path}`)" if len(self.problems) > 1 else ""
            raise UserError(f"{self.path}: {first}{more}")


def limit_for(piece: str, timeout_s: float) -> float:
    """Seconds a piece may take: the import `timeout_s`, each function's first call CALL_FACTOR times that."""
    if piece == "startup":
        return max(STARTUP_S, timeout_s)
    return timeout_s if piece == "import" else CALL_FACTOR * timeout_s


def _hang(piece: str, path: str, timeout_s: float) -> Problem:
    name, limit = Path(path).name, limit_for(piece, timeout_s)
    if piece == "import":
        return Problem("model file", f"importing {name} did not finish within {limit:g} s (--import-timeout)",
                       "move blocking top-level code into a function (or under `if __name__ == \"__main__\":`), or "
                       "raise --import-timeout if the import is just slow")
    if piece == "startup":
        return Problem("optagent", f"the checking process did not start within {limit:g} s (importing torch)",
                       "the machine is overloaded or the Python environment is broken; run `python -c \"import "
                       "torch\"` to see")
    return Problem(piece, f"did not return within {limit:g} s ({CALL_FACTOR} x --import-timeout)",
                   f"if {piece.split('(')[0]} trains or downloads on first use, run it once beforehand or raise "
                   "--import-timeout; otherwise find where it blocks")


def _died(piece: str, path: str, code: int | None, output: str) -> Problem:
    where = f"while importing {Path(path).name}" if piece == "import" else f"in {piece}"
    said = f" (last output: {output})" if output else ""
    if code is not None and code < 0:
        sig = -code
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return Problem(piece if piece != "import" else "model file", f"the process died from {name} {where}{said}",
                       "run that piece under plain python to see the crash (native code, out of memory?)")
    return Problem(piece if piece != "import" else "model file",
                   f"ended the process with exit code {code} {where} (os._exit or a crash){said}", _EXIT_FIX)


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1][:200]
    return ""


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    """Kill the child and everything it started (it leads its own session); reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def run(path: str | os.PathLike[str], *, timeout_s: float = DEFAULT_TIMEOUT_S, evaluate: bool = True) -> Preflight:
    """Check the model file at `path` in a child process; see the module docstring. Raises UserError only
    for a bad `path` or limit; everything about the file's content comes back as `Preflight.problems`."""
    if not timeout_s or not timeout_s > 0:
        raise UserError(f"--import-timeout must be positive seconds (got {timeout_s})")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model file {str(path)!r} does not exist; pass the path to your model.py")
    if p.suffix != ".py":
        raise UserError(f"model file {str(path)!r} is not a .py file; pass a Python file that follows "
                        "docs/model-contract.md")
    resolved = str(p.resolve())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="optagent-preflight-") as tmp:
        status, output = Path(tmp) / "status.jsonl", Path(tmp) / "output.log"
        cmd = [sys.executable, "-m", "optagent.preflight", resolved, str(status), "1" if evaluate else "0",
               str(os.getpid())]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OPTAGENT_PREFLIGHT": "1"}  # a model file may skip costly extras
        with open(output, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=os.getcwd(), start_new_session=True)
        try:
            found = _watch(proc, status, output, resolved, timeout_s)
        finally:
            _kill_session(proc)
    found.path = str(path)
    found.duration_s = time.monotonic() - started
    return found


def _watch(proc: subprocess.Popen[bytes], status: Path, output: Path, path: str, timeout_s: float) -> Preflight:
    """Follow the child's stage lines until its result, its death or a piece's deadline."""
    piece, since, seen = "startup", time.monotonic(), 0
    while True:
        lines: list[bytes] = []
        with contextlib.suppress(FileNotFoundError):
            with open(status, "rb") as handle:
                handle.seek(seen)
                chunk = handle.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]
            seen += len(complete)
            lines = complete.splitlines()
        for line in lines:
            message = json.loads(line)
            if "result" in message:
                result = message["result"]
                result["problems"] = [Problem(**f) for f in result.get("problems", [])]
                return Preflight(path=path, **result)
            piece, since = message["stage"], time.monotonic()
        code = proc.poll()
        if code is not None and not lines:
            time.sleep(0.05)  # a result written just before exiting is read on the next pass
            if status.exists() and status.stat().st_size > seen:
                continue
            return Preflight(path=path, problems=[_died(piece, path, code, _last_line(output))])
        if time.monotonic() - since > limit_for(piece, timeout_s):
            return Preflight(path=path, problems=[_hang(piece, path, timeout_s)])
        time.sleep(0.05)


# -- the child ---------------------------------------------------------------------------------------------
def die_with_parent(parent_pid: int) -> None:
    """Make this process end when `parent_pid` does: PR_SET_PDEATHSIG on Linux (the kernel sends SIGKILL when
    the parent exits), and a watcher thread everywhere (pidfd where there is one, else polling)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid and not _alive(parent_pid):
        os._exit(1)  # the parent died before the death signal was armed
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="optagent-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _watch_parent(pid: int) -> None:
    pidfd = None
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]
    if pidfd is not None:
        import select

        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll(None):
            continue
    else:
        while _alive(pid):
            time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _stray_threads() -> list[str]:
    """Non-daemon threads the model file left running (given a moment to finish on their own)."""
    deadline = time.monotonic() + 1.0
    strays = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for t in strays:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    return [t.name for t in strays if t.is_alive()]


def _child(path: str, status_path: str, evaluate: bool, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    out = open(status_path, "a", encoding="utf-8")  # noqa: SIM115 - open until os._exit

    def emit(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    from optagent.contract import inspect
    from optagent.metrics import RESERVED

    current = ["startup"]

    def stage(piece: str) -> None:
        current[0] = piece
        emit({"stage": piece})

    found: dict[str, Any] = {}
    problems: list[Problem] = []
    try:
        inspection = inspect(path, evaluate=evaluate, on_stage=stage, reserved=RESERVED)
        problems = [Problem(p.piece, p.message, p.fix) for p in inspection.problems]
        found = {"metrics": inspection.metrics, "has_test": inspection.has_test,
                 "default_batch": inspection.default_batch, "input": inspection.input}
    except SystemExit as exc:
        piece = "model file" if current[0] == "import" else current[0]
        where = "at import" if current[0] == "import" else "when called"
        problems = [Problem(piece, f"calls sys.exit({exc.code!r}) {where}", _EXIT_FIX)]
    except BaseException as exc:  # noqa: BLE001 - a model file may raise anything; report it, never hang
        problems = [Problem(current[0], f"raised {type(exc).__name__}: {exc}", "fix the model file")]
    strays = _stray_threads()
    if strays:
        problems.append(Problem("model file", f"leaves non-daemon thread(s) {', '.join(strays)} running, so a "
                                "process using it could never exit",
                                "start background threads with daemon=True, or join them before returning"))
    import torch

    found["cuda"] = bool(torch.cuda.is_available())
    emit({"result": {**found, "problems": [asdict(p) for p in problems]}})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # never wait for the model file's threads or atexit handlers


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]))
