"""Helpers for a plugin's own unit tests: a real TrialContext, a model file, and one strategy applied as the
trial pipeline applies it. No pytest needed.

    from optagent.testing import apply_strategy, default_model_file, make_trial

    trial = make_trial(default_model_file(tmp_path), {"finetune": {"epochs": 1}, "mine": {"mode": "on"}})
    model, trial = apply_strategy(MyStrategy(), {"mode": "on"}, trial)
    assert trial.notes == [...]

`make_trial` builds the TrialContext a worker builds (baseline loaded on the device, the model file, the
capabilities, every strategy's params, seed, settings, constraint, analyses), without the timing lock and
without early stopping (`trial.report` records values and never stops).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optagent.strategy import Constraint, Objective, Params, SpaceContext, Strategy, TrialContext

if TYPE_CHECKING:
    from optagent.contract import ModelFile

__all__ = ["DEFAULT_MODEL_SOURCE", "apply_strategy", "default_model_file", "load_model_file", "make_trial",
           "space_context"]

DEFAULT_MODEL_SOURCE = '''"""optagent conformance model: a small conv + linear classifier on 8x8 images (3 classes)."""

import optagent
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(360, 1, 8, 8, generator=g)
    score = torch.stack([x[:, 0, :4].mean((1, 2)), x[:, 0, 4:].mean((1, 2)), x[:, 0, :, :4].mean((1, 2))], 1)
    return x, score.argmax(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _train(model):
    x, y = _data()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:240]), y[:240]).backward()
        opt.step()
    model.eval()


def load_model():
    torch.manual_seed(0)
    return optagent.cached_weights(Net(), _train, __file__)


def load_data():
    x, y = _data()
    return optagent.Data(train=TensorDataset(x[:240], y[:240]), eval=TensorDataset(x[240:], y[240:]))


def evaluate(model, loader):
    correct = total = 0
    for xb, yb in loader:
        correct += int((model(xb).argmax(1) == yb).sum())
        total += len(yb)
    return {"accuracy": correct / total}


def example_input():
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
'''

DEFAULT_OBJECTIVES = ("accuracy:max", "latency_ms:min")


def default_model_file(directory: str | os.PathLike[str]) -> Path:
    """The conformance suite's model file (a small conv + linear classifier, trained once and cached), written
    to `directory`/conformance_model.py unless it is there already. Returns its path."""
    path = Path(directory) / "conformance_model.py"
    if not path.exists() or path.read_text() != DEFAULT_MODEL_SOURCE:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(DEFAULT_MODEL_SOURCE)
        os.replace(tmp, path)
    return path


def load_model_file(model_file: ModelFile | str | os.PathLike[str]) -> ModelFile:
    """A `ModelFile` (the loaded model.py: `load_model()`, `example_input()`, `batch(n, device)`,
    `loader(split, batch_size)`, `evaluate(model)`, `loss(...)`) from a path, or the one given."""
    from optagent.contract import ModelFile

    return model_file if isinstance(model_file, ModelFile) else ModelFile.from_path(model_file)


def space_context(model_file: ModelFile | str | os.PathLike[str], objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                  device: str = "cpu", analysis: Mapping[str, Any] | None = None,
                  searched: Sequence[str] = ()) -> SpaceContext:
    """The SpaceContext a job on this machine gives `search_space` for this model file: this machine's
    capabilities, the objectives, and what the baseline trial reports about the model (`model_info`)."""
    from optagent import hardware
    from optagent.trial.pipeline import model_info

    mf = load_model_file(model_file)
    info = model_info(mf, mf.load_model())
    return SpaceContext(capabilities=hardware.detect(device), objectives=tuple(Objective.parse(o) for o in objectives),
                        default_batch_size=mf.default_batch_size, has_conv=info["has_conv"],
                        has_linear=info["has_linear"], model_info=info, analysis=dict(analysis or {}),
                        searched=tuple(searched))


def make_trial(model_file: ModelFile | str | os.PathLike[str], params: Mapping[str, Params] | None = None, *,
               seed: int = 0, device: str = "cpu", threads: int | None = None,
               settings: Mapping[str, Any] | None = None, constraint: Constraint | None = None,
               analysis: Mapping[str, Any] | None = None) -> TrialContext:
    """A real `TrialContext` for `model_file` (a path or a ModelFile), as a worker builds it: the trained
    baseline loaded on `device` (`trial.baseline`; get the model to transform with
    `trial.model_file.load_model()`), this machine's capabilities, `params` (every strategy's params in
    the trial, by strategy name), the seed (torch is seeded with it), settings, the job's constraint
    (`optagent.strategy.Constraint`) and strategies' analyses. `trial.compute()` is a no-op here and
    `trial.report()` records values without ever stopping the trial."""
    import torch

    from optagent import hardware

    mf = load_model_file(model_file)
    caps = hardware.detect(device)
    torch.manual_seed(seed)
    return TrialContext(model_file=mf, baseline=mf.load_model().to(caps.device), device=torch.device(caps.device),
                        capabilities=caps, params={k: dict(v) for k, v in (params or {}).items()}, seed=seed,
                        threads=threads or torch.get_num_threads(), settings=dict(settings or {}),
                        constraint=constraint, analysis=dict(analysis or {}))


def apply_strategy(strategy: Strategy, params: Params, trial: TrialContext | None = None, *,
                   model_file: ModelFile | str | os.PathLike[str] | None = None, ctx: SpaceContext | None = None,
                   model: Any = None, force: bool = False) -> tuple[Any, TrialContext]:
    """Run one strategy the way the pipeline does: `configure(params)`, then `apply` on a fresh copy of the
    baseline (or `model`) unless `is_off(params)` (`force=True` applies anyway, as the conformance suite
    does at the off point). Returns (model in eval mode, trial). A new trial is made from `model_file` when
    none is given; `params` are recorded in `trial.params`."""
    import torch

    if trial is None:
        if model_file is None:
            raise TypeError("apply_strategy needs a trial (make_trial) or a model_file")
        trial = make_trial(model_file, {strategy.name: dict(params)})
    trial.params.setdefault(strategy.name, dict(params))
    ctx = ctx or SpaceContext(capabilities=trial.capabilities)
    model = trial.model_file.load_model().to(trial.device) if model is None else model
    strategy.configure(dict(params), trial)
    if force or (params and not strategy.is_off(dict(params), ctx)):  # the pipeline skips {} and off points
        model = strategy.apply(model, dict(params), trial)
        if model is None:
            raise TypeError(f"{strategy.name}: apply() returned None; return the model (the same object after "
                            "changing it in place, or a new one)")
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model, trial
