"""The conformance suite for plugin authors: subclass, override one fixture, run pytest.

    from optagent.testing.conformance import StrategyConformance

    class TestMyStrategy(StrategyConformance):
        @pytest.fixture
        def strategy(self):
            return MyStrategy()

Every built-in strategy passes the same suite (tests/test_conformance.py). It checks the contract of
`optagent.Strategy`: a valid search space whose "off" point is inside it; "off" leaves the model
bit-identical; sampled points keep the model runnable with the same output shape and leave the baseline
alone; results are deterministic under a seed; params survive JSON; and a trial using the strategy runs
in a separate worker process, found through the plugin registry exactly as a real worker finds it (so the
plugin must be installed, e.g. ``pip install -e .``).

The checks run on a small conv + linear classifier the suite writes itself; override `model_file_path`
to check against your own model file (docs/model-contract.md). pytest is needed, as for any test suite.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from optagent.inputs import call
from optagent.metrics import RESERVED, Metric
from optagent.strategy import Param, Params, SpaceContext, Stage, Strategy, TrialContext, suggest

if TYPE_CHECKING:
    import torch

    from optagent.contract import ModelFile

__all__ = ["DEFAULT_MODEL_SOURCE", "MetricConformance", "StrategyConformance"]

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

# Quick timing for the worker check: it proves the trial runs and is measured, not how fast it is.
FAST_MEASURE = {"warmup": 1, "min_reps": 3, "max_reps": 20, "min_time_s": 0.0, "max_time_s": 0.5}
_JSON_SCALARS = (str, int, float, bool, type(None))


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value, allow_nan=False))


def _outputs(model: Any, example: Any) -> Any:
    import torch

    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.inference_mode():
        return call(model, example)


def _leaves(value: Any) -> list[torch.Tensor]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _leaves(value[k])]
    return []


def _same(a: Any, b: Any) -> bool:
    import torch

    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(la, lb, strict=True))


def _shapes(value: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in _leaves(value)]


def _state_of(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _inside(distribution: Any, value: Any) -> bool:
    try:
        return bool(distribution._contains(distribution.to_internal_repr(value)))
    except (ValueError, TypeError):  # a categorical's to_internal_repr raises for a value it does not list
        return False


class StrategyConformance:
    """The contract of a strategy. Subclass and override the `strategy` fixture (one test class each).

    Class attributes tune the cost: `sample_seeds` are the RandomSampler seeds of the sampled points,
    `worker_timeout_s` bounds the worker-process check; `sampling_context` sets other strategies' params for
    the sampled points.
    """

    sample_seeds: ClassVar[tuple[int, ...]] = (0, 1, 2, 3, 4)
    # other strategies' params while the points are sampled (default: every other installed strategy at its
    # off params); set it when your parameters are conditional on another strategy's, e.g.
    # {"finetune": {"epochs": 1}}, so the sampled points exercise them
    sampling_context: ClassVar[dict[str, Params]] = {}
    worker_timeout_s: ClassVar[float] = 180.0

    # -- fixtures an author overrides --------------------------------------------------------------------
    @pytest.fixture
    def strategy(self) -> Strategy:
        """The strategy under test: override this fixture to return an instance of yours."""
        raise NotImplementedError("override the `strategy` fixture in your StrategyConformance subclass")

    @pytest.fixture
    def model_file_path(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A model.py the checks run on; default: a small conv + linear classifier written by the suite."""
        path = tmp_path_factory.getbasetemp() / "optagent-conformance" / "conformance_model.py"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(DEFAULT_MODEL_SOURCE)
        return path

    @pytest.fixture
    def model_file(self, model_file_path: Path) -> ModelFile:
        from optagent.contract import ModelFile

        return ModelFile.from_path(model_file_path)

    @pytest.fixture
    def space_context(self, model_file: ModelFile) -> SpaceContext:
        """The SpaceContext the search space is declared for: CPU, accuracy:max and latency_ms:min."""
        from optagent import hardware
        from optagent.strategy import Objective

        baseline = model_file.load_model()
        kinds = {type(m).__name__ for m in baseline.modules()}
        return SpaceContext(capabilities=hardware.detect("cpu"),
                            objectives=(Objective.parse("accuracy:max"), Objective.parse("latency_ms:min")),
                            default_batch_size=model_file.default_batch_size,
                            has_conv=any(k.startswith("Conv") for k in kinds),
                            has_linear=any(k.startswith("Linear") for k in kinds))

    # -- helpers ----------------------------------------------------------------------------------------
    def others(self, strategy: Strategy, ctx: SpaceContext) -> dict[str, Params]:
        """The other installed strategies at their off params: what cross-strategy `when`s read in isolation."""
        from optagent.registry import build_registry

        return {name: s.off_params(ctx) for name, s in build_registry().strategies.items() if name != strategy.name}

    def sampled_points(self, strategy: Strategy, ctx: SpaceContext) -> list[Params]:
        """One point per seed in `sample_seeds`, sampled the way a search samples (optuna RandomSampler)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        fixed = {**self.others(strategy, ctx), **self.sampling_context}
        points = []
        for seed in self.sample_seeds:
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
            points.append(suggest(study.ask(), strategy, ctx, fixed))
        return points

    def run_point(self, strategy: Strategy, params: Params, model_file: ModelFile, ctx: SpaceContext,
                  seed: int = 0, *, force_apply: bool = False) -> tuple[Any, TrialContext]:
        """Build one trial's model the way the pipeline does: configure, then apply unless off."""
        import torch

        torch.manual_seed(seed)
        baseline = model_file.load_model()
        model = model_file.load_model()
        trial = TrialContext(model_file=model_file, baseline=baseline, device=torch.device("cpu"),
                             capabilities=ctx.capabilities, params={strategy.name: dict(params)}, seed=seed,
                             threads=torch.get_num_threads())
        strategy.configure(dict(params), trial)
        if force_apply or not strategy.is_off(dict(params), ctx):
            model = strategy.apply(model, dict(params), trial)
        if isinstance(model, torch.nn.Module):
            model.eval()
        return model, trial

    # -- the checks -------------------------------------------------------------------------------------
    def test_identity(self, strategy: Strategy) -> None:
        assert isinstance(strategy, Strategy), f"{strategy!r} is not an optagent.Strategy instance"
        name = getattr(strategy, "name", None)
        assert isinstance(name, str) and name.isidentifier(), (
            f"strategy name {name!r} must be a Python identifier (it prefixes Optuna params as name.param)")
        assert isinstance(strategy.stage, Stage), f"{name}: stage must be an optagent.Stage, got {strategy.stage!r}"
        assert isinstance(strategy.description, str) and strategy.description.strip(), (
            f"{name}: set a one-sentence `description` (shown by `optagent plugins`)")

    def test_search_space_is_valid(self, strategy: Strategy, space_context: SpaceContext) -> None:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        from optagent.registry import build_registry
        from optagent.strategy import ordered_space

        space = strategy.search_space(space_context)
        assert isinstance(space, list) and space, f"{strategy.name}: search_space() must return a non-empty list"
        installed = build_registry().strategies
        declared: dict[str, list[Param]] = {}
        for p in space:
            declared.setdefault(p.name, []).append(p)
        keys: set[str] = set()
        for p in space:
            assert isinstance(p, Param), f"{strategy.name}: {p!r} is not an optagent.Param"
            assert p.name.isidentifier(), f"{strategy.name}: parameter name {p.name!r} must be an identifier"
            assert p.key not in keys, (f"{strategy.name}: parameter {p.key!r} is declared twice (give each "
                                       "declaration of one name its own `variant`)")
            keys.add(p.key)
            d = p.distribution
            assert isinstance(d, CategoricalDistribution | IntDistribution | FloatDistribution), (
                f"{strategy.name}.{p.name}: use a categorical, int or float distribution, not {type(d).__name__}")
            if isinstance(d, CategoricalDistribution):
                assert d.choices, f"{strategy.name}.{p.name}: no choices"
                assert all(isinstance(c, _JSON_SCALARS) for c in d.choices), (
                    f"{strategy.name}.{p.name}: choices must be str/int/float/bool/None, got {d.choices!r}")
            for key, values in (p.when or {}).items():
                owner, dot, name = key.rpartition(".")
                assert values, f"{strategy.name}.{p.key}: `when` lists no values for {key!r}"
                if not dot:
                    parents = declared.get(key, [])
                    assert parents and key != p.name, (
                        f"{strategy.name}.{p.key}: `when` refers to {key!r}, which is not another parameter of "
                        f"{strategy.name} (write 'strategy.param' for another strategy's parameter)")
                elif owner in installed:
                    parents = [q for q in installed[owner].search_space(space_context) if q.name == name]
                    assert parents, (f"{strategy.name}.{p.key}: `when` refers to {key!r}, but strategy {owner!r} "
                                     f"declares no parameter {name!r}")
                else:
                    continue  # a strategy that is not installed here: its params are None
                for v in values:
                    assert v is None or any(_inside(q.distribution, v) for q in parents), (
                        f"{strategy.name}.{p.key}: `when` value {v!r} is outside the space of {key!r}")
        ordered_space([strategy, *(s for n, s in installed.items() if n != strategy.name)], space_context)  # no cycle
        _json_roundtrip(strategy.describe(space_context))

    def test_off_point_is_inside_the_space(self, strategy: Strategy, space_context: SpaceContext) -> None:
        from optagent.strategy import sample

        off = strategy.off_params(space_context)
        assert isinstance(off, dict), f"{strategy.name}: off_params() must return a dict"
        assert _json_roundtrip(off) == off, f"{strategy.name}: off params {off!r} do not survive JSON"

        def pick(key: str, d: Any) -> Any:
            name = key.partition(".")[2].partition("@")[0]
            assert name in off, f"{strategy.name}: off params lack the active parameter {name!r}"
            assert d._contains(d.to_internal_repr(off[name])), (
                f"{strategy.name}: off value {name}={off[name]!r} is outside its distribution {d!r}")
            return off[name]

        active = sample([strategy], space_context, pick, self.others(strategy, space_context))[strategy.name]
        assert set(off) == set(active), (f"{strategy.name}: off params set {sorted(set(off) - set(active))}, which "
                                         "are unknown or inactive at the off point")
        assert strategy.is_off(dict(off), space_context), f"{strategy.name}: is_off(off_params()) is False"

    def test_off_leaves_the_model_unchanged(self, strategy: Strategy, model_file: ModelFile,
                                            space_context: SpaceContext) -> None:
        off = strategy.off_params(space_context)
        example = model_file.example_input()
        model, trial = self.run_point(strategy, off, model_file, space_context, force_apply=True)
        assert _same(_outputs(model, example), _outputs(trial.baseline, example)), (
            f"{strategy.name}: apply() with the off params {off!r} changed the model's outputs")

    def test_sampled_points_keep_the_model_runnable(self, strategy: Strategy, model_file: ModelFile,
                                                    space_context: SpaceContext) -> None:
        example = model_file.example_input()
        expected = _shapes(_outputs(model_file.load_model(), example))
        for seed, params in zip(self.sample_seeds, self.sampled_points(strategy, space_context), strict=True):
            params = _json_roundtrip(params)  # what a worker receives
            model, trial = self.run_point(strategy, params, model_file, space_context, seed)
            before = _state_of(trial.baseline)
            out = _outputs(model, example)
            assert _shapes(out) == expected, (
                f"{strategy.name}: params {params} changed the output shape from {expected} to {_shapes(out)}")
            assert all(bool(t.float().isfinite().all()) for t in _leaves(out)), (
                f"{strategy.name}: params {params} (seed {seed}) give non-finite outputs")
            assert all(_same(v, before[k]) for k, v in trial.baseline.state_dict().items()), (
                f"{strategy.name}: params {params} modified trial.baseline (it is the teacher; never change it)")
            _json_roundtrip(trial.notes)

    def test_deterministic_under_a_seed(self, strategy: Strategy, model_file: ModelFile,
                                        space_context: SpaceContext) -> None:
        example = model_file.example_input()
        points = [p for p in self.sampled_points(strategy, space_context)
                  if not strategy.is_off(p, space_context)][:2]
        if not points:
            pytest.skip(f"{strategy.name}: every sampled point is off")
        for params in points:
            first, _ = self.run_point(strategy, params, model_file, space_context, seed=7)
            second, _ = self.run_point(strategy, params, model_file, space_context, seed=7)
            assert _same(_outputs(first, example), _outputs(second, example)), (
                f"{strategy.name}: params {params} give different models under the same seed; seed every "
                "random choice from trial.seed")

    def test_params_serialise_to_json(self, strategy: Strategy, space_context: SpaceContext) -> None:
        from optagent.strategy import flatten, unflatten

        for params in [strategy.off_params(space_context), *self.sampled_points(strategy, space_context)]:
            assert _json_roundtrip(params) == params, f"{strategy.name}: {params!r} does not survive JSON"
            back = unflatten(flatten({strategy.name: params})).get(strategy.name, {})
            assert back == params, f"{strategy.name}: {params!r} does not survive flattening"

    def test_runs_inside_a_worker_process(self, strategy: Strategy, model_file_path: Path,
                                          space_context: SpaceContext) -> None:
        """A real trial in a fresh process (as the coordinator sends it), finding the strategy by name."""
        from optagent.contract import sha256_bytes
        from optagent.executors.local import LocalExecutor
        from optagent.job import JobConfig, make_payload
        from optagent.protocol import JobRef, ModelRef

        params = next((p for p in self.sampled_points(strategy, space_context)
                       if not strategy.is_off(p, space_context)), strategy.off_params(space_context))
        cfg = JobConfig(model_path=str(model_file_path), strategies=[strategy.name], threads=1, device="cpu",
                        measure=dict(FAST_MEASURE), trial_timeout_s=self.worker_timeout_s)
        payload = make_payload(cfg, JobRef(0, "conformance"),
                               ModelRef(str(model_file_path), sha256_bytes(model_file_path.read_bytes())), 1,
                               {strategy.name: _json_roundtrip(params)})
        message = _json_roundtrip(payload.to_json())  # exactly what travels to a Celery worker
        executor = LocalExecutor(workers=1, time_limit_s=self.worker_timeout_s)
        try:
            executor.submit(1, message)
            deadline = time.monotonic() + self.worker_timeout_s + 30
            outcomes: list[Any] = []
            while not outcomes and time.monotonic() < deadline:
                outcomes = executor.poll(1.0)
        finally:
            executor.close()
        assert outcomes, f"{strategy.name}: the worker process reported nothing"
        result = outcomes[0].result
        assert result["state"] == "complete", (
            f"{strategy.name}: the trial failed in a worker process: {result['failure_reason']}")
        assert "accuracy" in result["metrics"] and result["metrics"]["latency_ms"] > 0
        _json_roundtrip({k: v for k, v in result.items() if k != "metrics"})


