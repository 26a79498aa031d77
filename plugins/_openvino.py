"""OpenVINO conversion, NNCF int8 and compiled-model serving for the runtime strategy.

Imported lazily by `optagent.plugins.runtime` only when a trial serves with `runtime.engine=openvino`
(it imports torch, openvino and, for int8, nncf). The trial's torch model, after pruning and fine-tuning,
is converted with `openvino.convert_model` and its batch axis made dynamic (the other dimensions stay as
the example input has them, so OpenVINO plans its kernels for them); a model whose batch cannot be
dynamic is served at the trial's batch and fed in slices, like the other engines.

Precision is OpenVINO's inference precision hint (f32, bf16 on CPUs with native bf16, f16 on an Intel
GPU), always set explicitly: on a CPU with AMX, OpenVINO's own default is bf16, so "none" would otherwise
not mean fp32. int8 is NNCF post-training quantization of the OpenVINO model, calibrated on the model
file's calibration split (one sample per item, as NNCF's statistics expect), with the transformer model
type for transformers. What the research behind this module measured on all-MiniLM-L6-v2 (one thread):

- int8, PERFORMANCE preset, f32 precision: 4.0-4.6x at batch 1 at fidelity 0.9975;
- int8 in bf16 precision drops fidelity to 0.889 unless ScaledDotProductAttention is left unquantized
  (NNCF puts FakeQuantize on its inputs and the bf16 kernels break them), so with bf16 it always is;
- `fast_bias_correction=False` (full bias correction) drops a transformer to 0.767: the runtime strategy
  offers it for other models only.

The mixed-precision strategy's float set (torch module names) becomes NNCF's ignored scope: the
TorchScript-based conversion names nodes by module scope (`__module.bert.encoder.layer.0.output.dense/
aten::linear/MatMul`); a Conv whose BatchNorm was folded into it loses its scope (`Multiply_2937`), and is
found by its weight shape in execution order instead.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optagent import inputs as ins
from optagent.errors import TrialFailed
from optagent.plugins._compile import _under_dispatch_mode, chunked, first_line, one_batch
from optagent.plugins._openvino_layers import LAYER_TYPES, layer_nodes, quantized_layers
from optagent.plugins._util import quiet

SDPA = "ScaledDotProductAttention"
SUBSET = 300  # NNCF's default calibration subset; more samples only cost time


def _quiet() -> contextlib.AbstractContextManager[None]:
    """The TorchScript tracer warns on every data-dependent branch; NNCF logs and draws progress bars."""
    return quiet("nncf", "openvino", "torch.jit", "transformers")


def version() -> str:
    import openvino as ov

    return str(ov.get_version()).split("-")[0]


def device_name(device: str) -> str:
    import openvino as ov

    try:
        return str(ov.Core().get_property(device, "FULL_DEVICE_NAME"))
    except Exception:
        return device


def has_device(device: str) -> bool:
    import openvino as ov

    return any(d.split(".")[0] == device for d in ov.Core().available_devices)


# -- conversion -----------------------------------------------------------------------------------------
def _ports(ov_model: Any, example: Any) -> list[Any]:
    """The feed keys, in the order `feed` fills them: input names for a dict, positions otherwise."""
    names = [p.get_any_name() if p.get_names() else str(i) for i, p in enumerate(ov_model.inputs)]
    if isinstance(example, dict):
        missing = [n for n in names if n not in example]
        if missing:
            raise TrialFailed(f"OpenVINO's model takes inputs {', '.join(missing)} that the example input does not "
                              "have")
        return names
    args, _ = ins.as_args(example)
    if len(args) != len(names):
        raise TrialFailed(f"OpenVINO's model has {len(names)} inputs but the model is called with {len(args)} "
                          "tensors (an unused input was dropped?); pass only the inputs forward() uses")
    return list(range(len(names)))


def feed(x: Any, keys: list[Any]) -> dict[Any, np.ndarray]:
    """An OpenVINO feed: each input by name (dicts) or position, on the CPU, in its own dtype."""
    if isinstance(x, dict):
        return {k: x[k].detach().cpu().contiguous().numpy() for k in keys}
    args, _ = ins.as_args(x)
    return {i: args[i].detach().cpu().contiguous().numpy() for i in keys}


def _shapes(ov_model: Any, example: Any, dynamic: bool) -> dict[Any, Any]:
    """Each input's shape as the example has it, the batch axis dynamic if asked."""
    import openvino as ov

    tensors = list(ins.named(example).values()) if not isinstance(example, dict) else None
    out = {}
    for i, port in enumerate(ov_model.inputs):
        t = example[port.get_any_name()] if isinstance(example, dict) else tensors[i]  # type: ignore[index]
        dims = list(t.shape)
        out[port] = ov.PartialShape([-1 if dynamic else dims[0], *dims[1:]])
    return out


