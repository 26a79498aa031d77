"""A warm start: a small design of single-strategy trials before the sampler takes over.

A sampler's first trials are random, and in a conditional space with several runtimes and precisions a
random point often pairs a slow engine with a poor precision. A user's first question is simpler: what
does each runtime give alone, and each precision on the best of them? So the job first runs

1. each inference engine alone (everything else off, the engine at its default settings), then
2. each precision alone on the fastest of those engines (the one with the best feasible speedup; eager
   PyTorch if no engine beat it), once the engine trials have reported, and on every engine whose float
   speedup is within TIE of the fastest's, fastest first. An engine's float speed says little about its
   int8 speed: on the digits CNN at batch 64, ONNX Runtime, OpenVINO and torch.compile all run fp32 about
   1.75x faster than eager, while OpenVINO's int8 is 15x and ONNX Runtime's 4x; trying the precisions on
   the fastest engine alone would have missed the engine to pick.
3. the best of those points composed with structured pruning, at a quarter and at half of the channels
   (for a transformer: a quarter of the FFN channels, then the fewest heads with half of them), each with
   recovery fine-tuning at a middle setting of its space (the most epochs, Adam at the log-middle of its
   learning-rate range, cosine schedule, 10% warmup), once phase 2 has reported. Prune, fine-tune, then
   quantize and serve on the best engine is the composition a compression engineer tries first; a random
   sampler rarely draws it (it has to pair a pruning amount with a learning rate that recovers, and with
   the precision and engine that were best alone), and on the digits CNN at batch 64 it is what beats
   the best single precision.

The trials go to Optuna as enqueued trials, so the sampler learns from them like from its own.
`optagent plugins` shows the design; `--no-warm-start` turns it off.
"""

from __future__ import annotations

import copy
from typing import Any

from optagent.search.space import SearchSpace

Params = dict[str, dict[str, Any]]

# settings an engine runs with when it is tried alone (its other parameters are left to the sampler); a
# setting that is not active in a point (OpenVINO's NNCF knobs outside int8) is ignored there
ENGINE_DEFAULTS: dict[str, dict[str, Any]] = {"compile": {"compile_mode": "default"},
                                              "onnxruntime": {"ort_level": "all"},
                                              # NNCF's defaults, except the PERFORMANCE preset (the fastest
                                              # measured on MiniLM at the same fidelity) and f32 precision
                                              "openvino": {"ov_preset": "performance", "ov_smooth_quant": 0.95,
                                                           "ov_fast_bias_correction": True, "ov_precision": "f32"}}


# engines whose float speedup is at least this share of the fastest engine's get the precisions too
TIE = 0.8


# phase 3: channels (or FFN channels) removed by the two pruning points, the learning-rate warmup of recovery
PRUNE_AMOUNTS = (0.25, 0.5)
RECOVERY_WARMUP = 0.1


def _param(space: SearchSpace, strategy: str, name: str, variant: str = "") -> Any:
    assert space.ctx is not None
    for s in space.strategies:
        if s.name == strategy:
            for p in s.search_space(space.ctx):
                if p.name == name and p.variant == variant:
                    return p.distribution
    return None


def _choices(space: SearchSpace, strategy: str, name: str, variant: str = "") -> list[Any]:
    return list(getattr(_param(space, strategy, name, variant), "choices", ()))


def _on_grid(distribution: Any, value: float) -> float | None:
    """`value` snapped to a float distribution's step, or None when it is outside the range."""
    low, high, step = distribution.low, distribution.high, getattr(distribution, "step", None)
    if step:
        value = low + round((value - low) / step) * step
    value = round(value, 10)
    return value if low - 1e-9 <= value <= high + 1e-9 else None


def engines(space: SearchSpace) -> list[str]:
    """The engines tried alone in phase 1 (every searched engine but eager, which the baseline is)."""
    return [e for e in _choices(space, "runtime", "engine") if e != "eager"]


def precisions(space: SearchSpace, engine: str) -> list[str]:
    """The precision modes tried alone on `engine` in phase 2."""
    return [m for m in _choices(space, "quantization", "mode", "" if engine == "eager" else engine) if m != "none"]


def engine_trials(space: SearchSpace) -> list[Params]:
    off = space.off()
    out = []
    for engine in engines(space):
        params = copy.deepcopy(off)
        params["runtime"] = {"engine": engine, **ENGINE_DEFAULTS.get(engine, {})}
        out.append(params)
    return out


def precision_trials(space: SearchSpace, engine: str) -> list[Params]:
    off = space.off()
    if "quantization" not in off:
        return []
    out = []
    for mode in precisions(space, engine):
        params = copy.deepcopy(off)
        if "runtime" in off:
            params["runtime"] = {"engine": engine, **ENGINE_DEFAULTS.get(engine, {})}
        params["quantization"] = {"mode": mode}
        if "mixed_precision" in off:  # the precision alone: every layer at it, none kept float
            params["mixed_precision"] = {"keep_float": 0}
        out.append(params)
    return out


