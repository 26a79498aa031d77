"""The model.py contract: how a user hands optagent a model, its data and its evaluation.

A model file defines four functions (docs/model-contract.md has the full text and an example):

    load_model() -> torch.nn.Module          the trained baseline (train once and cache; see cached_weights)
    load_data() -> optagent.Data             train / eval (held-out) / optional calibration and test sets
    evaluate(model, loader) -> dict          metrics over a DataLoader of (inputs, targets) batches
    example_input() -> batch                 one batch (a tensor, a tuple of tensors or a dict of named
                                             tensors); its first dimension is the default serving batch

and optionally ``loss(outputs, targets) -> Tensor`` for recovery fine-tuning (default: cross-entropy).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from optagent.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader, Dataset

REQUIRED = ("load_model", "load_data", "evaluate", "example_input")


@dataclass
class Data:
    """The data sets a model file provides. Each is a map-style torch Dataset of (input, target) pairs.

    `eval` is the held-out split every trial is measured on (objectives and constraints use it);
    `calibration` feeds static quantization (default: the first 256 samples of `train`);
    `test`, if given, is evaluated too and reported as ``test_<metric>``, never searched on.
    """

    train: Dataset
    eval: Dataset
    calibration: Dataset | None = None
    test: Dataset | None = None


def cache_dir() -> Path:
    path = Path(os.environ.get("OPTAGENT_CACHE_DIR") or Path.home() / ".cache" / "optagent")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """An advisory lock between processes on this host: exclusive, or shared with other shared holders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_weights(model: torch.nn.Module, train: Callable[[torch.nn.Module], None], source_file: str | Path,
                   tag: str = "") -> torch.nn.Module:
    """Return `model` with trained weights, training it at most once per content of `source_file`.

    The weights are cached under a hash of the model file's bytes (plus `tag`), so editing the file
    retrains and trials never do. Concurrent processes wait on a lock instead of training twice.
    """
    import torch

    key = sha256_bytes(Path(source_file).read_bytes() + tag.encode())[:16]
    target = cache_dir() / "weights" / f"{Path(source_file).stem}-{key}.pt"
    with file_lock(target.with_suffix(".lock")):
        if not target.exists():
            train(model)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            os.close(fd)
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, target)
    model.load_state_dict(torch.load(target, map_location="cpu", weights_only=True))
    return model.eval()


