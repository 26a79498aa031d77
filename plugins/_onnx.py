"""ONNX export, ONNX Runtime quantization and sessions for the runtime strategy.

Imported lazily by `optagent.plugins.runtime` (it imports torch, onnx and onnxruntime). The model is
exported with the batch axis dynamic, so model.py's evaluation can feed any batch size; a model whose
batch size cannot be symbolic (e.g. a hard-coded reshape) is exported at the serving batch instead and
fed in slices of that size.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optagent import inputs as ins
from optagent.errors import TrialFailed
from optagent.plugins._compile import _under_dispatch_mode, chunked, first_line, one_batch
from optagent.plugins._util import quiet

LEVELS = ("basic", "extended", "all")


def _quiet() -> contextlib.AbstractContextManager[None]:
    """The exporter reports progress on stdout, warns about ops it cannot register, and a failed TorchScript
    export prints its whole IR graph on stderr before it raises."""
    return quiet("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript", "root")


def _legacy_export(model: torch.nn.Module, example: Any, path: Path) -> None:
    """The TorchScript-based exporter: its graphs keep module scopes in node names (/bert/encoder/layer.0/
    output/dense/MatMul), which ONNX Runtime's shape inference, transformer fusions and per-layer exclusion
    handle; for a Hugging Face encoder it also runs faster than the dynamo graph (1.72x vs 1.50x here)."""
    import warnings

    args, kwargs = ins.as_args(example)
    names = list(ins.named(example))
    axes = {name: {0: "batch"} for name in names}
    with _quiet(), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(model, (*args, kwargs) if kwargs else args, str(path), dynamo=False, input_names=names,
                          output_names=["output"], dynamic_axes={**axes, "output": {0: "batch"}}, opset_version=17)
    # tracing records one path through Python control flow: a branch on the input's values in the model's own
    # code would be frozen into the graph (a wrong model, silently); library code (transformers' mask
    # handling) branches on shapes and warns too, so only warnings from outside installed packages count
    own = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
           and not any(p in str(w.filename) for p in ("site-packages", "dist-packages"))]
    if own:
        raise RuntimeError(f"tracing would freeze data-dependent control flow at {own[0].filename}:{own[0].lineno}")


def export(model: torch.nn.Module, example: Any, path: Path) -> bool:
    """Export to ONNX with a dynamic batch axis if possible; returns whether the batch axis is dynamic.

    The TorchScript exporter is tried first (module scopes in node names, see `_legacy_export`), then the
    dynamo exporter. The ONNX inputs are named as `optagent.inputs.named` names them (a dict's own keys,
    e.g. input_ids and attention_mask), and keep their dtypes: token ids stay int64.
    """
    first: Exception | None = None
    try:
        _legacy_export(model, example, path)
        return True
    except Exception as exc:
        first = exc
        path.unlink(missing_ok=True)
    args, kwargs = ins.as_args(example)
    for dynamic in (True, False):
        shapes = ins.batch_dims(example) if dynamic else None
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(model, args, str(path), kwargs=kwargs or None, dynamo=True,
                                  dynamic_shapes=shapes, input_names=list(ins.named(example)), verbose=False,
                                  optimize=True, external_data=False)
            return dynamic
        except Exception as exc:
            first = first or exc
    assert first is not None
    raise TrialFailed(f"torch.onnx cannot export the model: {first_line(first)}") from first


def quantize(src: Path, dst: Path, precision: str, calibration: Iterable[Any], batch: int | None,
             reduce_range: bool = False, exclude: list[str] | None = None) -> None:
    """ONNX Runtime's own int8: dynamic (MatMul/Gemm, weights int8, activations per call) or static QDQ.

    `reduce_range` quantizes weights to 7 bits: x86 CPUs without VNNI multiply u8 x s8 with a 16-bit
    intermediate (vpmaddubsw) that saturates on full-range weights. Measured here on an AVX2-only EPYC: a
    static-int8 digits CNN fell from 0.99 to 0.74 accuracy at full range.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    # ONNX Runtime's fused ops carry no inferred type; MatMuls between two activations (attention scores)
    # stay float: only those with a constant weight are quantized
    options = {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True}
    try:
        with _quiet():
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            except Exception:  # symbolic shape inference fails on some dynamo graphs (Expand): without it
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            if precision == "dynamic_int8":
                quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                                 reduce_range=reduce_range, op_types_to_quantize=["MatMul", "Gemm"],
                                 nodes_to_exclude=exclude or [], extra_options=options)
            else:
                feeds = iter(list(_numpy_batches(calibration, batch)))

                class Reader(CalibrationDataReader):
                    def get_next(self) -> dict[str, np.ndarray] | None:
                        return next(feeds, None)

                reader = Reader()
                quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=exclude or [], extra_options=options)
    except TrialFailed:
        raise
    except Exception as exc:
        raise TrialFailed(f"ONNX Runtime {precision} quantization failed: {first_line(exc)}") from exc


