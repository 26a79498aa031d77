"""The runtime strategy: eager, torch.compile and ONNX Runtime on tiny real models.

Per runtime the served model must compute what eager PyTorch computes (at the serving batch and at
other batch sizes, which evaluation uses), int8 under ONNX Runtime must stay close to fp32, an
unexportable model must fail its trial with the exporter's reason, the search space must never yield a
parameter of an engine that was not chosen, and a short CLI search must store trials of every runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from _sampling import Points, seed_where

from optagent.contract import ModelFile
from optagent.errors import TrialFailed
from optagent.hardware import Capabilities, detect
from optagent.plugins._precision import compile_ok, engine_precisions, offered_engines, onnx_ok, ort_gpu_providers
from optagent.plugins.quantization import QuantizationStrategy
from optagent.plugins.runtime import RuntimeStrategy
from optagent.strategy import SpaceContext, TrialContext, suggest_all
from optagent.trial import run_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)
CPU = detect("cpu")
RUNTIME = RuntimeStrategy()
needs_ort = pytest.mark.skipif(not onnx_ok(), reason="onnx, onnxruntime and onnxscript are not installed")
needs_compile = pytest.mark.skipif(not compile_ok("cpu"), reason="torch.compile needs a C++ compiler on CPU")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




def trial_for(mf: ModelFile, **settings: object) -> TrialContext:
    return TrialContext(mf, mf.load_model(), torch.device("cpu"), CPU, {}, threads=1, settings=dict(settings))


def serve(mf: ModelFile, engine: str, precision: str = "none", **params: str) -> tuple[torch.nn.Module, TrialContext]:
    """The model as the pipeline would serve it: runtime configured, quantization handed over, applied."""
    trial = trial_for(mf)
    runtime = {"engine": engine, **params}
    RUNTIME.configure(runtime, trial)
    model = mf.load_model()
    if precision != "none":
        model = QuantizationStrategy().apply(model, {"mode": precision}, trial)
    return RUNTIME.apply(model, runtime, trial), trial


def eval_batch(mf: ModelFile, size: int = 100) -> torch.Tensor:
    return next(iter(mf.loader("eval", size)))[0]  # 100: not a multiple of the serving batch of 8


def accuracy(mf: ModelFile, model: torch.nn.Module) -> float:
    return mf.evaluate(model)["accuracy"]


# -- outputs match eager -------------------------------------------------------------------------------
@needs_ort
@pytest.mark.parametrize("level", ["basic", "all"])
def test_onnxruntime_fp32_matches_eager_at_any_batch_size(conv: ModelFile, level: str) -> None:
    served, trial = serve(conv, "onnxruntime", ort_level=level)
    x = eval_batch(conv)
    with torch.inference_mode():
        torch.testing.assert_close(served(x), conv.load_model()(x), atol=1e-4, rtol=1e-4)
    assert served.recipe["dynamic_batch"] is True
    assert trial.extra_metrics["export_time_s"] > 0
    assert accuracy(conv, served) == accuracy(conv, conv.load_model())


@needs_compile
def test_torch_compile_matches_eager_and_reports_compile_time(conv: ModelFile) -> None:
    served, trial = serve(conv, "compile", compile_mode="default")
    x = eval_batch(conv)
    with torch.inference_mode():
        torch.testing.assert_close(served(x), conv.load_model()(x), atol=1e-4, rtol=1e-4)
    assert trial.extra_metrics["compile_time_s"] > 0
    served.eval()  # the pipeline calls eval() on the final model
    assert "compiled in" in " ".join(trial.notes)


def test_eager_runtime_leaves_the_model_and_quantization_alone(conv: ModelFile) -> None:
    trial = trial_for(conv)
    RUNTIME.configure({"engine": "eager"}, trial)
    model = conv.load_model()
    quantized = QuantizationStrategy().apply(model, {"mode": "dynamic_int8"}, trial)
    assert quantized is not model and "precision" not in trial.settings  # torch.ao did it, eagerly
    assert RUNTIME.apply(quantized, {"engine": "eager"}, trial) is quantized


# -- int8 through the runtime's own toolchain ----------------------------------------------------------
@needs_ort
@pytest.mark.parametrize("kind, precision", [("conv", "static_int8"), ("mlp", "dynamic_int8"), ("mlp", "static_int8")])
def test_onnxruntime_int8_stays_close_to_fp32(kind: str, precision: str, request: pytest.FixtureRequest) -> None:
    mf: ModelFile = request.getfixturevalue(kind)
    fp32, _ = serve(mf, "onnxruntime", ort_level="all")
    int8, trial = serve(mf, "onnxruntime", precision, ort_level="all")
    assert trial.settings["precision"] == precision
    assert "onnxruntime runtime's own toolchain" in " ".join(trial.notes)
    assert int8.recipe["precision"] == precision
    x = eval_batch(mf)
    with torch.inference_mode():
        a, b = fp32(x), int8(x)
    assert not torch.equal(a, b), "int8 computes something slightly different"
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9
    assert accuracy(mf, int8) >= accuracy(mf, fp32) - 0.05


@needs_ort
def test_bf16_under_onnxruntime_fails_at_once_with_the_reason(conv: ModelFile) -> None:
    with pytest.raises(TrialFailed, match="no bf16 kernels"):
        serve(conv, "onnxruntime", "bf16", ort_level="all")


# -- export protocol -----------------------------------------------------------------------------------
@needs_ort
def test_onnx_export_writes_a_loadable_model(conv: ModelFile, tmp_path: Path) -> None:
    import onnxruntime as ort

    served, _ = serve(conv, "onnxruntime", "static_int8", ort_level="all")
    files = served.optagent_export(tmp_path)
    onnx_file = next(f for f in files if f.suffix == ".onnx")
    assert json.loads(next(f for f in files if f.suffix == ".json").read_text())["precision"] == "static_int8"
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = eval_batch(conv, 5)
    with torch.inference_mode():
        want = served(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() < 1e-5
    assert onnx_file.stat().st_size == served.state_dict()["onnx_model"].numel()  # the weights are inside


# -- failures are results ------------------------------------------------------------------------------
UNEXPORTABLE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
import optagent


class Net(nn.Module):
    """Branches on a value computed from the input: export cannot capture data-dependent control flow."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if float(x.sum()) > 0:
            return self.fc(x)
        return -self.fc(x)


