"""What the quantization and runtime strategies share: precisions, int8 backends, engines and their pairs.

Precision follows the runtime: the `quantization` strategy says *what* precision to serve; the `runtime`
strategy decides *how* (see optagent.plugins.runtime). Both declare their space from the same table,
`engine_precisions`, which says which precision modes each engine can serve on the worker, so a pair no
runtime can serve is never sampled. Neither strategy imports the other; both import this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from optagent import inputs as ins
from optagent.errors import TrialFailed
from optagent.plugins._util import model_device, quiet_torch_ao, to_device
from optagent.strategy import SpaceContext, TrialContext

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

    def dynamic_int8(self, model: torch.nn.Module, engine: str, keep_float: Iterable[str] = (),
                     full_range: bool = False) -> torch.nn.Module:
        """int8 weights, activations quantized on the fly per call (Linear/LSTM/GRU layers); the modules
        named in `keep_float` stay float; `full_range`: 8-bit activations (the CPU has VNNI or AMX)."""

    def static_int8(self, model: torch.nn.Module, example: Any, calibration: Iterable[Any],
                    engine: str, keep_float: Iterable[str] = ()) -> torch.nn.Module:
        """int8 weights (per-channel) and activations, ranges observed on the calibration batches."""


class TorchAOBackend:
    """torch.ao.quantization: eager `quantize_dynamic` and FX graph mode `prepare_fx`/`convert_fx`."""

    name = "torch.ao"

    def available(self, caps: Capabilities) -> bool:
        """The worker's torch has a quantized CPU engine (its capabilities list the engines torch.ao has);
        decided without importing torch, since the coordinator declares the space."""
        return caps.int8_engine is not None

    def dynamic_int8(self, model: torch.nn.Module, engine: str, keep_float: Iterable[str] = (),
                     full_range: bool = False) -> torch.nn.Module:
        import torch
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        torch.backends.quantized.engine = engine
        # per-channel weights for Linear; recurrent layers only have per-tensor dynamic kernels
        by_type = {torch.nn.Linear: per_channel_dynamic_qconfig, torch.nn.LSTM: default_dynamic_qconfig,
                   torch.nn.GRU: default_dynamic_qconfig}
        floats = set(keep_float)
        qconfig: dict[Any, Any] = {name: by_type[type(m)] for name, m in model.named_modules()
                                   if type(m) in by_type and name not in floats} if floats else dict(by_type)
        with quiet_torch_ao():
            quantized = quantize_dynamic(model, qconfig, dtype=torch.qint8)
        if full_range:
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

            # torch.ao quantizes the activations of a dynamic Linear to 7 bits (reduce_range, module version 4),
            # which only x86 CPUs without VNNI need (their u8 x s8 kernels saturate); with VNNI or AMX, 8 bits
            # (version 3): a MiniLM encoder's fidelity went from 0.974 to 0.993 here
            for module in quantized.modules():
                if isinstance(module, DynamicLinear):
                    module.version = 3
        return quantized

    def static_int8(self, model: torch.nn.Module, example: Any, calibration: Iterable[Any],
                    engine: str, keep_float: Iterable[str] = ()) -> torch.nn.Module:
        import torch
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = engine
        with quiet_torch_ao():
            try:
                args, kwargs = ins.as_args(example)
                if kwargs:
                    raise TypeError("FX graph mode takes positional inputs only; this model takes keyword "
                                    f"inputs ({', '.join(kwargs)})")
                mapping = get_default_qconfig_mapping(engine)
                for name in keep_float:
                    mapping.set_module_name(name, None)
                prepared = prepare_fx(model, mapping, args)
            except Exception as exc:
                raise TrialFailed(
                    f"static int8 needs a torch.fx-traceable model and {type(model).__name__} is not: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; dynamic_int8 or "
                    "bf16 may still apply (make forward() free of data-dependent Python control flow to "
                    "enable static int8)") from exc
            with torch.inference_mode():
                for batch in calibration:
                    ins.call(prepared, batch)
            return convert_fx(prepared)


BACKENDS: dict[str, _Backend] = {"torch.ao": TorchAOBackend()}


def has_vnni(caps: Capabilities) -> bool:
    """u8 x s8 int8 dot products without 16-bit saturation (AVX-512 VNNI, AVX-VNNI or AMX)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(caps.cpu_flags))


def available_backends(caps: Capabilities) -> list[str]:
    return [name for name, backend in BACKENDS.items() if backend.available(caps)]


def low_precision_class() -> type:
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
        return low_precision_class()
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
        # eager static int8 is torch.ao's FX graph mode: it traces forward() symbolically, which keyword inputs
        # and Hugging Face code defeat; such models get static int8 from PT2E (compile) or ONNX Runtime instead
        fx = ctx.model_info.get("input_form") != "dict" and "transformer" not in ctx.model_info
        modes += [m for m in int8_modes(ctx) if m != "static_int8" or fx]
    if caps.device == "cuda":
        modes.append("fp16")
    if (caps.device == "cpu" and caps.cpu_bf16) or (caps.device == "cuda" and caps.gpu_bf16):
        modes.append("bf16")
    return modes


