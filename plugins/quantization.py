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

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from optagent.errors import TrialFailed
from optagent.hookspecs import hookimpl
from optagent.plugins._util import example_batch, model_device, quiet_torch_ao, to_device
from optagent.strategy import Param, Params, SpaceContext, Stage, Strategy, TrialContext, categorical

if TYPE_CHECKING:
    import torch

    from optagent.hardware import Capabilities

INT8_MODES = ("dynamic_int8", "static_int8")
CALIBRATION_SAMPLES = 512  # observers settle long before this; more only costs time


class _Backend(Protocol):
    """An integer-quantization implementation. Models in and out are eval-mode float/int8 modules."""

    name: str

    def available(self, caps: Capabilities) -> bool:
        """Whether this backend can produce int8 models that run on this machine."""

    def dynamic_int8(self, model: torch.nn.Module, engine: str) -> torch.nn.Module:
        """int8 weights, activations quantized on the fly per call (Linear/LSTM/GRU layers)."""

    def static_int8(self, model: torch.nn.Module, example: torch.Tensor, calibration: Iterable[Any],
                    engine: str) -> torch.nn.Module:
        """int8 weights (per-channel) and activations, ranges observed on the calibration batches."""


class TorchAOBackend:
    """torch.ao.quantization: eager `quantize_dynamic` and FX graph mode `prepare_fx`/`convert_fx`."""

    name = "torch.ao"

    def available(self, caps: Capabilities) -> bool:
        try:
            with quiet_torch_ao():
                import torch.ao.quantization  # noqa: F401
        except ImportError:
            return False
        return caps.int8_engine is not None

    def dynamic_int8(self, model: torch.nn.Module, engine: str) -> torch.nn.Module:
        import torch
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        torch.backends.quantized.engine = engine
        # per-channel weights for Linear; recurrent layers only have per-tensor dynamic kernels
        qconfig = {torch.nn.Linear: per_channel_dynamic_qconfig, torch.nn.LSTM: default_dynamic_qconfig,
                   torch.nn.GRU: default_dynamic_qconfig}
        with quiet_torch_ao():
            return quantize_dynamic(model, qconfig, dtype=torch.qint8)

    def static_int8(self, model: torch.nn.Module, example: torch.Tensor, calibration: Iterable[Any],
                    engine: str) -> torch.nn.Module:
        import torch
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = engine
        with quiet_torch_ao():
            try:
                prepared = prepare_fx(model, get_default_qconfig_mapping(engine), (example,))
            except Exception as exc:
                raise TrialFailed(
                    f"static int8 needs a torch.fx-traceable model and {type(model).__name__} is not: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; dynamic_int8 or "
                    "bf16 may still apply (make forward() free of data-dependent Python control flow to "
                    "enable static int8)") from exc
            with torch.inference_mode():
                for inputs in calibration:
                    prepared(inputs)
            return convert_fx(prepared)


BACKENDS: dict[str, _Backend] = {"torch.ao": TorchAOBackend()}


def available_backends(caps: Capabilities) -> list[str]:
    return [name for name, backend in BACKENDS.items() if backend.available(caps)]


def _low_precision_class() -> type:
    """The fp16/bf16 wrapper module, defined on first use so importing this plugin does not import torch.

    It is published as the module attribute `LowPrecision`, so wrapped models pickle and deep-copy.
    """
    cls = globals().get("LowPrecision")
    if cls is not None:
        return cls
    import torch

    class LowPrecision(torch.nn.Module):
        """Runs `inner` in fp16/bf16 while callers keep sending and receiving float32 tensors."""

        def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
            super().__init__()
            self.inner = inner.to(dtype)
            self.dtype = dtype

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            args, kwargs = _cast(args, self.dtype), _cast(kwargs, self.dtype)
            return _cast(self.inner(*args, **kwargs), torch.float32)

        def extra_repr(self) -> str:
            return f"dtype={self.dtype}"

    LowPrecision.__module__, LowPrecision.__qualname__ = __name__, "LowPrecision"
    globals()["LowPrecision"] = LowPrecision
    return LowPrecision


def __getattr__(name: str) -> Any:  # PEP 562: lets pickle find LowPrecision before first use
    if name == "LowPrecision":
        return _low_precision_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Cast floating tensors (inside tuples/lists/dicts too) to `dtype`; integer tensors (ids) stay."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def int8_modes(ctx: SpaceContext) -> list[str]:
    """The int8 modes the model's layers allow: dynamic needs Linear layers, static conv or Linear ones."""
    return (["dynamic_int8"] if ctx.has_linear else []) + (["static_int8"] if ctx.has_conv or ctx.has_linear else [])


def offered_modes(ctx: SpaceContext) -> list[str]:
    """The precision modes this hardware and the installed backends can run (always including "none")."""
    caps = ctx.capabilities
    modes = ["none"]
    if caps.device == "cpu" and available_backends(caps):
        modes += int8_modes(ctx)
    if caps.device == "cuda":
        modes.append("fp16")
    if (caps.device == "cpu" and caps.cpu_bf16) or (caps.device == "cuda" and caps.gpu_bf16):
        modes.append("bf16")
    return modes


class QuantizationStrategy(Strategy):
    name = "quantization"
    stage = Stage.QUANTIZE
    description = ("Lower precision where the hardware supports it: dynamic or static (calibrated, "
                   "per-channel) int8 on CPU, fp16 on CUDA, bf16 on CPUs/GPUs with native bf16.")

    def search_space(self, ctx: SpaceContext) -> list[Param]:
        from optagent.plugins.runtime import engine_precisions

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
            return _low_precision_class()(model, torch.float16 if mode == "fp16" else torch.bfloat16)
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
        if mode == "dynamic_int8":
            return backend.dynamic_int8(model, engine)
        return backend.static_int8(model, example_batch(trial, model, 1), _calibration(trial, model), engine)


def _calibration(trial: TrialContext, model: torch.nn.Module) -> Iterable[Any]:
    """Input batches from the calibration split, up to CALIBRATION_SAMPLES samples."""
    device = model_device(model, trial.device)
    seen = 0
    for inputs, _targets in trial.model_file.loader("calibration", min(64, CALIBRATION_SAMPLES)):
        if seen >= CALIBRATION_SAMPLES:
            break
        seen += len(inputs)
        yield to_device(inputs, device)


@hookimpl
def optagent_register_strategies(register: Callable[[Strategy], None]) -> None:
    register(QuantizationStrategy())
