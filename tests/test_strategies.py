"""The built-in strategies and metrics on tiny real model files (a conv net and an MLP)."""

from __future__ import annotations

import copy
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch

from optagent.contract import ModelFile
from optagent.errors import TrialFailed
from optagent.hardware import Capabilities, detect
from optagent.plugins._precision import offered_modes
from optagent.plugins.batch_size import BatchSizeStrategy
from optagent.plugins.finetune import FinetuneStrategy, lr_factor
from optagent.plugins.metrics import BUILTIN_METRICS, flops, model_size_mb, nonzero_params, param_count, peak_memory_mb
from optagent.plugins.pruning import UNSTRUCTURED_NOTE, PruningStrategy
from optagent.plugins.quantization import QuantizationStrategy
from optagent.registry import build_registry, get_plugin_manager
from optagent.strategy import Objective, SpaceContext, Stage, Strategy, TrialContext, flatten, suggest

optuna.logging.set_verbosity(optuna.logging.WARNING)
CPU = detect("cpu")
STRATEGIES: dict[str, Strategy] = dict(build_registry(get_plugin_manager(load_entry_points=False)).strategies)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest (and least disturbed by a busy box) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




def make_trial(mf: ModelFile, seed: int = 0, caps: Capabilities = CPU, **settings: int) -> TrialContext:
    return TrialContext(mf, mf.load_model(), torch.device("cpu"), caps, {}, seed=seed, settings=dict(settings))


def eval_inputs(mf: ModelFile) -> torch.Tensor:
    return next(iter(mf.loader("eval", 256)))[0]


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def space_ctx(caps: Capabilities = CPU, **kw: object) -> SpaceContext:
    return SpaceContext(capabilities=caps, **kw)  # type: ignore[arg-type]


def caps_with(**kw: object) -> Capabilities:
    base = dict(device="cpu", cpu_model="test", cpu_flags=(), quantized_engines=(), cuda=False)
    base.update(kw)
    return Capabilities(**base)  # type: ignore[arg-type]


# -- pruning -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_structured_pruning_removes_parameters_and_keeps_output_shape(kind: str, request: pytest.FixtureRequest):
    mf: ModelFile = request.getfixturevalue(kind)
    trial = make_trial(mf)
    model = mf.load_model()
    before = sum(p.numel() for p in model.parameters())
    x = eval_inputs(mf)
    pruned = PruningStrategy().apply(model, {"method": "structured", "amount": 0.5}, trial)
    after = sum(p.numel() for p in pruned.parameters())
    assert after < 0.6 * before
    assert outputs(pruned, x).shape == outputs(trial.baseline, x).shape
    assert all(not bool((p == 0).all(dim=-1).any()) for p in pruned.parameters() if p.dim() == 2)  # rows removed
    assert any("structured pruning removed" in n for n in trial.notes)


def test_unstructured_pruning_zeros_survive_finetuning(conv: ModelFile):
    trial = make_trial(conv)
    model = PruningStrategy().apply(conv.load_model(), {"method": "unstructured", "amount": 0.5}, trial)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    zeros_before = [w.detach() == 0 for w in weights]
    total = sum(w.numel() for w in weights)
    assert sum(int(z.sum()) for z in zeros_before) == pytest.approx(0.5 * total, abs=2)
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())  # prune.remove ran
    assert UNSTRUCTURED_NOTE in trial.notes
    snapshot = copy.deepcopy(model.state_dict())

    tuned = FinetuneStrategy().apply(model, {"epochs": 1, "optimizer": "adam", "adam_lr": 1e-2,
                                             "schedule": "constant", "warmup": 0.0}, trial)
    for w, z in zip(weights, zeros_before, strict=True):
        assert bool((w.detach()[z] == 0).all())
    changed = any(not torch.equal(v, tuned.state_dict()[k]) for k, v in snapshot.items())
    assert changed and not tuned.training


