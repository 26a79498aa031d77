"""Which torch module each OpenVINO layer node implements: for the float set and for profiles.

The TorchScript-based conversion names nodes by module scope (`__module.bert.encoder.layer.0.output.dense/
aten::linear/MatMul`); a Conv whose BatchNorm was folded into it loses its scope (`Multiply_2937`), and is
found by its weight shape in execution order instead. `profile` reads OpenVINO's per-layer performance
counters and attributes each executed node to its module (optagent.plugins._openvino.OvModule uses it).
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from optagent import inputs as ins

LAYER_TYPES = ("MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData")
_SCOPE = re.compile(r"^__module\.([^/]+)/")


# -- the float set ----------------------------------------------------------------------------------------
def _weight_shape(node: Any) -> tuple[int, ...] | None:
    shape = node.input(1).get_partial_shape()
    return tuple(d.get_length() for d in shape) if shape.is_static else None


def _conv_order(model: torch.nn.Module, example: Any) -> list[str]:
    """Conv modules by name, in the order one forward call runs them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
               for name, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    try:
        with torch.no_grad():
            ins.call(model, ins.take(example, 0, 1))
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def layer_nodes(ov_model: Any, model: torch.nn.Module, example: Any) -> dict[str, str]:
    """OpenVINO layer node (MatMul/Convolution) -> the torch module it implements, for every one found.

    By module scope in the node's name; a Conv whose BatchNorm was folded lost its scope, so the unnamed
    Convolution nodes are paired with the Conv modules of the same weight size in execution order.
    """
    modules = dict(model.named_modules())
    found: dict[str, str] = {}
    unnamed: dict[int, list[str]] = defaultdict(list)
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() not in LAYER_TYPES:
            continue
        name = op.get_friendly_name()
        scope = _SCOPE.match(name)
        if scope and scope.group(1) in modules:
            found[name] = scope.group(1)
        elif op.get_type_name() != "MatMul" and (shape := _weight_shape(op)) is not None:
            unnamed[int(np.prod(shape))].append(name)
    named = set(found.values())
    convs = [n for n in _conv_order(model, example) if n not in named] if unnamed else []
    for conv in convs:
        queue = unnamed.get(modules[conv].weight.numel())
        if queue:
            found[queue.pop(0)] = conv
    return found


def quantized_layers(ov_model: Any) -> set[str]:
    """Names of the MatMul/Convolution nodes NNCF quantized: an input passes through a FakeQuantize or its
    weight is an int8 constant."""
    def int8(output: Any, depth: int = 0) -> bool:
        node = output.get_node()
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind == "Constant":
            return node.get_element_type().get_type_name() in ("i8", "u8")
        if depth < 3 and kind in ("Convert", "Multiply", "Subtract", "Reshape", "Transpose"):
            return any(int8(i.get_source_output(), depth + 1) for i in node.inputs())
        return False

    return {op.get_friendly_name() for op in ov_model.get_ordered_ops()
            if op.get_type_name() in LAYER_TYPES and any(int8(i.get_source_output()) for i in op.inputs())}


# -- profile ------------------------------------------------------------------------------------------------
def _module_kind(module: torch.nn.Module | None, node_type: str, exec_type: str) -> str:
    from optagent.profile import _kind

    int8 = bool(re.search(r"(^|_)[iIuU]8($|_)", exec_type))
    if module is None:
        return f"{node_type}[int8]" if int8 else node_type
    kind = _kind(module)
    return f"{kind}[int8]" if int8 and not kind.endswith("[int8]") else kind


def profile(served: Any, batch: Any, *, reps: int, warmup: int, top: int) -> Any:
    """Time `served` on `batch`, then run a copy compiled with PERF_COUNT and aggregate its counters.

    Each executed node is attributed to the torch module it implements (by its own name, then the names of
    the nodes the plugin fused into it); nodes of no module (reorders, input conversions) keep their name.
    """
    from optagent.profile import Profile, Row

    recipe = served.recipe
    x = batch if served.fixed_batch is None else ins.pad_to(ins.take(batch, 0, served.fixed_batch),
                                                            served.fixed_batch)
    with torch.inference_mode():
        for _ in range(warmup):
            served(x)
        plain = []
        for _ in range(max(reps, 5)):
            t0 = time.perf_counter()
            served(x)
            plain.append((time.perf_counter() - t0) * 1e3)
    counted = served.counted()
    request = counted.create_infer_request()
    original: dict[str, list[str]] = {}
    for op in counted.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        names = str(rt["originalLayersNames"].astype(str)) if "originalLayersNames" in rt else ""
        original[op.get_friendly_name()] = [n for n in names.split(",") if n]
    for _ in range(warmup):
        served._run(x, request)
    per_node: dict[str, list[Any]] = {}
    t0 = time.perf_counter()
    for _ in range(reps):
        served._run(x, request)
        for info in request.get_profiling_info():
            if str(info.status).endswith(".EXECUTED"):
                counters = per_node.setdefault(info.node_name, [info.node_type, info.exec_type, 0.0, 0])
                counters[2] += info.real_time.total_seconds() * 1e6
                counters[3] += 1
    wall_ms = (time.perf_counter() - t0) * 1e3
    latency_ms = statistics.median(plain)
    op_ms = sum(r[2] for r in per_node.values()) / 1e3 / reps
    per_call = max(latency_ms, op_ms)
    modules = dict(served._source.named_modules())

    def module_of(node: str) -> str | None:
        for name in (node, *original.get(node, [])):
            if name in served.layers:
                return served.layers[name]
        for name in (node, *original.get(node, [])):
            scope = _SCOPE.match(name)
            if scope and scope.group(1) in modules:
                return scope.group(1)
        return None

    def row(name: str, kind: str, us: float, count: float) -> Any:
        ms = us / 1e3 / reps
        return Row(name, kind, ms / per_call if per_call else 0.0, ms, count / reps)

    by_module: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for node, (node_type, exec_type, us, count) in per_node.items():
        owner = module_of(node)
        kind = _module_kind(modules.get(owner) if owner else None, node_type, exec_type)
        for table, key in ((by_module, (owner or node, kind)), (by_kind, kind), (by_op, f"{node_type} [{exec_type}]")):
            table[key][0] += us  # type: ignore[index]
            table[key][1] += count  # type: ignore[index]
    return Profile(
        batch_size=ins.batch_size(x), threads=int(recipe["properties"].get("INFERENCE_NUM_THREADS", 0) or 0),
        device=f"openvino:{recipe['device']}", reps=reps, latency_ms=latency_ms, profiled_ms=wall_ms / reps,
        op_fraction=min(1.0, op_ms / per_call) if per_call else 0.0,
        modules=sorted((row(n, k, us, c) for (n, k), (us, c) in by_module.items()), key=lambda r: -r.fraction)[:top],
        module_types=sorted((row(k, k, us, c) for k, (us, c) in by_kind.items() if us > 0), key=lambda r: -r.fraction),
        operators=sorted((row(n, "op", us, c) for n, (us, c) in by_op.items()), key=lambda r: -r.fraction)[:top],
    )