def nodes_of(path: Path, modules: Iterable[str]) -> list[str]:
    """The ONNX MatMul/Gemm/Conv nodes that implement the named torch modules (for nodes_to_exclude).

    The TorchScript exporter names nodes by module scope: module `bert.encoder.layer.0.output.dense` is
    scope `/bert/encoder/layer.0/output/dense/` (a ModuleList index stays joined to its list's name).
    """
    import onnx

    prefixes = []
    for name in modules:
        parts: list[str] = []
        for part in name.split("."):
            if part.isdigit() and parts:
                parts[-1] = f"{parts[-1]}.{part}"
            else:
                parts.append(part)
        prefixes.append("/" + "/".join(parts) + "/")
    graph = onnx.load(str(path), load_external_data=False).graph
    kinds = ("MatMul", "Gemm", "Conv")
    return [n.name for n in graph.node if n.op_type in kinds and n.name.startswith(tuple(prefixes))]


def feed(x: Any) -> dict[str, np.ndarray]:
    """An ONNX Runtime feed: each input by name, on the CPU, in its own dtype (token ids stay int64)."""
    return {name: t.detach().cpu().contiguous().numpy() for name, t in ins.named(x).items()}


def _numpy_batches(batches: Iterable[Any], batch: int | None) -> Iterator[dict[str, np.ndarray]]:
    for x in batches:
        if batch is None:
            yield feed(x)
        else:  # a fixed-batch export: feed calibration in slices of that size, the last one padded
            for start in range(0, ins.batch_size(x), batch):
                yield feed(ins.pad_to(ins.take(x, start, start + batch), batch))


def session(path: Path, threads: int, level: str, providers: list[str]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.log_severity_level = 3  # errors only
    # idle worker threads would spin after each run and steal the cores from the baseline timed next
    # (interleaved timing), inflating the measured speedup; serving without spinning is the honest figure
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        raise TrialFailed(f"ONNX Runtime cannot load the exported model: {first_line(exc)}") from exc


class OrtModule(torch.nn.Module):
    """An ONNX Runtime session behind the torch calling convention: tensors in, tensors out.

    The ONNX file's bytes are a buffer, so `state_dict()` (and model_size_mb) measures the file a user
    ships. `source` is the float torch module that was exported, kept for FLOP counting only.
    """

    _source: torch.nn.Module
    onnx_model: torch.Tensor

    def __init__(self, onnx_bytes: bytes, sess: Any, source: torch.nn.Module, fixed_batch: int | None,
                 recipe: dict[str, Any]):
        super().__init__()
        self.register_buffer("onnx_model", torch.frombuffer(bytearray(onnx_bytes), dtype=torch.uint8))
        object.__setattr__(self, "_source", source)  # not a submodule: its weights are not in the .onnx's size
        self._session = sess
        self._inputs = [i.name for i in sess.get_inputs()]
        self.fixed_batch = fixed_batch
        self.recipe = recipe

    def _run(self, x: Any) -> Any:
        given = feed(x)
        outs = self._session.run(None, {name: given[name] for name in self._inputs if name in given})
        device = ins.leaves(x)[0].device
        tensors = [torch.from_numpy(o).to(device) for o in outs]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = one_batch(args, kwargs)
        if _under_dispatch_mode():
            if self.recipe.get("precision", "none") != "none":
                raise RuntimeError("an int8 ONNX graph has no float FLOP count")
            return ins.call(self._source, x)
        if self.fixed_batch is None:
            return self._run(x)
        return chunked(self._run, x, self.fixed_batch)

    def train(self, mode: bool = True) -> OrtModule:
        """Serving only: there is nothing to switch in an ONNX Runtime session."""
        self.training = mode
        return self

    def extra_repr(self) -> str:
        return f"providers={self._session.get_providers()}, recipe={self.recipe}"

    def optagent_export(self, directory: Path) -> list[Path]:
        """The .onnx file, plus the session settings it was measured with."""
        directory.mkdir(parents=True, exist_ok=True)
        model = directory / "model.onnx"
        model.write_bytes(self.onnx_model.numpy().tobytes())
        settings = directory / "onnxruntime_session.json"
        settings.write_text(json.dumps({**self.recipe, "inputs": self._inputs,
                                        "providers": self._session.get_providers()}, indent=2) + "\n")
        return [model, settings]


def build(model: torch.nn.Module, example: Any, precision: str, calibration: Iterable[Any],
          threads: int, level: str, providers: list[str], *, reduce_range: bool = False,
          keep_float: list[str] | None = None) -> tuple[OrtModule, float]:
    """Export, quantize (if asked), open the session; returns the wrapper and the seconds it took."""
    started = time.perf_counter()
    model = model.eval()
    with tempfile.TemporaryDirectory(prefix="optagent-onnx-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        dynamic = export(model, example, fp32)
        fixed = None if dynamic else ins.batch_size(example)
        final = fp32
        if precision in ("dynamic_int8", "static_int8"):
            final = Path(tmp) / "model.int8.onnx"
            exclude = nodes_of(fp32, keep_float) if keep_float else []
            quantize(fp32, final, precision, calibration, fixed, reduce_range, exclude)
        sess = session(final, threads, level, providers)
        data = final.read_bytes()
    recipe = {"engine": "onnxruntime", "precision": precision, "graph_optimization_level": level,
              "intra_op_num_threads": threads, "inter_op_num_threads": 1, "dynamic_batch": dynamic,
              "reduce_range": reduce_range and precision in ("dynamic_int8", "static_int8")}
    return OrtModule(data, sess, model, fixed, recipe), time.perf_counter() - started
