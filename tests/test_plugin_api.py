"""The plugin API end to end: a real third-party package (examples/plugins/optagent-distill) is installed,
listed, searched with and measured; broken and disabled plugins never take the CLI down.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from optagent.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ROOT / "examples" / "plugins" / "optagent-distill"
FIXTURES = Path(__file__).parent / "fixtures"
OPTAGENT = [sys.executable, "-m", "optagent.cli"]
# RandomSampler seed 6 gives, over 3 trials of pruning,finetune,distill, one trial with distillation on and
# fine-tuning epochs > 0 and two with distillation on and no epochs (nothing to distill).
SEARCH_SEED, SEARCH_TRIALS = 6, 3


def run(*args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OPTAGENT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _installed() -> bool:
    try:
        importlib.metadata.distribution("optagent-distill")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def distill_installed() -> Iterator[None]:
    """pip-install the example plugin (editable, no deps: offline-safe); uninstall it again if we installed it."""
    already = _installed()
    if not already:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                        str(DISTILL)], check=True, capture_output=True, timeout=180)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if not already:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "optagent-distill"],
                           capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plugins")
    shutil.copy(FIXTURES / "tiny_model.py", path / "tiny_model.py")
    os.environ.setdefault("OPTAGENT_CACHE_DIR", str(path / "cache"))
    return path


def plugins_json(cwd: Path, env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    proc = run("plugins", "--json", cwd=cwd, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_optagent_plugins_lists_the_installed_plugin_with_its_version_and_space(distill_installed: None,
                                                                                workdir: Path) -> None:
    doc, _ = plugins_json(workdir)
    plugin = next(p for p in doc["plugins"] if p["name"] == "distill")
    assert (plugin["version"], plugin["distribution"], plugin["source"]) == ("0.1.0", "optagent-distill", "entry_point")
    [strategy] = plugin["strategies"]
    assert strategy["stage"] == "finetune" and strategy["off"] == {"enabled": "off"}
    space = {p["name"]: p for p in strategy["space"]}
    assert space["enabled"]["choices"] == ["off", "on"]
    assert space["temperature"]["when"] == space["alpha"]["when"] == {"enabled": ["on"]}
    assert (space["alpha"]["low"], space["alpha"]["high"]) == (0.1, 0.9)
    builtin = next(p for p in doc["plugins"] if p["name"] == "optagent.plugins.pruning")
    assert builtin["builtin"] and builtin["version"]
    assert doc["warnings"] == []


@pytest.fixture(scope="module")
def distill_search(distill_installed: None, workdir: Path) -> dict[str, Any]:
    proc = run("search", "tiny_model.py", "--strategies", "pruning,finetune,distill", "--sampler", "random",
               "--seed", str(SEARCH_SEED), "--trials", str(SEARCH_TRIALS), "--workers", "2", "--name", "distill",
               "--confirm-processes", "1",
               "--max-accuracy-drop", "1", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_search_runs_and_measures_distilled_trials(distill_search: dict[str, Any]) -> None:
    trials = distill_search["trials"]
    assert len(trials) == SEARCH_TRIALS + 1
    distilled = [t for t in trials if t["params"].get("distill", {}).get("enabled") == "on"
                 and t["params"]["finetune"].get("epochs", 0) > 0]
    assert distilled, "the seed must yield a trial with distillation on and fine-tuning epochs > 0"
    for t in distilled:
        assert t["state"] == "complete", t["failure_reason"]
        assert {"accuracy", "latency_ms", "model_size_mb"} <= set(t["metrics"])
        assert any(n.startswith("distilled from the baseline") for n in t["notes"]), t["notes"]
    idle = [t for t in trials if t["params"].get("distill", {}).get("enabled") == "on"
            and t["params"]["finetune"].get("epochs", 0) == 0]
    assert idle, "the seed must also yield a trial with distillation on and no fine-tuning"
    for t in idle:  # on, but nothing to distill: measured anyway, with a note saying why nothing happened
        assert t["state"] == "complete" and any("nothing to distill" in n for n in t["notes"]), t["notes"]


def test_a_worker_without_the_plugin_fails_the_trial_with_the_reason(distill_search: dict[str, Any],
                                                                    workdir: Path) -> None:
    from sqlmodel import Session

    from optagent.job import payload_for
    from optagent.storage import engine_for, find_job, get_trial

    number = next(t["number"] for t in distill_search["trials"]
                  if t["params"].get("distill", {}).get("enabled") == "on")
    with Session(engine_for(f"sqlite:///{workdir / 'optagent.db'}")) as s:
        job = find_job(s, "distill")
        row = get_trial(s, job.id, number)
        assert row is not None
        payload = payload_for(job, row)
    code = ("import json, sys; from optagent.trial import run_trial; "
            "print(json.dumps(run_trial(json.load(sys.stdin))))")
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(payload.to_json()), capture_output=True,
                          text=True, timeout=120, cwd=workdir, env={**os.environ, "OPTAGENT_PLUGINS": ""})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"] == "failed"
    assert result["failure_reason"].startswith("strategy distill is not installed on worker host "), result


def test_an_empty_allowlist_loads_only_the_builtins(distill_installed: None, workdir: Path) -> None:
    doc, _ = plugins_json(workdir, env={"OPTAGENT_PLUGINS": ""})
    assert doc["plugins"] and all(p["builtin"] for p in doc["plugins"])
    doc, _ = plugins_json(workdir, env={"OPTAGENT_PLUGINS": "distill"})
    assert "distill" in {p["name"] for p in doc["plugins"]}


@pytest.fixture(scope="module")
def bad_plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distribution on PYTHONPATH with two bad entry points: one fails to import, one misspells a hook."""
    site = tmp_path_factory.mktemp("bad-site")
    (site / "optagent_broken.py").write_text("raise ImportError('needs vendor_sdk, which is not installed')\n")
    (site / "optagent_typo.py").write_text(textwrap.dedent("""
        import optagent

        @optagent.hookimpl
        def optagent_register_strategy(register):
            pass
    """))
    info = site / "optagent_bad-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: optagent-bad\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[optagent]\nbroken = optagent_broken\ntypo = optagent_typo\n")
    return site


