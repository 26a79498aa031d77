"""`optagent export` and `optagent apply`: get a trial's model back out, and rebuild it from its recipe.

A trial is rebuilt with `optagent.trial.pipeline.build` from the payload it ran with (same params, same seed,
same thread count), so the exported model is the one that was measured. Export writes three things:

- the model: whatever the final model's `optagent_export(directory)` writes if it has that method (e.g.
  an ONNX Runtime session); else `model.pt2` (torch.export, dynamic batch); else TorchScript
  (`model.torchscript.pt`; torch.ao int8 models land here); else `state_dict.pt` plus the recipe;
- `recipe.json`: strategies, params, seeds, threads, the baseline model file's sha256, library versions
  and the hardware fingerprint the trial was measured on;
- `metrics.json`: the stored metrics, and the evaluation metrics re-computed on the rebuilt model.

`apply` takes a recipe and a model file (which must hash to the recipe's sha256 unless --force),
rebuilds, re-evaluates and writes the same three files.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optagent import inputs as ins
from optagent.errors import TrialFailed, UserError
from optagent.protocol import JobRef, ModelRef, TrialPayload
from optagent.storage import Job, Trial

RECIPE_FORMAT = "optagent-recipe/1"
MANIFEST = ".optagent-export.json"  # what an export wrote into its directory: all --force ever removes


@dataclass
class Exported:
    """What export/apply wrote, and the evaluation metrics of the rebuilt model against the recorded ones."""

    directory: Path
    files: list[Path] = field(default_factory=list)
    model_format: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    recorded: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. why the model was saved as a state_dict

    @property
    def differences(self) -> dict[str, float]:
        return {k: v - self.recorded[k] for k, v in self.metrics.items() if k in self.recorded}

    def to_json(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "files": [str(f) for f in self.files],
                "model_format": self.model_format, "metrics": self.metrics, "recorded": self.recorded,
                "differences": self.differences, "notes": self.notes}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("optagent", "torch", "optuna"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def prepare_dir(directory: Path, force: bool = False) -> Path:
    """Create the output directory and check it is writable, or say how to fix it.

    A directory that is not empty is refused unless `force`; then only the files an earlier export listed
    in its manifest are removed (the user's own files stay), and the new export is written beside them.
    """
    refuse_nonempty(directory, force)
    if force and directory.is_dir():
        for name in _manifest(directory):
            target = directory / name
            if Path(name).name == name and target.is_file():  # plain names only: nothing outside the directory
                target.unlink()
        (directory / MANIFEST).unlink(missing_ok=True)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".optagent-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {directory} ({exc.strerror or exc}); pick a writable directory "
                        "with -o") from None
    return directory


def refuse_nonempty(directory: Path, force: bool) -> None:
    """UserError for a directory that holds files, unless `force` (see prepare_dir)."""
    if not force and directory.is_dir() and any(directory.iterdir()):
        raise UserError(f"{directory} is not empty; write into a new or empty directory with -o, or pass --force "
                        "to replace an earlier export there (only the files it wrote are removed)")


def _manifest(directory: Path) -> list[str]:
    try:
        names = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in names if isinstance(n, str)]


def _write_manifest(directory: Path, files: list[Path]) -> None:
    names = sorted({*_manifest(directory), *(f.name for f in files if f.parent == directory)})
    _write_json(directory / MANIFEST, {"written_by": "optagent export", "files": names})


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return path


def exportable_trial(job: Job, trial: Trial | None, number: int) -> Trial:
    """The trial if it can be exported, else a UserError naming what to do instead."""
    if trial is None:
        raise UserError(f"job {job.name} has no trial {number}; `optagent status {job.name}` lists its trials")
    if trial.state == "failed":
        raise UserError(f"trial {number} of job {job.name} failed ({trial.failure_reason or 'no reason'}); "
                        f"export a completed one, e.g. from `optagent pareto {job.name}`")
    if trial.state != "complete":
        raise UserError(f"trial {number} of job {job.name} is {trial.state}, not complete; wait for it or "
                        f"export a completed one (`optagent status {job.name}`)")
    return trial


def recipe_of(job: Job, trial: Trial) -> dict[str, Any]:
    """The JSON that rebuilds a trial anywhere: everything `pipeline.build` reads, plus provenance."""
    from optagent.job import JobConfig, payload_for
    from optagent.registry import recipe_plugins

    payload, cfg = payload_for(job, trial), JobConfig.of(job)
    return {
        "format": RECIPE_FORMAT,
        "job": {"id": job.id, "name": job.name},
        "trial": trial.number,
        "recipe": trial.recipe,
        "strategies": payload.strategies,
        "params": payload.params,
        "objectives": payload.objectives,
        "seed": payload.seed,
        "job_seed": cfg.seed,
        "threads": payload.threads,
        "device": payload.device,
        "constraint": {"metric": cfg.constraint_metric, "max_drop": cfg.max_accuracy_drop,
                       "max_relative_drop": cfg.max_relative_drop},
        "model": {"path": job.model_path, "sha256": job.model_hash},
        "versions": versions(),
        # each plugin behind the recipe's strategies (and every metric plugin), with its version: a plugin
        # that changed its behaviour under another version can be told apart
        "plugins": recipe_plugins(list(payload.strategies)),
        "hardware": {k: v for k, v in (trial.hardware or {}).items() if k != "model_info"},
        "recorded_metrics": trial.metrics,
    }


def _payload(recipe: dict[str, Any], model_path: str, sha256: str) -> TrialPayload:
    job = recipe.get("job") or {}
    return TrialPayload(trial=int(recipe["trial"]), job=JobRef(int(job.get("id") or 0), str(job.get("name") or "")),
                        params=recipe.get("params") or {}, model=ModelRef(model_path, sha256),
                        strategies=recipe.get("strategies") or list(recipe.get("params") or {}),
                        objectives=recipe.get("objectives") or [], seed=int(recipe.get("seed", 0)),
                        threads=int(recipe.get("threads", 1)), device=str(recipe.get("device", "auto")))


def _same(want: Any, got: Any) -> bool:
    import torch

    a, b = ins.leaves(want), ins.leaves(got)
    return bool(a) and len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(x.float(), y.float(), atol=1e-5) for x, y in zip(a, b, strict=True))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def _torch_export(model: Any, example: Any, target: Path, why: list[str]) -> bool:
    """torch.export with a dynamic batch dimension, else at the example's batch; False (and why) if it cannot."""
    import torch

    if ins.batch_size(example) == 1:  # torch.export specializes a dimension of size 1: export from two rows
        example = ins.repeat_to(example, 2)
    args, kwargs = ins.as_args(example)
    for spec in (ins.batch_dims(example), None):
        try:
            program = torch.export.export(model, args, kwargs, dynamic_shapes=spec)
            torch.export.save(program, str(target))
            if _same(ins.call(model, example), ins.call(torch.export.load(str(target)).module(), example)):
                return True
            reason = "its outputs differ from the eager model's"
        except Exception as exc:  # try the next spelling, then the next format
            reason = _first_line(exc)
    why.append(f"torch.export: {reason}")
    target.unlink(missing_ok=True)
    return False


def _torchscript(model: Any, example: Any, target: Path, why: list[str]) -> bool:
    """TorchScript by tracing (torch.ao quantized models, which torch.export cannot take, trace fine)."""
    import torch

    try:
        if isinstance(example, dict):
            traced = torch.jit.trace(model, example_kwarg_inputs=example, check_trace=False)
        else:
            traced = torch.jit.trace(model, example if isinstance(example, tuple) else (example,), check_trace=False)
        torch.jit.save(traced, str(target))
        if _same(ins.call(model, example), ins.call(torch.jit.load(str(target)), example)):
            return True
        why.append("TorchScript: the traced model's outputs differ from the eager model's (data-dependent control "
                   "flow?)")
    except Exception as exc:  # data-dependent control flow and the like
        why.append(f"TorchScript: {_first_line(exc)}")
    target.unlink(missing_ok=True)
    return False


def save_model(model: Any, example: Any, directory: Path, why: list[str] | None = None) -> tuple[list[Path], str]:
    """Write the model in the most loadable form it allows; returns (files, format).

    Order: the model's own `optagent_export(directory)` (e.g. ONNX Runtime), `model.pt2` (torch.export,
    load with `torch.export.load(path).module()`), `model.torchscript.pt` (`torch.jit.load`), else
    `state_dict.pt` (rebuild the module with `optagent apply`). Each candidate must reproduce the eager
    outputs on the example input before it is kept. Why each format was passed over goes into `why`.
    """
    import torch

    why = why if why is not None else []
    hook = getattr(model, "optagent_export", None)
    if callable(hook):
        return [Path(p) for p in hook(directory)], "plugin"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _torch_export(model, example, directory / "model.pt2", why):
            return [directory / "model.pt2"], "torch.export"
        if _torchscript(model, example, directory / "model.torchscript.pt", why):
            return [directory / "model.torchscript.pt"], "torchscript"
    target = directory / "state_dict.pt"
    torch.save(model.state_dict(), target)
    return [target], "state_dict"


def _rebuild(recipe: dict[str, Any], payload: TrialPayload, directory: Path,
             recorded: dict[str, Any]) -> Exported:
    from optagent.trial import pipeline

    try:
        built = pipeline.build(payload)
    except TrialFailed as exc:
        raise UserError(f"rebuilding trial {recipe['trial']} failed: {exc}") from None
    mf = built.model_file
    example = ins.to(mf.example_input(), built.ctx.device)
    why: list[str] = []
    files, model_format = save_model(built.model, example, directory, why)
    metrics = dict(mf.evaluate(built.model))
    evaluated = {k: float(v) for k, v in recorded.items() if k in metrics}
    result = Exported(directory, files, model_format, metrics, evaluated)
    if model_format == "state_dict":
        result.notes.append("saved the weights only (state_dict.pt; rebuild the module with `optagent apply`) because "
                            + "; ".join(why))
    recipe = {**recipe, "model_format": model_format, "model_files": [f.name for f in files]}
    result.files.insert(0, _write_json(directory / "recipe.json", recipe))
    result.files.insert(1, _write_json(directory / "metrics.json", {
        "trial": recipe["trial"], "recorded": recorded, "reevaluated": metrics,
        "differences": result.differences}))
    _write_manifest(directory, result.files)
    return result


def export_trial(job: Job, trial: Trial, directory: Path, force: bool = False) -> Exported:
    """Rebuild a stored trial and write its model, recipe.json and metrics.json into `directory`."""
    from optagent.contract import sha256_bytes

    prepare_dir(directory, force)
    recipe = recipe_of(job, trial)
    path = Path(job.model_path)
    current = sha256_bytes(path.read_bytes()) if path.is_file() else None
    if current != job.model_hash:
        _write_manifest(directory, [_write_json(directory / "recipe.json", recipe)])
        what = "is missing" if current is None else "changed since the job ran (sha256 differs)"
        raise UserError(f"model file {path} {what}; restore it, or rebuild from {directory / 'recipe.json'} "
                        f"with `optagent apply {directory / 'recipe.json'} MODEL.py -o DIR --force`")
    return _rebuild(recipe, _payload(recipe, str(path), job.model_hash), directory, trial.metrics)


def load_recipe(path: Path) -> dict[str, Any]:
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"recipe {path} does not exist; pass the recipe.json written by `optagent export`") \
            from None
    except (OSError, ValueError) as exc:
        raise UserError(f"recipe {path} is not readable JSON ({exc}); pass the recipe.json written by "
                        "`optagent export`") from None
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT or "params" not in recipe:
        raise UserError(f"{path} is not an optagent recipe (format {RECIPE_FORMAT}); pass the recipe.json "
                        "written by `optagent export`")
    return recipe


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _outside(value: Any, dists: list[Any]) -> str | None:
    """Why `value` fits none of a parameter's distributions (its variants), or None when one takes it.

    Numbers must be of the right kind and inside the searched range (a recipe asking for 10**9 fine-tuning
    epochs would run for ever); a categorical value must be a plain value of the kind the choices are (the
    choices themselves may depend on the machine and the model, so membership is left to the strategy)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    shown = []
    for d in dists:
        if isinstance(d, IntDistribution):
            if _is_int(value) and d.low <= value <= d.high:
                return None
            shown.append(f"a whole number in [{d.low}, {d.high}]")
        elif isinstance(d, FloatDistribution):
            if isinstance(value, int | float) and not isinstance(value, bool) and d.low <= value <= d.high:
                return None
            shown.append(f"a number in [{d.low:g}, {d.high:g}]")
        elif isinstance(d, CategoricalDistribution):
            kinds = {type(c) for c in d.choices}
            if value is None or type(value) in kinds or value in d.choices:
                return None
            shown.append("one of " + ", ".join(map(repr, d.choices[:8])) + (", ..." if len(d.choices) > 8 else ""))
    return f"is {json.dumps(value)[:60]}, not " + " or ".join(dict.fromkeys(shown)) if shown else None


def validate_recipe(recipe: dict[str, Any], path: Path, default_batch: int = 1) -> None:
    """Check a recipe before anything runs: its fields' types, its strategies (installed) and every parameter
    against its strategy's space. One UserError naming the field and the fix."""
    from optagent import hardware
    from optagent.job import DEVICES
    from optagent.registry import build_registry
    from optagent.strategy import Objective, SpaceContext

    def bad(name: str, problem: str) -> UserError:
        return UserError(f"recipe {path}: {name} {problem}; fix it, or export the trial again with `optagent export`")

    if "trial" not in recipe:
        raise bad("trial", "is missing")
    for key in ("trial", "seed", "threads"):
        if key in recipe and not _is_int(recipe[key]):
            raise bad(key, f"is {json.dumps(recipe[key])[:60]}, not a whole number")
    if int(recipe.get("threads", 1)) < 1:
        raise bad("threads", "must be at least 1")
    if recipe.get("device", "auto") not in DEVICES:
        raise bad("device", f"is {json.dumps(recipe.get('device'))[:60]}, not one of {', '.join(DEVICES)}")
    for key in ("strategies", "objectives"):
        value = recipe.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(key, f"is {json.dumps(value)[:60]}, not a list of names")
    params = recipe.get("params")
    if not isinstance(params, dict):
        raise bad("params", f"is a {type(params).__name__}, not a dict of strategy parameters")
    registry = build_registry(log_warnings=False)
    for name in [*params, *(recipe.get("strategies") or [])]:
        if name not in registry.strategies:
            raise UserError(f"recipe {path}: {registry.why_missing(name, ' here')}; install the plugin the recipe "
                            "names (its 'plugins' entry says which version)")
    try:
        objectives = tuple(Objective.parse(o) for o in recipe.get("objectives") or [])
    except (UserError, ValueError) as exc:
        raise bad("objectives", f"hold a bad entry ({exc})") from None
    ctx = SpaceContext(capabilities=hardware.detect(str(recipe.get("device", "auto"))), objectives=objectives,
                       default_batch_size=max(1, default_batch), searched=tuple(recipe.get("strategies") or params))
    for name, values in params.items():
        if not isinstance(values, dict):
            raise bad(f"params.{name}", f"is a {type(values).__name__}, not a dict of {name}'s parameters")
        space: dict[str, list[Any]] = {}
        for param in registry.strategies[name].search_space(ctx):
            space.setdefault(param.name, []).append(param.distribution)
        for key, value in values.items():
            problem = _outside(value, space.get(key, []))
            if problem:
                raise bad(f"params.{name}.{key}", f"{problem} (the space {name} searches)")


