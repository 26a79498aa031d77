"""The wheel: built as a release is built, installed into a fresh environment, every module importable.

Every other test runs on the editable install, which finds modules in the source tree whatever the wheel
holds; this one would have caught a wheel without optagent.executors. deploy/Dockerfile installs the same way
(pip wheel, then pip install the wheel).
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"optagent": ROOT / "agent", "optagent.plugins": ROOT / "plugins", "optagent.workers": ROOT / "workers"}

pytestmark = pytest.mark.timeout(1500)


def _modules() -> list[str]:
    names = []
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if "__pycache__" in rel.parts or rel.parts[-1] == "__main__":
                continue
            names.append(".".join([package, *parts]))
    return sorted(set(names))


def test_the_wheel_installs_and_runs_outside_the_source_tree(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(ROOT), "-w", str(wheels)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("optagent-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    fresh_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies (torch, optuna, ...) come from this environment's site-packages as a plain path: its
    # .pth files, the editable install's among them, are not run from there
    Path(fresh_site, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    modules = _modules()
    assert "optagent.executors.celery" in modules and "optagent.search.loop" in modules
    probe = ("import importlib, sys, optagent\n"
             f"assert optagent.__file__.startswith({fresh_site!r}), optagent.__file__\n"
             f"for name in {modules!r}:\n"
             "    importlib.import_module(name)\n"
             "print('imported', len(sys.modules))\n")
    proc = subprocess.run([str(py), "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cli = venv / "bin" / "optagent"
    helped = subprocess.run([str(cli), "--help"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 0 and "search" in helped.stdout, helped.stderr
    # the suite's weight cache: the digits CNN trains once for every test that uses it
    checked = subprocess.run([str(cli), "check", str(ROOT / "examples" / "digits_cnn.py")], cwd=tmp_path,
                             capture_output=True, text=True, timeout=900, env=env)
    assert checked.returncode == 0, checked.stderr
    assert "✓" in checked.stdout
