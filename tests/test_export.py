"""`optagent export` and `optagent apply`: a trial's model back out, rebuilt bit for bit from its recipe."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlmodel import Session
from typer.testing import CliRunner

from optagent.cli import app
from optagent.errors import UserError
from optagent.storage import engine_for, find_job, job_trials

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def search(shared_search: tuple[str, Path]) -> tuple[str, Path]:
    return shared_search


def _trained_trial(url: str) -> dict[str, Any]:
    """A completed trial that fine-tunes (the seeded, most reproducibility-sensitive step), else any."""
    with Session(engine_for(url)) as s:
        job = find_job(s, "shared")
        done = [t for t in job_trials(s, job.id or 0) if t.state == "complete" and t.number > 0]
    tuned = [t for t in done if (t.params.get("finetune") or {}).get("epochs", 0) > 0]
    quantized = [t for t in tuned if (t.params.get("quantization") or {}).get("mode", "none") != "none"]
    t = (quantized or tuned or done)[0]
    return {"number": t.number, "metrics": t.metrics, "params": t.params}


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def load_exported(directory: Path) -> Any:
    """The exported model as a callable, whichever format export chose."""
    if (directory / "model.pt2").exists():
        return torch.export.load(str(directory / "model.pt2")).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in torch 2.13
        return torch.jit.load(str(directory / "model.torchscript.pt"))


def _outputs(directory: Path) -> torch.Tensor:
    """Outputs of the exported model on the model file's whole eval split (a batch size not traced)."""
    from optagent.contract import ModelFile

    mf = ModelFile.from_path(FIXTURES / "tiny_model.py")
    xs = torch.stack([x for x, _ in mf.data().eval])
    with torch.no_grad():
        return load_exported(directory)(xs)