def apply_recipe(recipe_path: Path, model_path: Path, directory: Path, force: bool = False,
                 default_batch: int = 1) -> Exported:
    """Rebuild a recipe on `model_path`, re-evaluate it and write the same files as export."""
    from optagent.contract import sha256_bytes

    recipe = load_recipe(recipe_path)
    validate_recipe(recipe, recipe_path, default_batch)
    if not model_path.is_file():
        raise UserError(f"model file {model_path} does not exist; pass the model.py the recipe was made from")
    actual = sha256_bytes(model_path.read_bytes())
    expected = (recipe.get("model") or {}).get("sha256")
    if actual != expected and not force:
        raise UserError(f"{model_path} (sha256 {actual[:12]}…) is not the file the recipe was made from "
                        f"(sha256 {str(expected)[:12]}…); pass that file, or --force to rebuild anyway")
    prepare_dir(directory, force)
    recipe = {**recipe, "applied": {"model_path": str(model_path.resolve()), "sha256": actual,
                                    "forced": actual != expected, "versions": versions(),
                                    "at": dt.datetime.now(dt.timezone.utc).isoformat(),
                                    "host": platform.node(), "cpu_count": os.cpu_count()}}
    payload = _payload(recipe, str(model_path.resolve()), actual)
    return _rebuild(recipe, payload, directory, dict(recipe.get("recorded_metrics") or {}))
