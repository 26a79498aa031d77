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
from _plugin_site import install_project, pythonpath_with
from _sampling import Points, seed_where

from optagent.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ROOT / "examples" / "plugins" / "optagent-distill"
FIXTURES = Path(__file__).parent / "fixtures"
OPTAGENT = [sys.executable, "-m", "optagent.cli"]
SEARCH_TRIALS = 3


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
def distill_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The example plugin, importable with its entry point and distribution metadata as `pip install` would
    leave them, from a directory on PYTHONPATH (this process and every subprocess): the shared venv is not
    touched, so other test runs never see the plugin appear or vanish."""
    if _installed():
        yield
        return
    site = tmp_path_factory.mktemp("distill-site")
    install_project(DISTILL, site)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = pythonpath_with(site)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(site))
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        importlib.invalidate_caches()


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


def _distilling(points: Points) -> bool:
    """Three different trials, none the baseline's point: one distilling while fine-tuning, one with distillation
    on and no fine-tuning (nothing to distill)."""
    def on(p: dict[str, Any]) -> bool:
        return p["distill"].get("enabled") == "on"

    off = {"pruning": {"method": "none"}, "finetune": {}, "distill": {"enabled": "off"}}
    distinct = len({json.dumps(p, sort_keys=True) for p in points}) == len(points) and off not in points
    return distinct and any(on(p) and p["finetune"].get("epochs", 0) > 0 for p in points) and any(
        on(p) and p["finetune"].get("epochs", 0) == 0 for p in points)


@pytest.fixture(scope="module")
def distill_search(distill_installed: None, workdir: Path) -> dict[str, Any]:
    seed = seed_where(["pruning", "finetune", "distill"], SEARCH_TRIALS, _distilling)
    proc = run("search", "tiny_model.py", "--strategies", "pruning,finetune,distill", "--sampler", "random",
               "--seed", str(seed), "--trials", str(SEARCH_TRIALS), "--workers", "2", "--name", "distill",
               "--confirm-processes", "1", "--no-warm-start",  # the seed was picked for the random draws alone
               "--max-accuracy-drop", "1", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_search_runs_and_measures_distilled_trials(distill_search: dict[str, Any]) -> None:
    trials = distill_search["trials"]
    assert len(trials) == SEARCH_TRIALS + 1
    distilled = [t for t in trials if t["params"].get("distill", {}).get("enabled") == "on"
                 and t["params"]["finetune"].get("epochs", 0) > 0]
    assert distilled, "the seed yields a trial with distillation on and fine-tuning epochs > 0"
    for t in distilled:
        assert t["state"] == "complete", t["failure_reason"]
        assert {"accuracy", "latency_ms", "model_size_mb"} <= set(t["metrics"])
        assert any(n.startswith("distilled from the baseline") for n in t["notes"]), t["notes"]
    idle = [t for t in trials if t["params"].get("distill", {}).get("enabled") == "on"
            and t["params"]["finetune"].get("epochs", 0) == 0]
    assert idle, "the seed also yields a trial with distillation on and no fine-tuning"
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
    reason = result["failure_reason"]
    assert reason.startswith("strategy 'distill' is not available on worker host "), result
    assert "OPTAGENT_PLUGINS" in reason and "install the plugin there" in reason  # it says why, and the fix


def test_the_example_plugin_passes_its_own_tests(distill_installed: None) -> None:
    """Its tests run the conformance suite (with a worker process) and its unit tests use optagent.testing."""
    env = {k: v for k, v in os.environ.items() if k != "OPTAGENT_PLUGINS"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=DISTILL,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_an_empty_allowlist_loads_only_the_builtins(distill_installed: None, workdir: Path) -> None:
    doc, _ = plugins_json(workdir, env={"OPTAGENT_PLUGINS": ""})
    assert doc["plugins"] and all(p["builtin"] for p in doc["plugins"])
    assert {"name": "distill", "distribution": "optagent-distill", "version": "0.1.0"} in doc["excluded"]
    doc, _ = plugins_json(workdir, env={"OPTAGENT_PLUGINS": "distill"})
    assert "distill" in {p["name"] for p in doc["plugins"]}


def test_the_allowlist_takes_the_distribution_name_and_warns_about_unknown_ones(distill_installed: None,
                                                                               workdir: Path) -> None:
    doc, stderr = plugins_json(workdir, env={"OPTAGENT_PLUGINS": "optagent-distill,optagent-distil"})
    assert "distill" in {p["name"] for p in doc["plugins"]}  # the name the user pip-installed
    [warning] = doc["warnings"]
    assert "OPTAGENT_PLUGINS names 'optagent-distil'" in warning and "distill (optagent-distill)" in warning
    assert warning in stderr


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
    with caplog.at_level("WARNING", logger="optagent.lifecycle"):
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


@pytest.fixture(scope="module")
def clashing_plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two distributions whose plugins register the same strategy name."""
    site = tmp_path_factory.mktemp("clash-site")
    for dist, ep in (("optagent-clash-a", "clash_a"), ("optagent-clash-b", "clash_b")):
        (site / f"optagent_{ep}.py").write_text(textwrap.dedent(f"""
            import optagent
            from optagent import Stage, Strategy, categorical

            class Same(Strategy):
                name = "same_name"
                stage = Stage.DEPLOY
                description = "registered by {ep}"

                def search_space(self, ctx):
                    return [categorical("on", (False, True))]

                def off_params(self, ctx):
                    return {{"on": False}}

                def apply(self, model, params, trial):
                    return model

            @optagent.hookimpl
            def optagent_register_strategies(register):
                register(Same())
        """))
        info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[optagent]\n{ep} = optagent_{ep}\n")
    return site


def test_a_name_clash_between_two_plugins_is_a_warning_and_optagent_plugins_works(workdir: Path,
                                                                                 clashing_plugins: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(clashing_plugins), os.environ.get("PYTHONPATH")])),
           "OPTAGENT_PLUGINS": "clash_a,clash_b"}
    doc, stderr = plugins_json(workdir, env=env)  # exit 0, not 2
    owners = {p["name"]: [s["name"] for s in p["strategies"]] for p in doc["plugins"]}
    assert owners["clash_a"] == ["same_name"] and owners["clash_b"] == []  # entry points load in name order
    [warning] = doc["warnings"]
    assert warning == ("plugin 'clash_b': strategy 'same_name' was skipped: plugin 'clash_a' registered that name "
                       "first; uninstall one or leave one out with OPTAGENT_PLUGINS")
    assert warning in stderr
    proc = run("plugins", cwd=workdir, env=env, timeout=120)
    assert proc.returncode == 0 and "same_name" in proc.stdout, proc.stderr


def test_debug_shows_a_plugin_import_traceback(workdir: Path, bad_plugins: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(bad_plugins), os.environ.get("PYTHONPATH")])),
           "OPTAGENT_PLUGINS": "broken"}
    quiet = run("plugins", "--json", cwd=workdir, env=env, timeout=120)
    assert quiet.returncode == 0 and "Traceback" not in quiet.stderr, quiet.stderr
    assert "(optagent --debug shows the traceback)" in quiet.stderr
    loud = run("--debug", "plugins", "--json", cwd=workdir, env=env, timeout=120)
    assert loud.returncode == 0, loud.stderr
    assert "Traceback (most recent call last)" in loud.stderr and "optagent_broken.py" in loud.stderr
    assert "ImportError: needs vendor_sdk" in loud.stderr