def load_model():
    torch.manual_seed(0)
    return Net().eval()


def load_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return optagent.Data(train=TensorDataset(x, (x[:, 0] > 0).long()), eval=TensorDataset(x, (x[:, 0] > 0).long()))


def evaluate(model, loader):
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return {"accuracy": correct / total}


def example_input():
    return torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
'''


@needs_ort
def test_unexportable_model_fails_its_trial_with_the_exporters_reason(tmp_path: Path) -> None:
    path = tmp_path / "model.py"
    path.write_text(UNEXPORTABLE)
    source = path.read_bytes()
    payload = {"version": 1, "trial": 1, "job": {"id": 1, "name": "unexportable"},
               "model": {"path": str(path), "sha256": hashlib.sha256(source).hexdigest(), "source_b64": None},
               "params": {"runtime": {"engine": "onnxruntime", "ort_level": "all"}}, "strategies": ["runtime"],
               "objectives": ["accuracy:max", "latency_ms:min"], "seed": 0, "threads": 1, "device": "cpu",
               "measure": {"warmup": 1, "min_reps": 3, "max_time_s": 0.2}}
    result = run_trial(payload)
    assert result["state"] == "failed"
    reason = result["failure_reason"]
    assert reason.startswith("torch.onnx cannot export the model: ")
    assert "\n" not in reason and len(reason) < 500
    assert "data" in reason.lower() or "guard" in reason.lower()  # the exporter's own words, first line


# -- the search space ----------------------------------------------------------------------------------
def _caps(**kw: object) -> Capabilities:
    base = dict(device="cpu", cpu_model="test", cpu_flags=("avx512_bf16",), quantized_engines=("x86",), cuda=False)
    base.update(kw)
    return Capabilities(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("caps", [CPU, _caps(), _caps(device="cuda", cuda=True, gpu_name="fake")],
                         ids=["this-machine", "cpu", "cuda"])
def test_the_space_never_yields_impossible_combinations(caps: Capabilities) -> None:
    """Runtime and quantization sampled together: every pair is one the runtime can serve on this worker."""
    ctx = SpaceContext(capabilities=caps, has_conv=True, has_linear=True)
    engines = offered_engines(ctx)
    table = engine_precisions(ctx)
    strategies = [QuantizationStrategy(), RUNTIME]  # job order puts quantization first; sampling reorders
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(300):
        trial = study.ask()
        chosen = suggest_all(trial, strategies, ctx)
        params, mode = chosen["runtime"], chosen["quantization"]["mode"]
        engine = params["engine"]
        seen.add((engine, mode))
        assert engine in engines and mode in table[engine]
        assert not (engine == "onnxruntime" and mode == "bf16")  # no CPU bf16 kernels in onnxruntime
        assert not (engine == "onnxruntime" and mode == "fp16" and caps.device != "cuda")
        assert ("compile_mode" in params) == (engine == "compile" and not (mode == "dynamic_int8" and
                                                                           caps.device == "cpu"))
        assert ("ort_level" in params) == (engine == "onnxruntime")
        if "ort_provider" in params:
            assert caps.device == "cuda" and engine == "onnxruntime"
        if params.get("compile_mode") in ("reduce-overhead", "max-autotune"):  # CUDA graphs need a GPU
            assert caps.device == "cuda"
        # the study names each engine's mode apart, so the sampler never sees a choice set change
        assert {k for k in trial.params if k.startswith("quantization.mode")} == {
            "quantization.mode" if engine == "eager" else f"quantization.mode@{engine}"}
    assert seen == {(e, m) for e in engines for m in table[e]}
    assert RUNTIME.off_params(ctx) == {"engine": "eager"}


def test_the_precision_table_follows_the_hardware() -> None:
    cpu = engine_precisions(SpaceContext(capabilities=_caps()))
    if "onnxruntime" in cpu:
        assert cpu["onnxruntime"] == ["none", "dynamic_int8", "static_int8"]
    if "compile" in cpu:
        assert "bf16" in cpu["compile"] and "fp16" not in cpu["compile"]
    gpu = engine_precisions(SpaceContext(capabilities=_caps(device="cuda", cuda=True, gpu_name="fake")))
    if "onnxruntime" in gpu:  # int8 kernels are CPU kernels; fp16 only with a GPU execution provider here
        assert gpu["onnxruntime"] == ["none"] + (["fp16"] if ort_gpu_providers(_caps(device="cuda", cuda=True))
                                                 else [])


def test_engines_are_offered_only_where_the_worker_has_them() -> None:
    """The space follows what the *worker* reported it has installed, not what the coordinator has."""
    from optagent.plugins._precision import missing_engines

    bare = _caps(extra={"software": {"torch": "2.13.0", "inductor": True, "cxx": None}})
    ctx = SpaceContext(capabilities=bare)
    assert offered_engines(ctx) == ["eager"]
    assert [p.name for p in RUNTIME.search_space(ctx)] == ["engine"]
    why = missing_engines(bare)
    assert "C++ compiler" in why["compile"] and "pip install 'optagent[onnx]'" in why["onnxruntime"]
    full = _caps(extra={"software": {"torch": "2.13.0", "inductor": True, "cxx": "g++", "onnx": "1", "onnxruntime": "1",
                                     "onnxscript": "1"}})
    assert offered_engines(SpaceContext(capabilities=full)) == ["eager", "compile", "onnxruntime"]


# -- a short search through the CLI -----------------------------------------------------------------
@needs_ort
@needs_compile
def test_a_short_search_stores_trials_of_each_runtime(tmp_path: Path) -> None:
    fixtures = Path(__file__).parent / "fixtures"
    (tmp_path / "tiny_model.py").write_text((fixtures / "tiny_model.py").read_text())
    env = {**os.environ, "OPTAGENT_CACHE_DIR": str(tmp_path / "cache")}
    seed = _covering_seed()
    proc = subprocess.run([sys.executable, "-m", "optagent.cli", "search", "tiny_model.py", "--trials", "3",
                           "--strategies", "quantization,runtime", "--sampler", "random", "--seed", str(seed),
                           "--threads", "1", "--name", "runtimes", "--confirm-processes", "1", "--no-warm-start",
                           "--json", "--db", f"sqlite:///{tmp_path}/o.db"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    trials = json.loads(proc.stdout)["trials"][1:]  # [0] is the baseline
    by_engine: dict[str, list[dict]] = {}
    for t in trials:
        by_engine.setdefault(t["params"]["runtime"]["engine"], []).append(t)
    assert set(by_engine) == {"eager", "compile", "onnxruntime"}, f"seed {seed} samples every engine"
    for engine in ("compile", "onnxruntime"):
        done = [t for t in by_engine[engine] if t["state"] == "complete"]
        assert done, [t.get("failure_reason") for t in by_engine[engine]]
        key = "compile_time_s" if engine == "compile" else "export_time_s"
        assert all(key in t["metrics"] and t["metrics"]["accuracy"] > 0.5 for t in done)


def _covering_seed() -> int:
    """A random-sampler seed whose 3 trials use every engine, none with max-autotune (the slow compile)."""
    def wanted(points: Points) -> bool:
        runtimes = [p["runtime"] for p in points]
        return ({r["engine"] for r in runtimes} == {"eager", "compile", "onnxruntime"}
                and all(r.get("compile_mode", "default") == "default" for r in runtimes))

    return seed_where(["quantization", "runtime"], 3, wanted)