def convert(model: torch.nn.Module, example: Any) -> Any:
    """`openvino.convert_model` from the torch module, traced on the example input (its form and dtypes).

    OpenVINO reads a TorchScript trace first. When its frontend has no rule for an op of the trace (the
    Llama mask code of transformers calls `aten::diff`), the model goes through `torch.export` instead,
    which decomposes such composite ops into core ATen ops that OpenVINO's FX frontend reads."""
    import openvino as ov

    args, kwargs = ins.as_args(example)
    try:
        with _quiet(), torch.no_grad():
            return ov.convert_model(model, example_input=example if not isinstance(example, list) else tuple(example))
    except Exception as exc:
        traced = exc
    try:
        with _quiet(), torch.no_grad():
            return ov.convert_model(torch.export.export(model, args, kwargs))
    except Exception as exc:
        raise TrialFailed(f"openvino.convert_model cannot convert the model: {_conversion_reason(traced)} (and "
                          f"through torch.export: {first_line(exc)})") from exc


def _conversion_reason(exc: BaseException) -> str:
    """The line of OpenVINO's conversion report that names the ops it has no rule for, else the first line."""
    text = str(exc)
    missing = next((ln.strip("- ").strip() for ln in text.splitlines() if "No conversion rule found" in ln), "")
    return missing or first_line(exc)


# -- NNCF ---------------------------------------------------------------------------------------------------
def _items(calibration: Iterable[Any], fixed: int | None) -> list[Any]:
    """Calibration inputs one sample per item (a dynamic batch), or in slices of the fixed batch."""
    items: list[Any] = []
    for batch in calibration:
        size = fixed or 1
        for start in range(0, ins.batch_size(batch), size):
            items.append(ins.pad_to(ins.take(batch, start, start + size), size))
            if len(items) >= SUBSET:
                return items
    return items


def nncf_quantize(ov_model: Any, items: list[Any], keys: list[Any], *, transformer: bool, preset: str,
                  smooth_quant: float | None, fast_bias_correction: bool, ignore_sdpa: bool,
                  float_nodes: list[str]) -> Any:
    """NNCF post-training int8 of an OpenVINO model."""
    with _quiet():
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
        )

        advanced = None
        if transformer and smooth_quant is not None:
            advanced = AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=float(smooth_quant)))
        scope = nncf.IgnoredScope(names=list(float_nodes), types=[SDPA] if ignore_sdpa else [], validate=False)
        try:
            return nncf.quantize(
                ov_model, nncf.Dataset(items, lambda x: feed(x, keys)), subset_size=len(items),
                preset=nncf.QuantizationPreset(preset), fast_bias_correction=fast_bias_correction,
                model_type=nncf.ModelType.TRANSFORMER if transformer else None, ignored_scope=scope,
                advanced_parameters=advanced)
        except Exception as exc:
            raise TrialFailed(f"NNCF int8 quantization failed: {first_line(exc)}") from exc


# -- compilation and serving --------------------------------------------------------------------------------
def config(threads: int, hint: str, device: str, perf_count: bool = False) -> dict[str, Any]:
    """The compile properties: the trial's threads, a latency hint, one stream, an explicit precision
    (`hint`: f32, bf16 or f16).

    CPU pinning is off: trials on one host share its cores, and a pinned OpenVINO thread would fight the
    baseline (and other trials' threads) for the core it was pinned to instead of being scheduled.
    """
    props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
    if device == "CPU":
        props.update(INFERENCE_NUM_THREADS=threads, NUM_STREAMS=1, ENABLE_CPU_PINNING=False)
    if perf_count:
        props["PERF_COUNT"] = True
    return props


def _compile(ov_model: Any, device: str, props: dict[str, Any]) -> Any:
    import openvino as ov

    try:
        return ov.Core().compile_model(ov_model, device, props)
    except Exception as exc:
        raise TrialFailed(f"OpenVINO cannot compile the model for {device}: {first_line(exc)}") from exc