@pytest.fixture(scope="module")
def exported(search: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    url, _ = search
    trial = _trained_trial(url)
    out = tmp_path_factory.mktemp("export")
    result = _invoke("export", "shared", "--trial", str(trial["number"]), "-o", str(out), "--db", url, "--json")
    assert result.exit_code == 0, result.output
    return {"trial": trial, "dir": out, "json": json.loads(result.stdout)}


def test_export_writes_a_loadable_model_recipe_and_metrics(exported: dict[str, Any]) -> None:
    out, data, trial = exported["dir"], exported["json"], exported["trial"]
    model_file = {"torch.export": "model.pt2", "torchscript": "model.torchscript.pt"}[data["model_format"]]
    assert sorted(Path(f).name for f in data["files"]) == sorted(["metrics.json", model_file, "recipe.json"])
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["params"] == trial["params"] and recipe["trial"] == trial["number"]
    assert len(recipe["model"]["sha256"]) == 64 and recipe["seed"] == trial["number"]  # job seed 0 + number
    assert {"torch", "optuna", "optagent", "python"} <= set(recipe["versions"])
    assert recipe["hardware"]["cpu_model"] and recipe["threads"] >= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recorded"] == trial["metrics"]
    # the rebuilt model evaluates exactly like the trial did in its worker process
    assert metrics["reevaluated"]["accuracy"] == trial["metrics"]["accuracy"]
    assert _outputs(out).shape[1] == 2


def test_apply_rebuilds_the_same_model_bit_for_bit(exported: dict[str, Any], tmp_path: Path) -> None:
    """Fine-tuning is seeded (torch.manual_seed + a seeded shuffle) and the thread count is fixed by the
    recipe, so on CPU the rebuilt weights, outputs and accuracy are identical, not just close."""
    out = exported["dir"]
    result = _invoke("apply", str(out / "recipe.json"), str(FIXTURES / "tiny_model.py"), "-o", str(tmp_path),
                     "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["differences"] == {"accuracy": 0.0}
    assert data["metrics"]["accuracy"] == exported["trial"]["metrics"]["accuracy"]
    assert torch.equal(_outputs(out), _outputs(tmp_path))
    applied = json.loads((tmp_path / "recipe.json").read_text())
    assert applied["applied"]["forced"] is False


def test_apply_refuses_a_different_model_file_unless_forced(exported: dict[str, Any], tmp_path: Path) -> None:
    edited = tmp_path / "tiny_model.py"
    edited.write_text((FIXTURES / "tiny_model.py").read_text() + "\n# edited\n")
    recipe = str(exported["dir"] / "recipe.json")
    refused = _invoke("apply", recipe, str(edited), "-o", str(tmp_path / "a"))
    assert isinstance(refused.exception, UserError)
    assert "--force" in str(refused.exception) and "not the file" in str(refused.exception)
    forced = _invoke("apply", recipe, str(edited), "-o", str(tmp_path / "b"), "--json")
    assert forced.exit_code != 0  # without --force nothing was written
    forced = _invoke("apply", recipe, str(edited), "-o", str(tmp_path / "b"), "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads((tmp_path / "b" / "recipe.json").read_text())["applied"]["forced"] is True


@pytest.mark.parametrize("args, message", [
    (["export", "nojob", "--trial", "1"], "optagent jobs"),
    (["export", "shared", "--trial", "77"], "optagent status"),
])
def test_export_errors_name_the_fix(search: tuple[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    url, _ = search
    result = _invoke(*args, "-o", str(tmp_path / "x"), "--db", url)
    assert isinstance(result.exception, UserError) and message in str(result.exception)


def test_export_refuses_failed_trials_and_unwritable_dirs(search: tuple[str, Path], tmp_path: Path) -> None:
    from optagent.export import exportable_trial, prepare_dir
    from optagent.storage import Job, Trial

    job = Job(name="j", study_name="s", model_path="m.py", model_hash="0" * 64)
    failed = Trial(job_id=1, number=3, state="failed", failure_reason="RuntimeError: boom")
    with pytest.raises(UserError, match="failed .*optagent pareto j"):
        exportable_trial(job, failed, 3)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="writable directory with -o"):
        prepare_dir(blocker / "out")
    with pytest.raises(UserError, match="not an optagent recipe"):
        from optagent.export import load_recipe

        (tmp_path / "r.json").write_text("{}")
        load_recipe(tmp_path / "r.json")


def test_save_model_prefers_torch_export_and_falls_back_to_torchscript_then_state_dict(tmp_path: Path) -> None:
    from torch.ao.quantization import quantize_dynamic

    from optagent.export import save_model

    dense = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    example = torch.randn(3, 4)
    (tmp_path / "a").mkdir()
    files, fmt = save_model(dense, example, tmp_path / "a")
    assert fmt == "torch.export" and files == [tmp_path / "a" / "model.pt2"]
    assert load_exported(tmp_path / "a")(torch.randn(5, 4)).shape == (5, 2)  # the batch dimension is dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = quantize_dynamic(dense, {torch.nn.Linear}, dtype=torch.qint8)
    (tmp_path / "b").mkdir()
    files, fmt = save_model(int8, example, tmp_path / "b")
    assert fmt == "torchscript"  # torch.export cannot take torch.ao packed params; tracing can
    assert torch.equal(load_exported(tmp_path / "b")(example), int8(example))

    class Branchy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return {"logits": x * 2} if x.sum() > 0 else {"logits": x}

    (tmp_path / "c").mkdir()
    files, fmt = save_model(Branchy(), torch.ones(2, 2), tmp_path / "c")
    assert fmt == "state_dict" and [f.name for f in files] == ["state_dict.pt"]

    class OwnFormat(torch.nn.Module):  # e.g. an ONNX Runtime session wrapper
        def optagent_export(self, directory: Path) -> list[Path]:
            (directory / "model.onnx").write_bytes(b"onnx")
            return [directory / "model.onnx"]

    (tmp_path / "d").mkdir()
    assert save_model(OwnFormat(), example, tmp_path / "d") == ([tmp_path / "d" / "model.onnx"], "plugin")