class MetricConformance:
    """The contract of a metric: override the `metric` fixture (and optionally `model_file_path`)."""

    RESERVED: ClassVar[frozenset[str]] = RESERVED

    @pytest.fixture
    def metric(self) -> Metric:
        """The metric under test: override this fixture to return your `optagent.Metric`."""
        raise NotImplementedError("override the `metric` fixture in your MetricConformance subclass")

    model_file_path = StrategyConformance.model_file_path
    model_file = StrategyConformance.model_file

    def test_identity(self, metric: Metric) -> None:
        assert isinstance(metric, Metric), f"{metric!r} is not an optagent.Metric"
        assert metric.name.isidentifier(), f"metric name {metric.name!r} must be an identifier"
        assert metric.name not in self.RESERVED, f"metric name {metric.name!r} is a built-in measurement"
        assert metric.direction in ("minimize", "maximize"), f"{metric.name}: direction {metric.direction!r}"
        assert isinstance(metric.unit, str) and isinstance(metric.description, str) and metric.description
        assert callable(metric.compute)
        _json_roundtrip(metric.describe())

    def test_computes_a_float_on_the_model(self, metric: Metric, model_file: ModelFile) -> None:
        import torch

        from optagent import hardware

        compute: Callable[..., Any] = metric.compute
        model = model_file.load_model()
        trial = TrialContext(model_file=model_file, baseline=model_file.load_model(), device=torch.device("cpu"),
                             capabilities=hardware.detect("cpu"), params={})
        value = compute(model, trial, model_file.example_input())
        assert isinstance(value, int | float) and not isinstance(value, bool), (
            f"{metric.name}: compute() returned {value!r}; return a float (NaN when it does not apply)")
        assert math.isfinite(float(value)), f"{metric.name}: not finite on an ordinary fp32 model"
