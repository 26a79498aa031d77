"""Where inference time goes: a per-module and per-operator breakdown, and the strategies that address it.

`profile_model` runs the model under `torch.profiler` (record_shapes) for a few calls. Every module is
wrapped in a `record_function("module::<name>")` range by forward hooks. A module's share is the self CPU
time of the operators it runs itself (not those of its submodules, so nothing is counted twice); an
operator's share is its self CPU time. Shares are fractions of one *unprofiled* call (median wall time):
the profiler's own per-op cost inflates wall time, not op self time. What no operator accounts for is
Python and dispatch overhead, which dominates small models at small batches. `advise` turns the shares
into advice (which installed strategies attack the bottleneck). Used by `optagent profile`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

MODULE_PREFIX = "module::"


@dataclass
class Row:
    """One line of a breakdown: a module, a module type or an operator."""

    name: str
    kind: str  # module type ("Conv2d", "Conv2d[int8]") or "op"
    fraction: float  # share of one unprofiled call's wall time
    ms_per_call: float
    calls: float  # occurrences per forward call
    shapes: str = ""


@dataclass
class Profile:
    batch_size: int
    threads: int
    device: str
    reps: int
    latency_ms: float  # median of unprofiled calls
    profiled_ms: float  # wall time per call under the profiler (profiler overhead included)
    op_fraction: float  # share of profiled time inside operators (the rest: Python / dispatch)
    modules: list[Row] = field(default_factory=list)
    module_types: list[Row] = field(default_factory=list)
    operators: list[Row] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    @property
    def overhead_fraction(self) -> float:
        return max(0.0, 1.0 - self.op_fraction)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["overhead_fraction"] = self.overhead_fraction
        return data


def _kind(module: Any) -> str:
    """The module's type name, tagged [int8] for quantized modules (whose kernels differ)."""
    name = type(module).__name__
    path = type(module).__module__
    return f"{name}[int8]" if ".quantized" in path or name.startswith("Quantized") else name


