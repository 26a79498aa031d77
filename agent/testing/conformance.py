"""The conformance suite for plugin authors: subclass, override one fixture, run pytest.

    from optagent.testing import StrategyConformance

    class TestMyStrategy(StrategyConformance):
        @pytest.fixture
        def strategy(self):
            return MyStrategy()

Every built-in strategy passes the same suite (tests/test_conformance.py). It checks the contract of
`optagent.Strategy`: a valid search space whose "off" point is inside it (the same checks the registry runs
when it loads plugins, `optagent.checks`); `apply` at the off point leaves the model bit-identical (the
suite calls it there, though the pipeline does not); sampled points keep the model runnable with the same
output shape and leave the baseline alone; `apply` returns the model; results are deterministic under a
seed; params survive JSON; the strategy loads through the plugin registry; and a trial using it runs in a
separate worker process, found through the registry exactly as a real worker finds it (so the plugin must
be installed, e.g. ``pip install -e .``). Set `check_changes_model = True` to also require that every
sampled point that is not off changes the model's outputs.

`MetricConformance` checks a metric: its name, direction and description, a float on a real batch as the
pipeline passes it, the model left unchanged, and its registration.

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
from optagent.strategy import Params, SpaceContext, Strategy, TrialContext, suggest
from optagent.testing.helpers import (
    DEFAULT_MODEL_SOURCE,
    apply_strategy,
    default_model_file,
    make_trial,
    space_context,
)

if TYPE_CHECKING:
    import torch

    from optagent.contract import ModelFile

__all__ = ["DEFAULT_MODEL_SOURCE", "MetricConformance", "StrategyConformance"]

# Quick timing for the worker check: it proves the trial runs and is measured, not how fast it is.
FAST_MEASURE = {"warmup": 1, "min_reps": 3, "max_reps": 20, "min_time_s": 0.0, "max_time_s": 0.5}


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


def _problems(found: list[str]) -> str:
    return "\n".join(found)


class StrategyConformance:
    """The contract of a strategy. Subclass and override the `strategy` fixture (one test class each).

    Class attributes tune the checks: `sample_seeds` are the RandomSampler seeds of the sampled points,
    `sampling_context` sets other strategies' params for them, `check_changes_model` (off by default)
    requires every sampled point that is not off to change the model's outputs (leave it off for a strategy
    that acts through `trial.settings` or `trial.loss_fn`), `worker_timeout_s` bounds the worker check.
    """

    sample_seeds: ClassVar[tuple[int, ...]] = (0, 1, 2, 3, 4)
    # other strategies' params while the points are sampled (default: every other installed strategy at its
    # off params); set it when your parameters are conditional on another strategy's, e.g.
    # {"finetune": {"epochs": 1}}, so the sampled points exercise them
    sampling_context: ClassVar[dict[str, Params]] = {}
    check_changes_model: ClassVar[bool] = False
    worker_timeout_s: ClassVar[float] = 180.0

    # -- fixtures an author overrides --------------------------------------------------------------------
    @pytest.fixture
    def strategy(self) -> Strategy:
        """The strategy under test: override this fixture to return an instance of yours."""
        raise NotImplementedError("override the `strategy` fixture in your StrategyConformance subclass")

    @pytest.fixture
    def model_file_path(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A model.py the checks run on; default: a small conv + linear classifier written by the suite."""
        return default_model_file(tmp_path_factory.getbasetemp() / "optagent-conformance")

    @pytest.fixture
    def model_file(self, model_file_path: Path) -> ModelFile:
        from optagent.contract import ModelFile

        return ModelFile.from_path(model_file_path)

    @pytest.fixture
    def space_context(self, model_file: ModelFile) -> SpaceContext:
        """The SpaceContext the search space is declared for: this CPU, accuracy:max and latency_ms:min, and
        the model_info a baseline trial reports for the model file."""
        return space_context(model_file)

    # -- helpers ----------------------------------------------------------------------------------------
    def others(self, strategy: Strategy, ctx: SpaceContext) -> dict[str, Params]:
        """The other installed strategies at their off params: what cross-strategy `when`s read in isolation."""
        from optagent.registry import build_registry

        return {name: s.off_params(ctx) for name, s in build_registry(log_warnings=False).strategies.items()
                if name != strategy.name}

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
        """Build one trial's model the way the pipeline does: configure, then apply unless off (or forced)."""
        trial = make_trial(model_file, {**self.sampling_context, strategy.name: dict(params)}, seed=seed)
        return apply_strategy(strategy, params, trial, ctx=ctx, force=force_apply)

    # -- the checks -------------------------------------------------------------------------------------
    def test_identity(self, strategy: Strategy) -> None:
        from optagent.checks import identity_problems

        problems = identity_problems(strategy)
        assert not problems, _problems(problems)

    def test_search_space_is_valid(self, strategy: Strategy, space_context: SpaceContext) -> None:
        """The checks the registry runs when it loads plugins, on this machine's context."""
        from optagent.checks import cycle_problem, load_contexts, space_problems
        from optagent.registry import build_registry

        installed = {**build_registry(log_warnings=False).strategies, strategy.name: strategy}
        problems = space_problems(strategy, space_context, installed, load_contexts())
        assert not problems, _problems(problems)
        cycle = cycle_problem([strategy, *(s for n, s in installed.items() if n != strategy.name)], space_context)
        assert cycle is None, cycle

    def test_off_point_is_inside_the_space(self, strategy: Strategy, space_context: SpaceContext) -> None:
        from optagent.checks import off_problems

        problems = off_problems(strategy, space_context, self.others(strategy, space_context))
        assert not problems, _problems(problems)

    def test_off_leaves_the_model_unchanged(self, strategy: Strategy, model_file: ModelFile,
                                            space_context: SpaceContext) -> None:
        """apply() at the off point (which the pipeline never calls) must return the model unchanged."""
        off = strategy.off_params(space_context)
        example = model_file.example_input()
        model, trial = self.run_point(strategy, off, model_file, space_context, force_apply=True)
        assert _same(_outputs(model, example), _outputs(trial.baseline, example)), (
            f"{strategy.name}: apply() with the off params {off!r} changed the model's outputs; at the off point "
            "return the model untouched")

    def test_sampled_points_keep_the_model_runnable(self, strategy: Strategy, model_file: ModelFile,
                                                    space_context: SpaceContext) -> None:
        """Every sampled point gives a runnable model with the baseline's output shape and finite outputs, and
        leaves trial.baseline alone. A point may raise optagent.TrialFailed (it cannot work on this model),
        as long as not every point does."""
        from optagent.errors import TrialFailed

        example = model_file.example_input()
        expected = _shapes(_outputs(model_file.load_model(), example))
        before = _state_of(model_file.load_model())
        points = self.sampled_points(strategy, space_context)
        refused: list[str] = []
        for seed, params in zip(self.sample_seeds, points, strict=True):
            params = _json_roundtrip(params)  # what a worker receives
            try:
                model, trial = self.run_point(strategy, params, model_file, space_context, seed)
            except TrialFailed as exc:
                refused.append(f"{params}: {exc}")
                continue
            out = _outputs(model, example)
            assert _shapes(out) == expected, (
                f"{strategy.name}: params {params} changed the output shape from {expected} to {_shapes(out)}")
            assert all(bool(t.float().isfinite().all()) for t in _leaves(out)), (
                f"{strategy.name}: params {params} (seed {seed}) give non-finite outputs")
            assert all(_same(v, before[k]) for k, v in trial.baseline.state_dict().items()), (
                f"{strategy.name}: params {params} modified trial.baseline (it is the teacher; never change it)")
            _json_roundtrip(trial.notes)
        assert len(refused) < len(points), (
            f"{strategy.name}: every sampled point raised TrialFailed on this model ({'; '.join(refused)}); "
            "override the model_file_path fixture with a model the strategy works on")

    def _working(self, strategy: Strategy, model_file: ModelFile, ctx: SpaceContext,
                 points: list[Params], seed: int = 0, limit: int | None = None) -> list[tuple[Params, Any]]:
        """(params, model) of the points that are not off and do not raise TrialFailed on this model (the
        first `limit` of them)."""
        from optagent.errors import TrialFailed

        out: list[tuple[Params, Any]] = []
        for params in points:
            if limit is not None and len(out) >= limit:
                break
            if strategy.is_off(params, ctx):
                continue
            try:
                model, _ = self.run_point(strategy, params, model_file, ctx, seed)
            except TrialFailed:
                continue
            out.append((params, model))
        return out

    def test_changes_the_model(self, strategy: Strategy, model_file: ModelFile,
                               space_context: SpaceContext) -> None:
        """Opt-in (`check_changes_model = True`): every sampled point that is not off changes the outputs."""
        if not self.check_changes_model:
            pytest.skip(f"{type(self).__name__}.check_changes_model is False")
        example = model_file.example_input()
        reference = _outputs(model_file.load_model(), example)
        working = self._working(strategy, model_file, space_context, self.sampled_points(strategy, space_context))
        if not working:
            pytest.skip(f"{strategy.name}: every sampled point is off (or cannot work on this model)")
        for params, model in working:
            assert not _same(_outputs(model, example), reference), (
                f"{strategy.name}: params {params} are not off, yet the model's outputs are bit-identical to the "
                "baseline's: apply() changed nothing")

    def test_deterministic_under_a_seed(self, strategy: Strategy, model_file: ModelFile,
                                        space_context: SpaceContext) -> None:
        example = model_file.example_input()
        working = self._working(strategy, model_file, space_context, self.sampled_points(strategy, space_context),
                                seed=7, limit=2)
        if not working:
            pytest.skip(f"{strategy.name}: every sampled point is off (or cannot work on this model)")
        for params, first in working:
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

    def test_loads_through_the_plugin_registry(self, strategy: Strategy) -> None:
        """The installed plugin registers this strategy and passes the registry's checks."""
        from optagent.registry import build_registry

        registry = build_registry(log_warnings=False)
        assert strategy.name in registry.strategies, (
            f"{registry.why_missing(strategy.name)}; registry warnings: {registry.warnings or 'none'} "
            "(install your package, e.g. pip install -e ., and register the strategy in "
            "optagent_register_strategies)")
        assert type(registry.strategies[strategy.name]) is type(strategy), (
            f"{strategy.name}: the registry holds {type(registry.strategies[strategy.name]).__name__} under this "
            f"name, not {type(strategy).__name__}")

    def test_runs_inside_a_worker_process(self, strategy: Strategy, model_file_path: Path,
                                          space_context: SpaceContext) -> None:
        """A real trial in a fresh process (as the coordinator sends it), finding the strategy by name."""
        from optagent.contract import ModelFile, sha256_bytes
        from optagent.errors import TrialFailed
        from optagent.job import JobConfig, make_payload
        from optagent.protocol import JobRef, ModelRef
        from optagent.registry import build_registry

        points = [p for p in self.sampled_points(strategy, space_context) if not strategy.is_off(p, space_context)]
        versions = build_registry(log_warnings=False).versions()
        result: dict[str, Any] = {}
        for params in points or [strategy.off_params(space_context)]:
            cfg = JobConfig(model_path=str(model_file_path), strategies=[strategy.name], threads=1, device="cpu",
                            measure=dict(FAST_MEASURE), trial_timeout_s=self.worker_timeout_s)
            payload = make_payload(cfg, JobRef(0, "conformance"),
                                   ModelRef(str(model_file_path), sha256_bytes(model_file_path.read_bytes())), 1,
                                   {strategy.name: _json_roundtrip(params)}, versions)
            result = self._in_a_worker(strategy, _json_roundtrip(payload.to_json()))  # what travels to Celery
            if result["state"] == "complete":
                break
            try:  # a point that cannot work on this model (TrialFailed) may fail: try the next one
                self.run_point(strategy, params, ModelFile.from_path(model_file_path), space_context)
            except TrialFailed:
                continue
            break
        assert result["state"] == "complete", (
            f"{strategy.name}: the trial failed in a worker process: {result['failure_reason']}")
        assert "accuracy" in result["metrics"] and result["metrics"]["latency_ms"] > 0
        _json_roundtrip({k: v for k, v in result.items() if k != "metrics"})

    def _in_a_worker(self, strategy: Strategy, message: dict[str, Any]) -> dict[str, Any]:
        from optagent.executors.local import LocalExecutor

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
        return dict(outcomes[0].result)