def _serialize(ov_model: Any) -> tuple[bytes, bytes, Any]:
    """The IR files' bytes (weights as they are: no fp16 compression) and the model read back from them,
    so the model served is exactly the one `optagent export` writes."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="optagent-ov-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        xml_bytes, bin_bytes = xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    weights = ov.Tensor(np.frombuffer(bin_bytes, dtype=np.uint8).copy()) if bin_bytes else ov.Tensor(
        np.zeros(0, dtype=np.uint8))
    return xml_bytes, bin_bytes, ov.Core().read_model(xml_bytes.decode(), weights)


class OvModule(torch.nn.Module):
    """An OpenVINO compiled model behind the torch calling convention: tensors in, tensors out.

    One InferRequest is reused for every call. The IR's bytes are buffers, so `state_dict()` (and
    model_size_mb) measures the files a user ships. `source` is the float torch module that was converted,
    kept for FLOP counting only; `layers` maps OpenVINO layer nodes to torch module names (profile).
    """

    _source: torch.nn.Module
    ov_xml: torch.Tensor
    ov_bin: torch.Tensor

    def __init__(self, xml: bytes, weights: bytes, ov_model: Any, compiled: Any, keys: list[Any],
                 source: torch.nn.Module, structure: Any, fixed_batch: int | None, recipe: dict[str, Any],
                 layers: dict[str, str]):
        super().__init__()
        self.register_buffer("ov_xml", torch.frombuffer(bytearray(xml), dtype=torch.uint8))
        self.register_buffer("ov_bin", torch.frombuffer(bytearray(weights), dtype=torch.uint8) if weights
                             else torch.zeros(0, dtype=torch.uint8))
        object.__setattr__(self, "_source", source)  # not a submodule: its weights are not in the IR's size
        self._ov_model = ov_model
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._outputs = len(compiled.outputs)
        self._keys = keys
        self._structure = structure  # the eager output's pytree spec (None: a tensor or a tuple of them)
        self.fixed_batch = fixed_batch
        self.recipe = recipe
        self.layers = layers

    def _run(self, x: Any, request: Any = None) -> Any:
        request = request or self._request
        # the request's own output buffers are copied once, here (the next call overwrites them)
        request.infer(feed(x, self._keys), share_inputs=True, share_outputs=True)
        tensors = [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(self._outputs)]
        device = ins.leaves(x)[0].device
        if device.type != "cpu":
            tensors = [t.to(device) for t in tensors]
        if self._structure is not None:
            from torch.utils._pytree import tree_unflatten

            return tree_unflatten(tensors, self._structure)
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = one_batch(args, kwargs)
        if _under_dispatch_mode():
            if self.recipe.get("precision") == "static_int8":
                raise RuntimeError("an int8 OpenVINO model has no float FLOP count")
            return ins.call(self._source, x)
        if self.fixed_batch is None:
            return self._run(x)
        return chunked(self._run, x, self.fixed_batch)

    def train(self, mode: bool = True) -> OvModule:
        """Serving only: there is nothing to switch in a compiled OpenVINO model."""
        self.training = mode
        return self

    def extra_repr(self) -> str:
        return f"recipe={self.recipe}"

    def optagent_export(self, directory: Path) -> list[Path]:
        """The IR (model.xml + model.bin) and the compile configuration it was measured with."""
        directory.mkdir(parents=True, exist_ok=True)
        xml, weights = directory / "model.xml", directory / "model.bin"
        xml.write_bytes(self.ov_xml.numpy().tobytes())
        weights.write_bytes(self.ov_bin.numpy().tobytes())
        settings = directory / "openvino_config.json"
        settings.write_text(json.dumps({
            **self.recipe,
            "inputs": [{"name": p.get_any_name() if p.get_names() else None,
                        "type": p.get_element_type().get_type_name(), "shape": str(p.get_partial_shape())}
                       for p in self._ov_model.inputs],
            "how": "core = openvino.Core(); compiled = core.compile_model(core.read_model('model.xml'), "
                   "config['device'], config['properties'])",
        }, indent=2) + "\n")
        return [xml, weights, settings]

    def counted(self) -> Any:
        """The same model compiled again with OpenVINO's per-layer performance counters (PERF_COUNT)."""
        return _compile(self._ov_model, self.recipe["device"], {**self.recipe["properties"], "PERF_COUNT": True})

    def optagent_profile(self, batch: Any, *, threads: int, reps: int = 10, warmup: int = 5, top: int = 15) -> Any:
        """OpenVINO's own per-layer performance counters (PERF_COUNT), as an optagent.profile.Profile."""
        from optagent.plugins._openvino_layers import profile

        return profile(self, batch, reps=reps, warmup=warmup, top=top)


# -- the whole build ----------------------------------------------------------------------------------------
def is_transformer(model: torch.nn.Module) -> bool:
    """A Hugging Face transformer (or anything with its config's attention fields), as the pipeline's
    model_info tells them apart."""
    return any(hasattr(getattr(m, "config", None), "num_attention_heads") for m in model.modules())


