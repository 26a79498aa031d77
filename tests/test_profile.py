"""`optagent profile`: the per-module / per-operator breakdown, its advice, and its error messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from optagent.cli import app
from optagent.errors import UserError
from optagent.profile import Profile, Row, advise, profile_model

FIXTURES = Path(__file__).parent / "fixtures"
OPTAGENT = [sys.executable, "-m", "optagent.cli"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OPTAGENT, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OPTAGENT_CACHE_DIR": str(cwd / "cache")})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profile")
    shutil.copy(FIXTURES / "tiny_model.py", path / "tiny_model.py")
    return path


def test_breakdown_attributes_self_time_to_modules_and_operators() -> None:
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    p = profile_model(model, torch.randn(64, 256), threads=1, reps=3, warmup=1)
    kinds = {r.kind: r for r in p.module_types}
    assert kinds["Linear"].calls == 3 and kinds["ReLU"].calls == 2
    assert {"0", "1", "2", "3", "4"} <= {r.name for r in p.modules}
    assert 0.0 < sum(r.fraction for r in p.module_types) <= 1.05
    assert any(r.name == "aten::addmm" and "64x" in r.shapes for r in p.operators)
    assert 0.0 < p.op_fraction <= 1.0 and p.latency_ms > 0 and p.batch_size == 64
    assert not any(hasattr(m, "_optagent_ranges") for m in model.modules())  # hooks removed
    assert model(torch.randn(2, 256)).shape == (2, 10)


def _profile(types: dict[str, float], op_fraction: float = 0.95) -> Profile:
    rows = [Row(k, k, v, v, 1.0) for k, v in types.items()]
    return Profile(batch_size=1, threads=1, device="cpu", reps=1, latency_ms=1.0, profiled_ms=1.0,
                   op_fraction=op_fraction, module_types=rows)


def test_advice_names_the_strategies_for_each_bottleneck() -> None:
    linear = advise(_profile({"Linear": 0.78, "ReLU": 0.05}))
    assert any("Linear layers take 78%" in a and "dynamic int8" in a for a in linear)
    conv = advise(_profile({"Conv2d": 0.74, "BatchNorm2d": 0.1, "MaxPool2d": 0.12}), bf16=True)
    assert any("Conv layers take 74%" in a and "structured pruning" in a and "static int8" in a for a in conv)
    assert any("Memory-bound" in a for a in conv)
    tiny = advise(_profile({"Linear": 0.2}, op_fraction=0.4))
    assert any("overhead is 60%" in a and "torch.compile" in a for a in tiny)
    assert "no installed strategy" in advise(_profile({"Linear": 0.9}), strategies=set())[0]


def test_profile_a_model_file_as_json(workdir: Path) -> None:
    proc = cli("profile", "tiny_model.py", "--threads", "1", "--batch-size", "4", "--reps", "3", "--json",
               cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["batch_size"] == 4 and data["threads"] == 1 and data["hardware"]["threads"] == 1
    assert {"Conv2d", "Linear", "BatchNorm2d"} <= {r["kind"] for r in data["module_types"]}
    assert data["operators"] and data["modules"] and data["advice"]
    assert "profiler_start" not in proc.stderr


def test_profile_a_stored_trial_and_bad_input(workdir: Path) -> None:
    db = f"sqlite:///{workdir / 'p.db'}"
    proc = cli("search", "tiny_model.py", "--trials", "1", "--threads", "1", "--strategies", "pruning",
               "--name", "prof", "--db", db, "--no-confirm", "--quiet", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    proc = cli("profile", "prof", "--trial", "0", "--db", db, "--reps", "3", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "job prof trial 0" in proc.stdout and "Where the time goes" in proc.stdout and "advice:" in proc.stdout
    runner = CliRunner()  # bad input, in process: a UserError with a one-line message naming the fix
    for args, needle in ((("prof", "--trial", "99"), "has no trial 99"),
                         (("nojob", "--trial", "1"), "no job 'nojob'"),
                         (("prof",), "--trial N"),
                         ((str(workdir / "missing.py"),), "does not exist")):
        result = runner.invoke(app, ["profile", *args, "--db", db])
        assert isinstance(result.exception, UserError), result.output
        assert needle in str(result.exception) and "\n" not in str(result.exception)