def calibration_batches(trial: TrialContext, model: torch.nn.Module) -> Iterable[Any]:
    """Input batches from the calibration split, up to CALIBRATION_SAMPLES samples."""
    device = model_device(model, trial.device)
    seen = 0
    for inputs, _targets in trial.model_file.loader("calibration", min(64, CALIBRATION_SAMPLES)):
        if seen >= CALIBRATION_SAMPLES:
            break
        seen += ins.batch_size(inputs)
        yield to_device(inputs, device)



ENGINES = ("eager", "compile", "onnxruntime", "openvino")
INT8 = ("dynamic_int8", "static_int8")
PRECISIONS = ("none", "dynamic_int8", "static_int8", "fp16", "bf16")


def software(caps: Capabilities | None = None) -> dict[str, Any]:
    """What the worker reported it has installed (optagent.hardware.software); probed here when the
    capabilities were built by hand without it."""
    reported = (caps.extra or {}).get("software") if caps is not None else None
    if reported:
        return dict(reported)
    from optagent.hardware import software as probe

    return probe()


def compile_ok(device: str, caps: Capabilities | None = None) -> bool:
    """Inductor is there, and on CPU a C++ compiler for its generated kernels."""
    have = software(caps)
    return bool(have.get("inductor")) and (device == "cuda" or bool(have.get("cxx")))


def onnx_ok(caps: Capabilities | None = None) -> bool:
    have = software(caps)
    return all(have.get(p) for p in ("onnx", "onnxruntime", "onnxscript"))


def openvino_ok(caps: Capabilities | None = None) -> bool:
    return bool(software(caps).get("openvino"))


def nncf_ok(caps: Capabilities | None = None) -> bool:
    return openvino_ok(caps) and bool(software(caps).get("nncf"))


def openvino_gpu(caps: Capabilities | None = None) -> bool:
    """An Intel GPU OpenVINO can serve on (the worker reports OpenVINO's devices without importing it)."""
    return "GPU" in str(software(caps).get("openvino_devices") or "").split(",")


def missing_engines(caps: Capabilities | None = None) -> dict[str, str]:
    """Engines (or an engine's precision) not offered on this machine, with the reason and the fix (shown by
    `optagent plugins`)."""
    out = {}
    if not compile_ok("cpu", caps):
        out["compile"] = "torch.compile needs a C++ compiler on the CPU (install g++, or set CXX)"
    if not onnx_ok(caps):
        out["onnxruntime"] = "onnx, onnxruntime and onnxscript are not all installed; pip install 'optagent[onnx]'"
    if not openvino_ok(caps):
        out["openvino"] = "openvino is not installed; pip install 'optagent[openvino]' (openvino and nncf)"
    elif not nncf_ok(caps):
        out["openvino int8"] = "nncf is not installed, so OpenVINO serves float precisions only; pip install " \
                               "'optagent[openvino]'"
    if caps is not None and caps.device != "cpu" and openvino_ok(caps):
        out["openvino"] = f"OpenVINO serves on the CPU (or an Intel GPU), and this worker times on {caps.device}"
    return out


def ort_gpu_providers(caps: Capabilities | None = None) -> list[str]:
    """ONNX Runtime's GPU execution providers present in this install (TensorRT first)."""
    if not onnx_ok(caps) or (caps is not None and caps.device != "cuda"):
        return []
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have]


def offered_engines(ctx: SpaceContext) -> list[str]:
    caps = ctx.capabilities
    engines = ["eager"]
    if compile_ok(caps.device, caps):
        engines.append("compile")
    if onnx_ok(caps):
        engines.append("onnxruntime")
    if openvino_ok(caps) and caps.device == "cpu":  # OpenVINO has no CUDA device: a CUDA worker times on the GPU
        engines.append("openvino")
    return engines


def engine_precisions(ctx: SpaceContext) -> dict[str, list[str]]:
    """For each engine offered here, the `quantization.mode` values it can serve on this worker."""
    caps = ctx.capabilities
    cpu, cuda = caps.device == "cpu", caps.device == "cuda"
    bf16 = (cpu and caps.cpu_bf16) or (cuda and caps.gpu_bf16)
    out = {"eager": offered_modes(ctx)}
    engines = offered_engines(ctx)
    if "compile" in engines:
        pt2e = cpu and caps.x86 and bool(software(caps).get("torchao"))  # PT2E with the x86 Inductor quantizer
        out["compile"] = ["none", *(int8_modes(ctx) if pt2e else []), *(["fp16"] if cuda else []),
                          *(["bf16"] if bf16 else [])]
    if "onnxruntime" in engines:
        # onnxruntime.quantization's int8 kernels are CPU kernels; it has no CPU bf16 kernels
        out["onnxruntime"] = ["none", *(int8_modes(ctx) if cpu else []),
                              *(["fp16"] if cuda and ort_gpu_providers(caps) else [])]
    if "openvino" in engines:
        # f32 ("none"), NNCF static int8 (calibrated), bf16 where the CPU has it natively, f16 on an Intel GPU;
        # no dynamic int8 (OpenVINO's is weight-compressed LLM serving, not this)
        int8 = nncf_ok(caps) and "static_int8" in int8_modes(ctx)
        out["openvino"] = ["none", *(["static_int8"] if int8 else []), *(["bf16"] if caps.cpu_bf16 else []),
                           *(["fp16"] if openvino_gpu(caps) else [])]
    return out