# -- fine-tuning ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [
    {"epochs": 1, "optimizer": "sgd", "sgd_lr": 0.05, "schedule": "step", "warmup": 0.2},
    {"epochs": 2, "optimizer": "adam", "adam_lr": 1e-3, "schedule": "onecycle"},
    {"epochs": 1, "optimizer": "adam", "adam_lr": 1e-3, "schedule": "cosine", "warmup": 0.1},
])
def test_finetuning_is_deterministic_under_the_seed(mlp: ModelFile, params: dict):
    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1234 + seed)  # global RNG state left by others must not matter
        return FinetuneStrategy().apply(mlp.load_model(), params, make_trial(mlp, seed=seed)).state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_finetuning_uses_the_trial_loss_and_batch_size(mlp: ModelFile):
    calls: list[int] = []

    def loss_fn(out: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        calls.append(len(inputs))
        return torch.nn.functional.cross_entropy(out, target)

    trial = make_trial(mlp, train_batch_size=128)
    trial.loss_fn = loss_fn
    FinetuneStrategy().apply(mlp.load_model(), {"epochs": 1, "optimizer": "sgd", "sgd_lr": 0.01,
                                                "schedule": "constant", "warmup": 0.0}, trial)
    assert calls == [128] * 4  # 512 training samples


def test_lr_schedules_warm_up_and_decay():
    cosine = lr_factor("cosine", 0.2, 100)
    assert cosine(0) < 0.1 and cosine(20) == pytest.approx(1.0) and cosine(99) < 0.01
    step = lr_factor("step", 0.0, 100)
    assert (step(10), step(60), step(90)) == (1.0, 0.1, pytest.approx(0.01))
    assert lr_factor("constant", 0.0, 10)(9) == 1.0


# -- quantization --------------------------------------------------------------------------------------
def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    return cosine, (a.argmax(1) == b.argmax(1)).float().mean().item()


def _quantized_modules(model: torch.nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if ".quantized" in type(m).__module__]


@pytest.mark.filterwarnings("error::DeprecationWarning")  # torch.ao's notices are handled, not spilled
def test_static_int8_stays_close_and_is_really_int8(conv: ModelFile):
    trial = make_trial(conv)
    x = eval_inputs(conv)
    model = QuantizationStrategy().apply(conv.load_model(), {"mode": "static_int8"}, trial)
    assert any(name in ("Conv2d", "ConvReLU2d") for name in _quantized_modules(model))
    cosine, agree = _agreement(outputs(model, x), outputs(trial.baseline, x))
    assert cosine > 0.99 and agree > 0.95


def test_dynamic_int8_on_an_mlp(mlp: ModelFile):
    trial = make_trial(mlp)
    x = eval_inputs(mlp)
    model = QuantizationStrategy().apply(mlp.load_model(), {"mode": "dynamic_int8"}, trial)
    assert _quantized_modules(model).count("Linear") == 3  # torch.ao.nn.quantized.dynamic.Linear
    cosine, agree = _agreement(outputs(model, x), outputs(trial.baseline, x))
    assert cosine > 0.99 and agree > 0.95


def test_bf16_stays_close_and_returns_float32(conv: ModelFile):
    trial = make_trial(conv)
    x = eval_inputs(conv)
    model = QuantizationStrategy().apply(conv.load_model(), {"mode": "bf16"}, trial)
    assert next(model.parameters()).dtype == torch.bfloat16
    out = outputs(model, x)
    assert out.dtype == torch.float32
    cosine, agree = _agreement(out, outputs(trial.baseline, x))
    assert cosine > 0.99 and agree > 0.9
    restored = torch.load(io.BytesIO(_saved(model)), weights_only=False)  # the wrapper pickles
    assert torch.equal(outputs(restored, x), out)


def _saved(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def test_static_int8_on_an_untraceable_model_fails_with_a_reason(conv: ModelFile):
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))  # data-dependent: fx cannot trace

    with pytest.raises(TrialFailed, match="static int8 needs a torch.fx-traceable model"):
        QuantizationStrategy().apply(Branchy().eval(), {"mode": "static_int8"}, make_trial(conv))