class ModelFile:
    """A loaded model.py: imports it once and memoises its (expensive) functions per process."""

    def __init__(self, module: ModuleType, path: str, sha256: str):
        self.module, self.path, self.sha256 = module, path, sha256
        self._model: torch.nn.Module | None = None
        self._data: Data | None = None
        self._example: Any = None

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> ModelFile:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"model file {str(path)!r} does not exist; pass the path to your model.py")
        if p.suffix != ".py":
            raise UserError(f"model file {str(path)!r} is not a .py file; pass a Python file that follows "
                            "docs/model-contract.md")
        return cls.from_source(p.read_bytes(), str(p.resolve()))

    @classmethod
    def from_source(cls, source: bytes, path: str) -> ModelFile:
        """Import model code sent as bytes (a worker's copy is cached by hash, so no path is trusted)."""
        digest = sha256_bytes(source)
        if not Path(path).is_file() or sha256_bytes(Path(path).read_bytes()) != digest:
            copy = cache_dir() / "models" / digest[:16] / Path(path).name
            if not copy.exists():
                copy.parent.mkdir(parents=True, exist_ok=True)
                tmp = copy.with_suffix(".tmp")
                tmp.write_bytes(source)
                os.replace(tmp, copy)
            path = str(copy)
        name = f"optagent_model_{digest[:16]}"
        if name in sys.modules:
            return cls(sys.modules[name], path, digest)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UserError(f"cannot import {path!r}; it must be a Python source file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise UserError(f"importing {path} failed: {type(exc).__name__}: {exc}; run it with python to see "
                            "the traceback") from exc
        missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; define them as in docs/model-contract.md "
                            "(run `optagent check` for details)")
        return cls(module, path, digest)

    # -- the contract ------------------------------------------------------------------------------
    def load_model(self) -> torch.nn.Module:
        """A fresh copy of the baseline each call (strategies modify models in place)."""
        import copy

        if self._model is None:
            import torch

            model = self.module.load_model()
            if not isinstance(model, torch.nn.Module):
                raise UserError(f"load_model() returned {type(model).__name__}, not a torch.nn.Module; return the "
                                "model object itself (weights loaded), not a dict, a state_dict or a tuple")
            self._model = model.eval()
        return copy.deepcopy(self._model)

    def data(self) -> Data:
        if self._data is None:
            raw = self.module.load_data()
            if isinstance(raw, Data):
                self._data = raw
            elif isinstance(raw, dict) and {"train", "eval"} <= set(raw) <= set(Data.__dataclass_fields__):
                self._data = Data(**raw)
            else:
                raise UserError(f"load_data() returned {type(raw).__name__}; return optagent.Data(train=..., "
                                "eval=...) (or a dict with train and eval keys) of torch Datasets")
        return self._data

    def example_input(self) -> Any:
        if self._example is None:
            self._example = self.module.example_input()
        return self._example

    @property
    def default_batch_size(self) -> int:
        from optagent.inputs import batch_size

        return batch_size(self.example_input())

    def batch(self, size: int, device: Any = None, split: str = "eval") -> Any:
        """A real input batch of `size` samples from a split (cycled through if it is smaller), in the
        form the model takes (a tensor, tuple or dict; see optagent.inputs), on `device`."""
        from optagent import inputs as ins

        data = getattr(self.data(), split)
        return ins.to(ins.collate([data[i % len(data)][0] for i in range(size)]), device)

    def loader(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
               limit: int | None = None) -> DataLoader:
        """Batches of a split; `limit` keeps its first samples only (quick estimates, e.g. sensitivity)."""
        import torch
        from torch.utils.data import DataLoader, Subset

        data = self.data()
        dataset = getattr(data, split)
        if split == "calibration" and dataset is None:
            dataset = Subset(data.train, range(min(256, len(data.train))))  # type: ignore[arg-type]
        if limit is not None and limit < len(dataset):
            dataset = Subset(dataset, range(limit))
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)

    def evaluate(self, model: Any, split: str = "eval", batch_size: int = 256,
                 limit: int | None = None) -> dict[str, float]:
        import torch

        with torch.inference_mode():
            metrics = self.module.evaluate(model, self.loader(split, batch_size, limit=limit))
        return {str(k): float(v) for k, v in dict(metrics).items()}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        custom = getattr(self.module, "loss", None)
        return custom(outputs, targets) if callable(custom) else F.cross_entropy(outputs, targets)


@dataclass(frozen=True)
class Problem:
    piece: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.piece}: {self.message}; fix: {self.fix}"


@dataclass
class Inspection:
    """What checking a model file found: its problems, and what a search needs to know before it starts."""

    model_file: ModelFile | None
    problems: list[Problem]
    metrics: dict[str, float] | None = None  # one evaluation of the baseline on the eval split
    has_test: bool = False  # evaluated too, as test_<metric>
    default_batch: int | None = None
    input: str = ""  # the example input's form (optagent.inputs.describe)