def pruning_points(space: SearchSpace) -> list[dict[str, Any]]:
    """Phase 3's pruning params: structured at PRUNE_AMOUNTS (a transformer: FFN channels, then heads too)."""
    if "structured" not in _choices(space, "pruning", "method"):
        return []
    heads = _choices(space, "pruning", "heads")
    if heads:  # a transformer with removable heads: FFN channels alone, then the fewest heads and more FFN
        alone, ffn = _param(space, "pruning", "ffn", "alone"), _param(space, "pruning", "ffn")
        points = [{"method": "structured", "heads": 0.0, "ffn": _on_grid(alone, PRUNE_AMOUNTS[0])}]
        if len(heads) > 1:
            points.append({"method": "structured", "heads": heads[1], "ffn": _on_grid(ffn, PRUNE_AMOUNTS[1])})
        return [p for p in points if p["ffn"] is not None]
    name = "ffn" if _param(space, "pruning", "ffn") is not None else "amount"
    distribution = _param(space, "pruning", name)
    if distribution is None:
        return []
    return [{"method": "structured", name: v} for v in (_on_grid(distribution, a) for a in PRUNE_AMOUNTS)
            if v is not None]


def recovery_point(space: SearchSpace) -> dict[str, Any]:
    """Phase 3's fine-tuning params: a middle setting of the fine-tuning space ({} when it is not searched)."""
    epochs = _param(space, "finetune", "epochs")
    if epochs is None:
        return {}
    point: dict[str, Any] = {"epochs": epochs.high}
    if "adam" in _choices(space, "finetune", "optimizer"):
        lr = _param(space, "finetune", "adam_lr")
        point.update(optimizer="adam", adam_lr=float(f"{(lr.low * lr.high) ** 0.5:.3g}"))
    schedules = _choices(space, "finetune", "schedule")
    if "cosine" in schedules:
        point["schedule"] = "cosine"
        warmup = _param(space, "finetune", "warmup")
        if warmup is not None and (value := _on_grid(warmup, RECOVERY_WARMUP)) is not None:
            point["warmup"] = value
    return point


def composed_trials(space: SearchSpace, best: Params) -> list[Params]:
    """Phase 3: the best design point with each pruning point and recovery fine-tuning."""
    if "pruning" not in space.off():
        return []
    recovery = recovery_point(space)
    out = []
    for pruning in pruning_points(space):
        params = copy.deepcopy(best)
        params["pruning"] = pruning
        if recovery:
            params["finetune"] = dict(recovery)
        out.append(params)
    return out


def describe(space: SearchSpace) -> list[str]:
    """The design in words (for `optagent plugins` and the job's first progress line)."""
    lines = []
    if engines(space):
        lines.append(f"each engine alone: {', '.join(engines(space))}")
    if "quantization" in space.off():
        lines.append("then each precision alone on the fastest engine and on those within "
                     f"{1 - TIE:.0%} of it (of {', '.join(precisions(space, 'eager')) or 'none'} on eager PyTorch)")
    points = pruning_points(space)
    if points:
        lines.append("then the best of those with structured pruning (" + ", ".join(_short(p) for p in points) + ")"
                     + (" and recovery fine-tuning" if recovery_point(space) else ""))
    return lines


def _short(point: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items() if k != "method")


class WarmStart:
    """The design's trials in order; phase 2 is made once phase 1's results are known, phase 3 once phase 2's."""

    def __init__(self, space: SearchSpace, enabled: bool):
        self.space = space
        self.queue: list[Params] = engine_trials(space) if enabled else []
        self.phase = 1 if enabled else 4  # 1: engines alone, 2: precisions, 3: composed with pruning, 4: done
        self.waiting: set[int] = set()  # design trials of the current phase sent and not yet told
        self.speedups: dict[str, float] = {"eager": 1.0}  # the baseline is eager PyTorch in float
        self.best: tuple[float, Params | None] = (1.0, None)  # the fastest feasible design point (None: eager)

    def next(self) -> tuple[Params, int] | None:
        """The next design point and its phase, if one is ready (None: let the sampler choose)."""
        if not self.queue and not self.waiting:
            if self.phase == 1:
                self.queue, self.phase = [p for e in self.contenders() for p in precision_trials(self.space, e)], 2
            elif self.phase == 2:
                self.queue, self.phase = composed_trials(self.space, self.best[1] or self.space.off()), 3
            elif self.phase == 3:
                self.phase = 4
        if self.queue:
            return self.queue.pop(0), self.phase
        return None

    def contenders(self) -> list[str]:
        """The engines phase 2 tries the precisions on: the fastest and those within TIE of it, fastest first."""
        ranked = sorted(self.speedups, key=lambda e: -self.speedups[e])
        return [e for e in ranked if self.speedups[e] >= TIE * self.speedups[ranked[0]]]

    def sent(self, number: int, phase: int) -> None:
        if phase in (1, 2):  # phase 3 waits for nothing
            self.waiting.add(number)

    def told(self, number: int, params: Params, speedup: float | None, feasible: bool | None) -> None:
        if number not in self.waiting:
            return
        self.waiting.discard(number)
        if not (feasible and speedup):
            return
        engine = (params.get("runtime") or {}).get("engine")
        if engine and speedup > max(self.speedups.get(engine, 0.0), 1.0):
            self.speedups[engine] = speedup
        if speedup > self.best[0]:
            self.best = (speedup, copy.deepcopy(params))
