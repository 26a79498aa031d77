"""The inference runtime as a searched choice: eager PyTorch, torch.compile (Inductor), ONNX Runtime or OpenVINO.

Which runtime is fastest depends on the model, the batch size and the machine (ONNX Runtime won 3x at
batch 1 on a small CNN here, PT2E int8 under torch.compile 6.5x at batch 64 but lost at batch 1), so it
is measured per trial like everything else. Only what can run here is offered: torch.compile where
Inductor has a C++ compiler (CPU) or a GPU, ONNX Runtime where onnx, onnxruntime and onnxscript are
installed, GPU execution providers only on a CUDA worker that has them, OpenVINO on a CPU worker with the
`openvino` extra (int8 needs its nncf too).

Precision follows the runtime. The `quantization` strategy's `mode` says *what* precision to serve;
the runtime decides *how*: with eager PyTorch the quantization strategy applies torch.ao itself; with
another engine it hands the mode over (`trial.settings["precision"]`) and the runtime implements it
with its own toolchain:

    mode           eager (torch.ao)        compile                        onnxruntime                openvino
    dynamic_int8   quantize_dynamic        PT2E x86 Inductor, dynamic     quantize_dynamic           (not offered)
    static_int8    FX prepare/convert      PT2E x86 Inductor, calibrated  quantize_static, QDQ       NNCF quantize
    bf16 / fp16    cast wrapper            cast wrapper, compiled         fp16: cast wrapper (GPU);  precision hint
                                                                          bf16: no CPU kernels       (f16: Intel GPU)

OpenVINO's own choices are parameters of this strategy, conditional on the engine and the precision:
`ov_preset` (NNCF's PERFORMANCE or MIXED preset), `ov_smooth_quant` (SmoothQuant alpha, transformers only),
`ov_fast_bias_correction` (other models only: full bias correction ruined a transformer, 0.767 fidelity)
and `ov_precision` (the inference precision of an int8 model's float parts: f32, or bf16 where native,
with attention's inputs then left unquantized). See optagent.plugins._openvino.

The search never samples a pair that cannot run: `engine_precisions` says which modes each engine can
serve on this worker, and the quantization strategy declares one `mode` per engine, conditional on
`runtime.engine` (a cross-strategy `when`; the study names them `quantization.mode@compile` and so on).
The compile mode is conditional on the precision in turn: dynamic int8 under max-autotune aborts the
process in Inductor's CPU GEMM autotuner (torch 2.13), so that pair is not offered. Pruning and
fine-tuning run earlier (COMPRESS, FINETUNE) in PyTorch, so the runtime receives the pruned model.

Setup cost (export, quantization, session creation, compilation) is reported as `export_time_s` /
`quantize_time_s` / `compile_time_s`, never as latency: the pipeline warms every model up before timing it interleaved
with the baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from optagent import inputs as ins
from optagent.errors import TrialFailed
from optagent.hookspecs import hookimpl
from optagent.plugins._precision import (
    ENGINES,
    INT8,
    PRECISIONS,
    calibration_batches,
    engine_precisions,
    has_vnni,
    low_precision_class,
    openvino_gpu,
    ort_gpu_providers,
)
from optagent.strategy import Param, Params, SpaceContext, Stage, Strategy, TrialContext, categorical

if TYPE_CHECKING:
    import torch

class RuntimeStrategy(Strategy):
    name = "runtime"
    stage = Stage.DEPLOY
    description = ("Serve the model with eager PyTorch, torch.compile (Inductor, weights frozen), ONNX Runtime or "
                   "OpenVINO; int8/bf16 from the quantization strategy is done by the chosen runtime's own "
                   "toolchain (NNCF for OpenVINO).")

    def search_space(self, ctx: SpaceContext) -> list[Param]:
        table = engine_precisions(ctx)  # the offered engines (in order) and what each can serve
        engines = list(table)
        space = [categorical("engine", engines, help="inference runtime that serves the model")]
        cuda = ctx.capabilities.device == "cuda"
        if "compile" in engines:
            # CUDA graphs (reduce-overhead, max-autotune) exist only on CUDA
            modes = ("default", "reduce-overhead", "max-autotune") if cuda else ("default",
                                                                               "max-autotune-no-cudagraphs")
            when: dict[str, list[Any]] = {"engine": ["compile"]}
            if not cuda:  # Inductor's CPU GEMM autotuner aborts on dynamically quantized Linear (torch 2.13)
                offered = {m for modes in table.values() for m in modes}
                when["quantization.mode"] = [m for m in PRECISIONS if m in offered and m != "dynamic_int8"] + [None]
            space.append(categorical("compile_mode", modes, when=when,
                                     help="torch.compile mode (max-autotune benchmarks kernels: slower compile)"))
        if "onnxruntime" in engines:
            space.append(categorical("ort_level", ("basic", "extended", "all"), when={"engine": ["onnxruntime"]},
                                     help="ONNX Runtime graph optimization level"))
            gpu = ort_gpu_providers(ctx.capabilities) if cuda else []
            if gpu:
                space.append(categorical("ort_provider", gpu, when={"engine": ["onnxruntime"]},
                                         help="ONNX Runtime execution provider on this GPU worker"))
        if "static_int8" in table.get("openvino", []):
            space += _openvino_space(ctx)
        return space

    def off_params(self, ctx: SpaceContext) -> Params:
        return {"engine": "eager"}

    def configure(self, params: Params, trial: TrialContext) -> None:
        """Publish the engine before any stage runs, so the quantization strategy knows to hand over."""
        trial.settings["runtime"] = params.get("engine", "eager")

    def apply(self, model: torch.nn.Module, params: Params, trial: TrialContext) -> torch.nn.Module:
        engine = params.get("engine", "eager")
        if engine == "eager":
            return model
        if engine not in ENGINES:
            raise TrialFailed(f"runtime engine {engine!r} is unknown; use one of {', '.join(ENGINES)}")
        if trial.device.type == "cuda" and engine == "onnxruntime" and "ort_provider" not in params:
            trial.notes.append("runtime: no GPU execution provider in onnxruntime here; ran on the CPU provider")
        precision = str(trial.settings.get("precision", "none"))
        model = model.eval()
        if engine == "compile":
            return _compiled(model, params, trial, precision)
        if engine == "openvino":
            return _openvino(model, params, trial, precision)
        return _onnxruntime(model, params, trial, precision)


OV_INT8 = {"engine": ["openvino"], "quantization.mode": ["static_int8"]}
SMOOTH_QUANT_ALPHAS = (0.95, 0.8, 0.5, -1.0)  # NNCF's default first; -1 turns SmoothQuant off (NNCF's spelling)


def _openvino_space(ctx: SpaceContext) -> list[Param]:
    """NNCF's knobs where they apply: only in OpenVINO int8 trials, SmoothQuant for transformers, full bias
    correction for other models (on a transformer it took 3 minutes and left fidelity at 0.767)."""
    transformer = bool(ctx.model_info.get("transformer"))
    space = [categorical("ov_preset", ("performance", "mixed"), when=OV_INT8,
                         help="NNCF preset: symmetric (performance) or asymmetric (mixed) activation quantization")]
    if transformer:
        space.append(categorical("ov_smooth_quant", SMOOTH_QUANT_ALPHAS, when=OV_INT8,
                                 help="NNCF SmoothQuant alpha for MatMuls (-1: off)"))
    else:
        space.append(categorical("ov_fast_bias_correction", (True, False), when=OV_INT8,
                                 help="NNCF fast bias correction (False: the full, slower algorithm)"))
    if ctx.capabilities.cpu_bf16:
        space.append(categorical("ov_precision", ("f32", "bf16"), when=OV_INT8,
                                 help="OpenVINO inference precision of the int8 model's float parts"))
    return space


def torch_version() -> str:
    import torch

    return str(torch.__version__)


def _example(trial: TrialContext, model: torch.nn.Module) -> Any:
    """A real batch at the trial's serving batch size, on the model's device."""
    from optagent.plugins._util import model_device

    return trial.model_file.batch(trial.infer_batch_size, model_device(model, trial.device))


def _max_diff(reference: torch.nn.Module, served: torch.nn.Module, example: Any) -> float:
    import torch

    with torch.inference_mode():
        want, got = ins.call(reference, example), ins.call(served, example)
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.shape == got.shape:
        return float((want.float() - got.float()).abs().max())
    return float("nan")


def _cast_wrapper(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    import torch

    return low_precision_class()(model, torch.bfloat16 if precision == "bf16" else torch.float16)


def _compiled(model: torch.nn.Module, params: Params, trial: TrialContext, precision: str) -> torch.nn.Module:
    from optagent.plugins import _compile as tc

    example = _example(trial, model)
    reference = model
    source = tc.copy_for_compile(model)
    recipe: dict[str, Any] = {"engine": "compile", "precision": precision, "batch_size": ins.batch_size(example),
                              "threads": trial.threads}
    if precision in INT8:
        if trial.device.type != "cpu" or not trial.capabilities.x86:
            raise TrialFailed(f"{precision} under torch.compile uses the x86 Inductor quantizer: x86 CPU only")
        mode = params.get("compile_mode", "default")
        if precision == "dynamic_int8" and mode.startswith("max-autotune"):
            # torch 2.13: the process aborts ("double free or corruption") while Inductor autotunes its CPU
            # GEMM template for dynamically quantized Linear layers; fail fast instead of losing the process
            raise TrialFailed("dynamic_int8 with compile_mode max-autotune crashes Inductor's CPU GEMM autotuner "
                              f"in torch {torch_version()}; use compile_mode=default")
        if not tc.pt2e_available():
            raise TrialFailed(f"{precision} under torch.compile needs torchao's PT2E flow; pip install torchao")
        import time

        started = time.perf_counter()
        source = tc.pt2e_quantize(source, example, calibration_batches(trial, model),
                                  dynamic=precision == "dynamic_int8",
                                  keep_float=trial.settings.get("float_layers") or [])
        trial.extra_metrics["quantize_time_s"] = time.perf_counter() - started
    elif precision in ("bf16", "fp16"):
        source = _cast_wrapper(source, precision)
    elif precision != "none":
        raise TrialFailed(f"precision {precision!r} is unknown to the compile runtime")
    served, seconds = tc.compile_model(source, example, params.get("compile_mode", "default"), recipe)
    trial.extra_metrics["compile_time_s"] = seconds
    trial.extra_metrics["runtime_max_abs_diff"] = _max_diff(reference, served, example)
    trial.notes.append(f"runtime: torch.compile ({recipe.get('precision')}, mode "
                       f"{params.get('compile_mode', 'default')}) compiled in {seconds:.1f} s at batch "
                       f"{recipe['batch_size']}; other batch sizes run in slices of that size")
    return served


def _onnxruntime(model: torch.nn.Module, params: Params, trial: TrialContext, precision: str) -> torch.nn.Module:
    from optagent.plugins import _onnx

    if precision == "bf16":
        raise TrialFailed("quantization.mode=bf16 cannot run under ONNX Runtime: its CPU execution provider has "
                          "no bf16 kernels; use runtime.engine=compile or eager for bf16")
    if precision == "fp16" and trial.device.type != "cuda":
        raise TrialFailed("fp16 under ONNX Runtime needs a GPU execution provider")
    if precision not in ("none", "fp16", *INT8):
        raise TrialFailed(f"precision {precision!r} is unknown to the onnxruntime runtime")
    if precision in INT8 and trial.device.type != "cpu":
        model = model.cpu()  # ORT int8 kernels are CPU kernels
    example = _example(trial, model)
    provider = params.get("ort_provider")
    providers = [provider, "CPUExecutionProvider"] if provider else ["CPUExecutionProvider"]
    exported = _cast_wrapper(model, "fp16") if precision == "fp16" else model
    caps = trial.capabilities
    # without VNNI (or AMX) x86 int8 kernels saturate on full-range weights: quantize them to 7 bits
    reduce_range = caps.x86 and not has_vnni(caps)
    served, seconds = _onnx.build(exported, example, precision, calibration_batches(trial, model), trial.threads,
                                  params.get("ort_level", "all"), providers, reduce_range=reduce_range,
                                  keep_float=list(trial.settings.get("float_layers") or []))
    if reduce_range and precision in INT8:
        trial.notes.append("runtime: this CPU has no VNNI, so ONNX Runtime int8 weights use 7 bits (reduce_range) "
                           "to avoid saturation in its u8 x s8 kernels")
    trial.extra_metrics["export_time_s"] = seconds
    trial.extra_metrics["runtime_max_abs_diff"] = _max_diff(model, served, example)
    if served.fixed_batch is not None:
        trial.notes.append(f"runtime: the batch axis could not be exported as dynamic; the ONNX model is fixed at "
                           f"batch {served.fixed_batch} and other batch sizes run in slices")
    return served


def _openvino(model: torch.nn.Module, params: Params, trial: TrialContext, precision: str) -> torch.nn.Module:
    from optagent.plugins import _openvino as ov

    caps = trial.capabilities
    device = "CPU"
    if precision == "none":
        hint = "f32"  # explicit: on a CPU with AMX, OpenVINO's default precision is bf16
    elif precision == "bf16":
        if not caps.cpu_bf16:
            raise TrialFailed("bf16 under OpenVINO needs native bf16 (AVX512-BF16 or AMX); this CPU would emulate it")
        hint = "bf16"
    elif precision == "fp16":
        if not (openvino_gpu(caps) and ov.has_device("GPU")):
            raise TrialFailed("fp16 under OpenVINO runs on an Intel GPU, and OpenVINO sees none on this worker")
        hint, device = "f16", "GPU"
    elif precision == "static_int8":
        if trial.device.type != "cpu":
            raise TrialFailed("OpenVINO int8 runs on the CPU; this trial's model is on " + trial.device.type)
        hint = str(params.get("ov_precision", "f32"))
        if hint == "bf16" and not caps.cpu_bf16:
            raise TrialFailed("ov_precision=bf16 needs native bf16 (AVX512-BF16 or AMX) on this CPU")
    elif precision == "dynamic_int8":
        raise TrialFailed("OpenVINO serves static int8 (NNCF, calibrated); dynamic_int8 is not one of its modes: "
                          "use quantization.mode=static_int8 with runtime.engine=openvino")
    else:
        raise TrialFailed(f"precision {precision!r} is unknown to the openvino runtime")
    model = model.cpu()
    example = _example(trial, model)
    transformer = ov.is_transformer(model)
    smooth = params.get("ov_smooth_quant", 0.95) if transformer else None
    fast_bc = bool(params.get("ov_fast_bias_correction", True)) or transformer
    served, seconds, notes = ov.build(
        model, example, calibration_batches(trial, model) if precision == "static_int8" else [],
        threads=trial.threads, precision=precision, hint=hint, device=device,
        preset=str(params.get("ov_preset", "performance")), smooth_quant=None if smooth is None else float(smooth),
        fast_bias_correction=fast_bc, keep_float=list(trial.settings.get("float_layers") or []))
    trial.extra_metrics.update(seconds)
    trial.extra_metrics["runtime_max_abs_diff"] = _max_diff(model, served, example)
    trial.notes += notes
    trial.notes.append(f"runtime: OpenVINO {served.recipe['openvino']} on {device} ({ov.device_name(device)}), "
                       f"{hint} inference precision, {trial.threads} thread(s); converted in "
                       f"{seconds['export_time_s']:.1f} s, compiled in {seconds['compile_time_s']:.1f} s"
                       + ("" if served.fixed_batch is None else f"; the batch axis could not be dynamic, so the "
                          f"model is fixed at batch {served.fixed_batch} and other batch sizes run in slices"))
    return served


@hookimpl
def optagent_register_strategies(register: Callable[[Strategy], None]) -> None:
    register(RuntimeStrategy())