def inspect(path: str, *, evaluate: bool = True, on_stage: Callable[[str], None] | None = None,
            reserved: frozenset[str] = frozenset()) -> Inspection:
    """Validate a model file piece by piece, naming each problem and its fix (`optagent check`, and every
    command that takes a model file, in a child process: optagent.preflight).

    Checked: the four functions exist and run; load_model() returns a Module; load_data() returns Data of
    non-empty map-style data sets of (input, target) pairs; example_input() is one batch (a tensor, tuple
    or dict of tensors, batch >= 1) of the same form as the eval samples (structure, dtypes and shapes
    apart from the batch); the model runs on it; evaluate() (unless `evaluate` is False) returns finite
    floats under names that are not optagent's own measurements (`reserved`: optagent.metrics.RESERVED).
    `on_stage(piece)` is called before each piece runs, so a caller watching from outside knows where a
    model file hangs.
    """
    import torch

    from optagent import inputs as ins

    stage = on_stage or (lambda piece: None)
    problems: list[Problem] = []
    stage("import")
    try:
        mf = ModelFile.from_path(path)
    except UserError as exc:
        return Inspection(None, [Problem("model file", str(exc).split(";")[0], str(exc).split(";", 1)[-1].strip())])

    def attempt(piece: str, fn: Callable[[], Any], fix: str) -> Any:
        stage(piece)
        try:
            return fn()
        except Exception as exc:
            message = str(exc).split(";")[0] if isinstance(exc, UserError) else f"raised {type(exc).__name__}: {exc}"
            problems.append(Problem(piece, message, fix))
            return None

    model = attempt("load_model()", mf.load_model, "make load_model() return the trained torch.nn.Module")
    data = attempt("load_data()", mf.data, "return optagent.Data(train=..., eval=...) of torch Datasets")
    sample = None
    if data is not None:
        for split in ("train", "eval"):
            ds = getattr(data, split, None)
            if ds is None or not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
                problems.append(Problem(f"load_data().{split}", "is missing or not a map-style Dataset",
                                        "use a torch.utils.data.Dataset such as TensorDataset(x, y)"))
            elif len(ds) == 0:
                problems.append(Problem(f"load_data().{split}", "is empty", "give it at least one sample"))
            else:
                first: Callable[[], Any] = functools.partial(ds.__getitem__, 0)
                item = attempt(f"load_data().{split}[0]", first, "make items (input, target)")
                if item is not None and not (isinstance(item, tuple | list) and len(item) == 2):
                    problems.append(Problem(f"load_data().{split}[0]", "is not an (input, target) pair",
                                            "make each item a tuple (input, target); the input may be a tensor, "
                                            "a tuple of tensors or a dict of named tensors"))
                elif item is not None and split == "eval":
                    collate_first: Callable[[], Any] = functools.partial(ins.collate, [item[0]])
                    sample = attempt("load_data().eval[0]", collate_first,
                                     "make each input a tensor, a tuple of tensors or a dict of named tensors")
    example = attempt("example_input()", mf.example_input,
                      "return one batch: a tensor, a tuple of tensors or a dict of named tensors")
    if example is not None and not ins.is_inputs(example):
        problems.append(Problem("example_input()", f"returned {type(example).__name__}, not a batch of tensors",
                                "return a tensor, a tuple of tensors or a dict of named tensors whose first "
                                "dimension is the batch, e.g. torch.randn(1, 3, 32, 32)"))
        example = None
    if example is not None and ins.batch_size(example) < 1:
        problems.append(Problem("example_input()", "has batch size 0", "give the batch at least one sample"))
        example = None
    if example is not None and sample is not None and ins.signature(example) != ins.signature(sample):
        problems.append(Problem("example_input()", f"({ins.describe(example)}) does not match the eval samples "
                                f"({ins.describe(sample)}) apart from the batch size",
                                "build example_input() from the same data and dtypes as load_data().eval, "
                                "so latency is measured on inputs the model sees in evaluation"))
    if model is not None and example is not None:
        with torch.inference_mode():
            attempt("model(example_input())", lambda: ins.call(model, example),
                    "make example_input() match the model's expected input shape and dtype")
    found = Inspection(mf, problems, has_test=data is not None and getattr(data, "test", None) is not None)
    if example is not None:
        found.default_batch, found.input = ins.batch_size(example), ins.describe(example)
    if evaluate and model is not None and data is not None and not problems:
        metrics = attempt("evaluate(model, loader)", lambda: _evaluate_once(mf, model),
                          "evaluate(model, loader) must loop over (inputs, targets) and return a dict of floats")
        if metrics is not None:
            if not metrics:
                problems.append(Problem("evaluate()", "returned no metrics",
                                        'return a dict such as {"accuracy": 0.97}'))
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                problems.append(Problem("evaluate()", f"returned non-finite values for {', '.join(bad)}",
                                        "return finite floats (a NaN or inf metric cannot be compared with the "
                                        "baseline)"))
            taken = sorted(set(metrics) & reserved)
            if taken:
                problems.append(Problem("evaluate()", f"returns {', '.join(taken)}, which optagent measures itself",
                                        "rename these metrics (e.g. my_latency_ms); optagent's own figures keep "
                                        "their names"))
            found.metrics = metrics
    return found


def _evaluate_once(mf: ModelFile, model: Any) -> dict[str, float]:
    """evaluate() once, with a clear message when it does not return a dict of numbers."""
    import torch

    with torch.inference_mode():
        raw = mf.module.evaluate(model, mf.loader("eval", 256))
    if not isinstance(raw, dict):
        raise UserError(f"evaluate() returned {type(raw).__name__}, not a dict of metrics")
    metrics: dict[str, float] = {}
    for key, value in raw.items():
        try:
            metrics[str(key)] = float(value)
        except (TypeError, ValueError):
            raise UserError(f"evaluate() returned {type(value).__name__} for {str(key)!r}, not a number") from None
    return metrics