# -- hardware gating and search spaces -----------------------------------------------------------------
def test_modes_follow_the_hardware():
    assert offered_modes(space_ctx(caps_with())) == ["none"]  # no int8 engine, no bf16 unit
    x86 = caps_with(quantized_engines=("x86", "fbgemm"), cpu_flags=("avx512_bf16",))
    if x86.x86:
        assert offered_modes(space_ctx(x86)) == ["none", "dynamic_int8", "static_int8", "bf16"]
        assert "dynamic_int8" not in offered_modes(space_ctx(x86, has_linear=False))
    gpu = caps_with(device="cuda", cuda=True, quantized_engines=("x86",), gpu_bf16=True)
    assert offered_modes(space_ctx(gpu)) == ["none", "fp16", "bf16"]
    assert "fp16" not in offered_modes(space_ctx(CPU))
    assert ("bf16" in offered_modes(space_ctx(CPU))) == CPU.cpu_bf16


def test_batch_size_offers_the_inference_batch_only_for_per_sample_objectives(mlp: ModelFile):
    strategy = BatchSizeStrategy()
    latency = space_ctx(objectives=(Objective("latency_ms", "minimize"),), default_batch_size=8)
    assert [p.name for p in strategy.search_space(latency)] == ["train"]
    assert strategy.off_params(latency) == {}  # the off point does not fine-tune: `train` is inactive
    throughput = space_ctx(objectives=(Objective("throughput", "maximize"),), default_batch_size=8)
    infer = strategy.search_space(throughput)[1]
    assert infer.name == "infer" and {1, 8, 256} <= set(infer.distribution.choices)  # type: ignore[attr-defined]
    assert strategy.off_params(throughput) == {"infer": 8}

    trial = make_trial(mlp)
    strategy.configure({"train": 32, "infer": 128}, trial)
    assert (trial.train_batch_size, trial.infer_batch_size) == (32, 128)
    trial = make_trial(mlp)
    strategy.configure({"train": 128}, trial)
    assert (trial.train_batch_size, trial.infer_batch_size) == (128, mlp.default_batch_size)


SPACES = [space_ctx(objectives=(Objective("accuracy", "maximize"), Objective("throughput", "maximize")),
                    default_batch_size=8),
          space_ctx(caps_with(), has_conv=False)]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("ctx", SPACES, ids=["this-cpu", "bare-cpu"])
def test_search_space_contains_the_off_point(name: str, ctx: SpaceContext):
    strategy = STRATEGIES[name]
    off = strategy.off_params(ctx)
    study = optuna.create_study()
    study.enqueue_trial(flatten({name: off}))
    assert suggest(study.ask(), strategy, ctx) == off
    assert strategy.is_off(off, ctx)
    json.dumps(strategy.describe(ctx))


def test_conditional_parameters_appear_only_when_active():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ctx = SPACES[0]
    for _ in range(60):
        trial = study.ask()
        prune = suggest(trial, STRATEGIES["pruning"], ctx)
        assert ("amount" in prune) == (prune["method"] != "none")
        tune = suggest(trial, STRATEGIES["finetune"], ctx)
        if tune["epochs"] == 0:
            assert tune == {"epochs": 0}
        else:
            assert set(tune) - {"warmup"} == {"epochs", "optimizer", f"{tune['optimizer']}_lr", "schedule"}
            assert ("warmup" in tune) == (tune["schedule"] != "onecycle")
        quant = suggest(trial, STRATEGIES["quantization"], ctx)
        assert set(quant) <= {"mode", "backend"}
        batch = suggest(trial, STRATEGIES["batch_size"], ctx, {"finetune": tune})  # a cross-strategy condition
        assert ("train" in batch) == (tune["epochs"] > 0)
        study.tell(trial, 0.0)