def _structure(model: torch.nn.Module, example: Any, outputs: int) -> Any:
    """The eager output's pytree spec, when it is more than a tensor or a flat tuple of them."""
    from torch.utils._pytree import tree_flatten

    with torch.no_grad():
        out = ins.call(model, example)
    leaves, spec = tree_flatten(out)
    if isinstance(out, torch.Tensor) or (isinstance(out, tuple) and all(isinstance(o, torch.Tensor) for o in out)):
        return None
    return spec if len(leaves) == outputs else None


def _batch_axis(ov_model: Any, model: torch.nn.Module, example: Any, keys: list[Any], threads: int) -> int | None:
    """Make the batch axis dynamic if the converted graph allows it; else fix it at the example's batch
    (returned). A batch axis can reshape and still be baked in (the tracer unrolled a loop over the
    batch), so the float graph is run once at another batch size and its output shapes checked."""
    n = ins.batch_size(example)
    other = ins.take(example, 0, 1) if n > 1 else ins.repeat_to(example, 2)
    try:
        ov_model.reshape(_shapes(ov_model, example, dynamic=True))
        request = _compile(ov_model, "CPU", config(threads, "f32", "CPU")).create_infer_request()
        got = request.infer(feed(other, keys))
        with torch.no_grad():
            want = ins.leaves(ins.call(model, other))
        if sorted(tuple(v.shape) for v in got.values()) == sorted(tuple(t.shape) for t in want):
            return None
    except Exception:
        pass
    ov_model.reshape(_shapes(ov_model, example, dynamic=False))
    return n


def build(model: torch.nn.Module, example: Any, calibration: Iterable[Any], *, threads: int, precision: str,
          hint: str, device: str = "CPU", preset: str = "performance", smooth_quant: float | None = None,
          fast_bias_correction: bool = True, keep_float: list[str] | None = None,
          ) -> tuple[OvModule, dict[str, float], list[str]]:
    """Convert, quantize (static_int8), compile; returns the wrapper, setup seconds by phase, and notes."""
    model = model.eval()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    started = time.perf_counter()
    ov_model = convert(model, example)
    keys = _ports(ov_model, example)
    fixed = _batch_axis(ov_model, model, example, keys, threads)
    seconds["export_time_s"] = time.perf_counter() - started
    layers = layer_nodes(ov_model, model, example)
    transformer = is_transformer(model)
    recipe: dict[str, Any] = {"engine": "openvino", "openvino": version(), "precision": precision,
                              "device": device, "transformer": transformer}
    if precision == "static_int8":
        started = time.perf_counter()
        floats = list(keep_float or [])
        nodes = [node for node, module in layers.items() if module in set(floats)]
        unmatched = sorted(set(floats) - {layers[n] for n in nodes})
        quantized = nncf_quantize(ov_model, _items(calibration, fixed), keys, transformer=transformer, preset=preset,
                                  smooth_quant=smooth_quant, fast_bias_correction=fast_bias_correction,
                                  ignore_sdpa=hint == "bf16", float_nodes=nodes)
        seconds["quantize_time_s"] = time.perf_counter() - started
        int8 = quantized_layers(quantized)
        total = sum(op.get_type_name() in LAYER_TYPES for op in ov_model.get_ordered_ops())
        import nncf

        recipe.update(nncf=nncf.__version__, preset=preset, fast_bias_correction=fast_bias_correction,
                      smooth_quant_alpha=smooth_quant if transformer else None, float_layers=floats,
                      ignored_nodes=nodes + ([f"type:{SDPA}"] if hint == "bf16" else []))
        notes.append(f"runtime: NNCF int8 ({preset} preset" + (f", SmoothQuant alpha {smooth_quant}" if transformer
                                                               and smooth_quant is not None else "")
                     + f", fast bias correction {'on' if fast_bias_correction else 'off'}) in "
                       f"{seconds['quantize_time_s']:.1f} s: {len(int8)} of {total} MatMul/Convolution layers int8"
                     + (f", {len(nodes)} kept float" if nodes else "")
                     + (f"; float layers with no OpenVINO node (quantized): {', '.join(unmatched)}" if unmatched
                        else ""))
        ov_model = quantized
    started = time.perf_counter()
    xml, weights, ov_model = _serialize(ov_model)
    props = config(threads, hint, device)
    compiled = _compile(ov_model, device, props)
    recipe.update(properties=props, dynamic_batch=fixed is None, fixed_batch=fixed, inference_precision=hint)
    structure = _structure(model, example, len(compiled.outputs))
    served = OvModule(xml, weights, ov_model, compiled, keys, model, structure, fixed, recipe, layers)
    seconds["compile_time_s"] = time.perf_counter() - started
    return served, seconds, notes