def test_broken_and_misspelled_plugins_are_one_line_warnings_and_the_cli_works(
        distill_installed: None, workdir: Path, bad_plugins: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(bad_plugins), os.environ.get("PYTHONPATH")]))}
    doc, stderr = plugins_json(workdir, env=env)
    names = {p["name"] for p in doc["plugins"]}
    assert "distill" in names and "broken" not in names and "typo" not in names
    broken = [line for line in stderr.splitlines() if "'broken'" in line]
    assert len(broken) == 1 and "ImportError: needs vendor_sdk" in broken[0], stderr
    typo = [line for line in stderr.splitlines() if "'typo'" in line]
    assert len(typo) == 1 and "unknown hook optagent_register_strategy " in typo[0], stderr
    assert "did you mean optagent_register_strategies?" in typo[0]
    assert len(doc["warnings"]) == 2
    proc = run("plugins", cwd=workdir, env=env, timeout=120)  # the human table works too
    assert proc.returncode == 0 and "distill" in proc.stdout, proc.stderr
    # a search says it once, not once per place that loads plugins (CLI, coordinator, trial processes)
    proc = run("search", "tiny_model.py", "--trials", "1", "--strategies", "pruning", "--no-confirm", "--quiet",
               "--name", "warned", "--db", f"sqlite:///{workdir / 'warned.db'}", cwd=workdir, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "'broken'" in line] == broken, proc.stderr


# -- in-process checks of the registry's handling of plugin mistakes ----------------------------------------
class _Typo:
    @hookimpl
    def optagent_register_metric(self, register: Any) -> None:  # one letter short
        raise AssertionError("never called")


class _Undecorated:
    def optagent_register_strategies(self, register: Any) -> None:  # forgot @optagent.hookimpl
        raise AssertionError("never called")


class _FailingTracker:

    @hookimpl
    def optagent_trial_finished(self, job: dict[str, Any], trial: dict[str, Any]) -> None:
        raise ConnectionError("tracker is down")


def test_misspelled_and_undecorated_hooks_are_reported_and_skipped() -> None:
    from optagent.registry import build_registry, get_plugin_manager

    warnings: list[str] = []
    pm = get_plugin_manager(load_entry_points=False, extra=[_Typo(), _Undecorated()], warnings=warnings)
    registry = build_registry(pm, warnings)
    assert len(warnings) == 2
    assert "unknown hook optagent_register_metric (did you mean optagent_register_metrics?)" in warnings[0]
    assert "optagent_register_strategies lacks the @optagent.hookimpl decorator" in warnings[1]
    assert all(p.builtin for p in registry.plugins.values())


def test_a_failing_lifecycle_hook_is_logged_and_does_not_stop_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    from optagent.registry import get_plugin_manager

    pm = get_plugin_manager(load_entry_points=False, extra=[_FailingTracker()])
    with caplog.at_level("WARNING", logger="optagent.registry"):
        pm.hook.optagent_trial_finished(job={"id": 1}, trial={"number": 3})
    assert "failed in optagent_trial_finished: ConnectionError: tracker is down" in caplog.text
    assert __name__ in caplog.text  # names the plugin's module


def test_every_public_name_resolves_from_the_top_level_package() -> None:
    import optagent
    from optagent.errors import TrialFailed

    for name in optagent.__all__:
        assert getattr(optagent, name) is not None, name
    assert optagent.TrialFailed is TrialFailed  # plugins raise it for a point that cannot work
    with pytest.raises(AttributeError):
        optagent.NoSuchName  # noqa: B018