def test_conditions_across_strategies_are_sampled_in_dependency_order():
    from optagent.errors import UserError
    from optagent.strategy import categorical, ordered_space, study_point, suggest_all

    class Leader(Strategy):
        name, stage, description = "leader", Stage.DEPLOY, "x"

        def search_space(self, ctx):
            return [categorical("kind", ("a", "b")),
                    categorical("size", (1, 2), when={"follower.level": ["high"]})]

        def off_params(self, ctx):
            return {"kind": "a"}

        def apply(self, model, params, trial):
            return model

    class Follower(Leader):
        name = "follower"

        def search_space(self, ctx):  # `level` has one distribution per leader.kind
            return [categorical("level", ("low",), when={"leader.kind": ["a", None]}),
                    categorical("level", ("low", "high"), when={"leader.kind": ["b"]}, variant="b")]

        def off_params(self, ctx):
            return {"level": "low"}

    ctx = SPACES[0]
    both = [Leader(), Follower()]
    order = [f"{s.name}.{p.key}" for s, p in ordered_space(both, ctx)]
    assert order == ["leader.kind", "follower.level", "follower.level@b", "leader.size"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(80):
        chosen = suggest_all(study.ask(), both, ctx)
        kind, level = chosen["leader"]["kind"], chosen["follower"]["level"]
        seen.add((kind, level))
        assert ("size" in chosen["leader"]) == (level == "high")
    assert seen == {("a", "low"), ("b", "low"), ("b", "high")}
    assert suggest(study.ask(), Follower(), ctx) == {"level": "low"}  # leader not installed: None
    assert suggest(study.ask(), Follower(), ctx, {"leader": {"kind": "b"}})["level"] in ("low", "high")
    flat, dists = study_point(both, ctx, {"leader": {"kind": "b"}, "follower": {"level": "high"}})
    assert flat == {"leader.kind": "b", "follower.level@b": "high"} and set(dists) == set(flat)

    class Loop(Leader):
        def search_space(self, ctx):
            return [categorical("kind", ("a", "b"), when={"follower.level": ["low"]})]

    with pytest.raises(UserError, match="form a cycle"):
        ordered_space([Loop(), Follower()], ctx)


# -- "off" changes nothing -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_off_leaves_outputs_bit_identical(name: str, conv: ModelFile):
    strategy = STRATEGIES[name]
    ctx = SPACES[0]
    trial = make_trial(conv)
    off = strategy.off_params(ctx)
    x = eval_inputs(conv)
    strategy.configure(off, trial)
    model = strategy.apply(conv.load_model(), off, trial)
    assert torch.equal(outputs(model, x), outputs(trial.baseline, x))


# -- metrics -------------------------------------------------------------------------------------------
def test_resource_metrics(conv: ModelFile):
    trial = make_trial(conv)
    x = conv.example_input()
    model = conv.load_model()
    n = sum(p.numel() for p in model.parameters())
    assert param_count(model, trial, x) == n == nonzero_params(model, trial, x)
    assert flops(model, trial, x) > 0
    assert flops(model, trial, x[:1]) * 8 == pytest.approx(flops(model, trial, x))
    size = model_size_mb(model, trial, x)
    assert size == pytest.approx(n * 4 / 2**20, rel=0.2)
    peak = peak_memory_mb(model, trial, x)
    assert math.isnan(peak) or peak >= size * 0.9

    sparse = PruningStrategy().apply(conv.load_model(), {"method": "unstructured", "amount": 0.5}, trial)
    assert nonzero_params(sparse, trial, x) < 0.6 * n and param_count(sparse, trial, x) == n

    int8 = QuantizationStrategy().apply(conv.load_model(), {"mode": "static_int8"}, trial)
    assert model_size_mb(int8, trial, x) < size * 0.75
    assert param_count(int8, trial, x) > 0.95 * n  # BatchNorm folded into the convs, weights still counted
    assert math.isnan(flops(int8, trial, x))
    for metric in BUILTIN_METRICS:
        assert isinstance(metric.compute(int8, trial, x), float)


def test_model_files_are_real_user_files(conv: ModelFile):
    assert Path(conv.path).name == "conv_model.py" and conv.evaluate(conv.load_model())["accuracy"] > 0.6