def _module_ranges(model: Any) -> Callable[[], None]:
    """Wrap each module's forward in a profiler range; returns the function that removes the hooks."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return lambda: None
    handles = []
    for name, module in model.named_modules():
        label = f"{MODULE_PREFIX}{name or type(module).__name__}|{_kind(module)}"

        def pre(mod: Any, args: Any, label: str = label) -> None:
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            mod.__dict__.setdefault("_optagent_ranges", []).append(rf)

        def post(mod: Any, args: Any, output: Any) -> None:
            stack = mod.__dict__.get("_optagent_ranges")
            if stack:
                stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    def remove() -> None:
        for handle in handles:
            handle.remove()
        for module in model.modules():
            module.__dict__.pop("_optagent_ranges", None)
    return remove


def _module_self_us(evt: Any) -> float:
    """Self CPU time of the operators run directly by a module (not inside a nested module's range)."""
    total, stack = 0.0, list(evt.cpu_children)
    while stack:
        child = stack.pop()
        if child.name.startswith(MODULE_PREFIX):
            continue
        total += child.self_cpu_time_total
        stack.extend(child.cpu_children)
    return total


def _shape_text(shapes: Any) -> str:
    return ", ".join("x".join(map(str, s)) for s in (shapes or []) if s)


def profile_model(model: Any, batch: Any, *, threads: int, device: Any = None, reps: int = 10,
                  warmup: int = 5, top: int = 15) -> Profile:
    """Profile `reps` calls of `model(batch)` after `warmup` calls; see the module docstring.

    A served model that runs outside torch (an OpenVINO compiled model) is opaque to torch.profiler; if it
    has `optagent_profile(batch, threads=, reps=, warmup=, top=)`, its own per-layer counters answer instead.
    """
    hook = getattr(model, "optagent_profile", None)
    if callable(hook):
        result: Profile = hook(batch, threads=threads, reps=reps, warmup=warmup, top=top)
        return result
    import os
    import statistics

    from optagent.inputs import batch_size, call

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto prints profiler_start/stop lines to stderr otherwise
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    device = device or torch.device("cpu")
    cuda = getattr(device, "type", "cpu") == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for _ in range(warmup):
            call(model, batch)
        sync()
        plain = []
        for _ in range(max(reps, 5)):
            t0 = time.perf_counter()
            call(model, batch)
            sync()
            plain.append((time.perf_counter() - t0) * 1e3)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        remove = _module_ranges(model)
        try:
            with profile(activities=activities, record_shapes=True) as prof:
                t0 = time.perf_counter()
                for _ in range(reps):
                    call(model, batch)
                sync()
                wall_ms = (time.perf_counter() - t0) * 1e3
        finally:
            remove()

    latency_ms = statistics.median(plain)
    op_total_ms = sum(evt.self_cpu_time_total for evt in prof.events()
                      if not evt.name.startswith(MODULE_PREFIX) and not getattr(evt, "is_user_annotation", False))
    op_total_ms /= 1e3 * reps
    # Shares are of one unprofiled call: the profiler's own per-op cost inflates wall time, not op self time.
    per_call = max(latency_ms, op_total_ms)
    modules: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # label -> [time us, count]
    ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    op_shapes: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for evt in prof.events():
        if evt.name.startswith(MODULE_PREFIX):
            modules[evt.name][0] += _module_self_us(evt)
            modules[evt.name][1] += 1
        elif not getattr(evt, "is_user_annotation", False):
            ops[evt.name][0] += evt.self_cpu_time_total
            ops[evt.name][1] += 1
            op_shapes[evt.name][_shape_text(evt.input_shapes)] += evt.self_cpu_time_total

    def row(name: str, kind: str, us: float, count: float, shapes: str = "") -> Row:
        ms = us / 1e3 / reps
        return Row(name, kind, ms / per_call if per_call else 0.0, ms, count / reps, shapes)

    module_rows: list[Row] = []
    by_type: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for label, (us, count) in modules.items():
        name, _, kind = label[len(MODULE_PREFIX):].partition("|")
        module_rows.append(row(name, kind, us, count))
        by_type[kind][0] += us
        by_type[kind][1] += count
    op_rows = [row(name, "op", us, count, max(op_shapes[name].items(), key=lambda kv: kv[1])[0])
               for name, (us, count) in ops.items()]
    result = Profile(
        batch_size=batch_size(batch), threads=threads,
        device=str(device), reps=reps, latency_ms=latency_ms, profiled_ms=wall_ms / reps,
        op_fraction=min(1.0, op_total_ms / per_call) if per_call else 0.0,
        modules=sorted(module_rows, key=lambda r: -r.fraction)[:top],
        module_types=sorted((row(k, k, us, c) for k, (us, c) in by_type.items() if us > 0),
                            key=lambda r: -r.fraction),
        operators=sorted(op_rows, key=lambda r: -r.fraction)[:top],
    )
    return result


# -- advice ------------------------------------------------------------------------------------------------
CONV = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d")
LINEAR = ("Linear", "Bilinear", "LazyLinear")
ATTENTION = ("MultiheadAttention",)
MEMORY_BOUND = ("BatchNorm1d", "BatchNorm2d", "LayerNorm", "GroupNorm", "ReLU", "GELU", "SiLU", "MaxPool2d",
                "AvgPool2d", "AdaptiveAvgPool2d", "Dropout", "Softmax", "Hardswish", "Sigmoid", "Tanh")


def advise(p: Profile, strategies: set[str] | None = None, bf16: bool = False, threshold: float = 0.3) -> list[str]:
    """Plain sentences: which bottleneck, and which strategies (installed ones named) address it."""
    have = strategies if strategies is not None else {"pruning", "quantization", "batch_size"}

    def share(kinds: tuple[str, ...], int8: bool = False) -> float:
        tag = "[int8]" if int8 else ""
        return sum(r.fraction for r in p.module_types if r.kind in {k + tag for k in kinds})

    def named(*pairs: tuple[str, str]) -> str:
        offered = [text for strategy, text in pairs if strategy in have]
        return " and ".join(offered) if offered else "no installed strategy (install one that does)"

    half = "bf16 (this CPU has native bf16)" if bf16 else ""
    advice = []
    conv, linear, attn = share(CONV), share(LINEAR), share(ATTENTION)
    if conv >= threshold:
        ways = named(("pruning", "structured pruning (fewer channels)"), ("quantization", "static int8"))
        advice.append(f"Conv layers take {conv:.0%} of the time: {ways} apply"
                      + (f"; so does {half}" if half and "quantization" in have else "") + ".")
    if linear >= threshold:
        ways = named(("quantization", "dynamic int8 quantization"), ("pruning", "structured pruning of neurons"))
        advice.append(f"Linear layers take {linear:.0%} of the time: {ways} apply"
                      + (f"; so does {half}" if half and "quantization" in have else "") + ".")
    if attn >= threshold:
        advice.append(f"Attention takes {attn:.0%} of the time: bf16/fp16 and dynamic int8 of its projections "
                      "apply.")
    int8 = share(CONV, True) + share(LINEAR, True)
    if int8 >= threshold:
        advice.append(f"int8 layers already take {int8:.0%}: further gains come from structured pruning "
                      "(smaller layers) rather than more quantization.")
    memory = share(MEMORY_BOUND)
    if memory >= 0.2:
        advice.append(f"Memory-bound layers (norm, activation, pooling) take {memory:.0%}: fusing them into the "
                      "preceding conv/linear (static int8 fuses conv-bn-relu; torch.compile fuses elementwise "
                      "ops) and structured pruning (smaller activations) apply.")
    if p.overhead_fraction >= threshold:
        advice.append(f"Python/dispatch overhead is {p.overhead_fraction:.0%} of the time at batch {p.batch_size} "
                      "(many tiny ops): a larger serving batch (batch_size strategy with a throughput objective), "
                      "torch.compile or ONNX Runtime apply; pruning or int8 will change little.")
    if not advice:
        top = p.module_types[0] if p.module_types else None
        advice.append("No single bottleneck: time is spread out" + (
            f" (largest: {top.kind} {top.fraction:.0%})" if top else "") + "; measure strategies end to end.")
    return advice
