"""Lower precision: int8 (dynamic or static, per-channel) on CPU, fp16 on CUDA, bf16 where it is native.

Only modes the hardware and an installed backend support are offered. Integer quantization sits behind a
small `_Backend` interface: torch.ao.quantization (deprecated upstream, pytorch #153892, but present in
torch 2.x and fast on CPU without torch.compile) is the one shipped; a torchao backend can be added to
`BACKENDS` and is then offered as a `backend` choice without touching the strategy.

Precision follows the runtime: when the `runtime` strategy serves the model with torch.compile or ONNX
Runtime (it publishes `trial.settings["runtime"]` in `configure`), this strategy does not touch the model
and hands its mode over in `trial.settings["precision"]`; the runtime quantizes with its own toolchain
(PT2E for torch.compile, onnxruntime.quantization for ONNX Runtime). See `optagent.plugins.runtime`.
The modes offered depend on the engine (`mode` is declared once per engine, conditional on
`runtime.engine`), so a pair no runtime can serve is never sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from optagent.errors import TrialFailed
from optagent.hookspecs import hookimpl
from optagent.plugins._precision import (
    BACKENDS,
    INT8_MODES,
    available_backends,
    calibration_batches,
    engine_precisions,
    has_vnni,
    low_precision_class,
)
from optagent.plugins._util import example_batch, model_device
from optagent.strategy import Param, Params, SpaceContext, Stage, Strategy, TrialContext, categorical

if TYPE_CHECKING:
    import torch


class QuantizationStrategy(Strategy):
    name = "quantization"
    stage = Stage.QUANTIZE
    description = ("Lower precision where the hardware supports it: dynamic or static (calibrated, "
                   "per-channel) int8 on CPU, fp16 on CUDA, bf16 on CPUs/GPUs with native bf16.")

    def search_space(self, ctx: SpaceContext) -> list[Param]:
        # one `mode` per inference engine, holding only what that engine can serve here (None: no runtime
        # strategy installed, so eager PyTorch serves)
        space = [categorical("mode", modes, when={"runtime.engine": ["eager", None] if engine == "eager" else [engine]},
                             variant="" if engine == "eager" else engine,
                             help=f"numeric precision of the served model ({engine})")
                 for engine, modes in engine_precisions(ctx).items()]
        backends = available_backends(ctx.capabilities)
        if len(backends) > 1:
            space.append(categorical("backend", backends, when={"mode": INT8_MODES, "runtime.engine": ["eager", None]},
                                     help="library that performs integer quantization"))
        return space

    def off_params(self, ctx: SpaceContext) -> Params:
        return {"mode": "none"}

    def apply(self, model: torch.nn.Module, params: Params, trial: TrialContext) -> torch.nn.Module:
        import torch

        mode = params.get("mode", "none")
        if mode == "none":
            return model
        runtime = trial.settings.get("runtime", "eager")
        if runtime != "eager":  # the runtime (a later stage) quantizes with its own toolchain
            trial.settings["precision"] = mode
            trial.notes.append(f"quantization: {mode} is done by the {runtime} runtime's own toolchain")
            return model
        model.eval()
        if mode in ("fp16", "bf16"):
            return low_precision_class()(model, torch.float16 if mode == "fp16" else torch.bfloat16)
        if mode not in INT8_MODES:
            raise TrialFailed(f"quantization mode {mode!r} is unknown; use none, {', '.join(INT8_MODES)}, "
                              "fp16 or bf16")
        caps = trial.capabilities
        engine = caps.int8_engine
        names = available_backends(caps)
        if engine is None or not names:
            raise TrialFailed(f"{mode} needs a quantized CPU engine and none is available on this machine")
        if model_device(model, trial.device).type != "cpu":
            raise TrialFailed(f"{mode} runs on CPU only; the model is on {model_device(model)}")
        backend = BACKENDS[params.get("backend", names[0])]
        keep_float = list(trial.settings.get("float_layers") or [])
        if mode == "dynamic_int8":
            return backend.dynamic_int8(model, engine, keep_float, full_range=has_vnni(caps))
        return backend.static_int8(model, example_batch(trial, model, 1), calibration_batches(trial, model), engine,
                                   keep_float)


@hookimpl
def optagent_register_strategies(register: Callable[[Strategy], None]) -> None:
    register(QuantizationStrategy())


def __getattr__(name: str) -> Any:  # models pickled before the class moved to optagent.plugins._precision
    if name == "LowPrecision":
        return low_precision_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