class MetricConformance:
    """The contract of a metric: override the `metric` fixture (and optionally `model_file_path`)."""

    RESERVED: ClassVar[frozenset[str]] = RESERVED

    @pytest.fixture
    def metric(self) -> Metric:
        """The metric under test: override this fixture to return your `optagent.Metric`."""
        raise NotImplementedError("override the `metric` fixture in your MetricConformance subclass")

    model_file_path = StrategyConformance.model_file_path
    model_file = StrategyConformance.model_file

    def _compute(self, metric: Metric, model: Any, trial: TrialContext) -> Any:
        """compute() as the pipeline calls it: the served model, the trial, a real eval batch at the
        inference batch size on trial.device."""
        compute: Callable[..., Any] = metric.compute
        batch = trial.model_file.batch(trial.infer_batch_size, trial.device)
        return compute(model, trial, batch)

    def test_identity(self, metric: Metric) -> None:
        from optagent.checks import metric_problems

        problems = metric_problems(metric)
        assert not problems, _problems(problems)
        assert metric.name not in self.RESERVED, f"metric name {metric.name!r} is a built-in measurement"
        _json_roundtrip(metric.describe())

    def test_computes_a_float_on_the_model(self, metric: Metric, model_file: ModelFile) -> None:
        trial = make_trial(model_file)
        value = self._compute(metric, model_file.load_model(), trial)
        assert isinstance(value, int | float) and not isinstance(value, bool), (
            f"{metric.name}: compute() returned {value!r}; return a float (NaN when it does not apply)")
        assert math.isfinite(float(value)), f"{metric.name}: not finite on an ordinary fp32 model"
        _json_roundtrip(trial.notes)
        extra = dict(trial.extra_metrics)
        assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in extra.values()), (
            f"{metric.name}: trial.extra_metrics must hold numbers, got {extra!r}")
        clash = sorted(set(extra) & (set(self.RESERVED) | {"accuracy", metric.name}))
        assert not clash, f"{metric.name}: trial.extra_metrics names {clash}, which are taken"

    def test_leaves_the_model_and_the_baseline_alone(self, metric: Metric, model_file: ModelFile) -> None:
        """Other metrics measure the same model after this one, and the baseline is everyone's reference."""
        trial = make_trial(model_file)
        model = model_file.load_model()
        before, baseline = _state_of(model), _state_of(trial.baseline)
        self._compute(metric, model, trial)
        assert all(_same(v, before[k]) for k, v in _state_of(model).items()) and set(before) == set(
            model.state_dict()), f"{metric.name}: compute() changed the model it measures"
        assert all(_same(v, baseline[k]) for k, v in _state_of(trial.baseline).items()), (
            f"{metric.name}: compute() changed trial.baseline")

    def test_loads_through_the_plugin_registry(self, metric: Metric) -> None:
        """The installed plugin registers this metric and passes the registry's checks."""
        from optagent.registry import build_registry

        registry = build_registry(log_warnings=False)
        assert metric.name in registry.metrics, (
            f"metric {metric.name!r} is not registered; registry warnings: {registry.warnings or 'none'} (install "
            "your package, e.g. pip install -e ., and register the metric in optagent_register_metrics)")
