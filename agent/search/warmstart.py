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


def _choices(space: SearchSpace, strategy: str, name: str, variant: str = "") -> list[Any]:
    assert space.ctx is not None
    for s in space.strategies:
        if s.name == strategy:
            for p in s.search_space(space.ctx):
                if p.name == name and p.variant == variant:
                    return list(getattr(p.distribution, "choices", ()))
    return []


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


def describe(space: SearchSpace) -> list[str]:
    """The design in words (for `optagent plugins` and the job's first progress line)."""
    lines = []
    if engines(space):
        lines.append(f"each engine alone: {', '.join(engines(space))}")
    if "quantization" in space.off():
        lines.append("then each precision alone on the fastest engine and on those within "
                     f"{1 - TIE:.0%} of it (of {', '.join(precisions(space, 'eager')) or 'none'} on eager PyTorch)")
    return lines


class WarmStart:
    """The design's trials in order; phase 2 is made once phase 1's results are known."""

    def __init__(self, space: SearchSpace, enabled: bool):
        self.space = space
        self.queue: list[Params] = engine_trials(space) if enabled else []
        self.phase = 1 if enabled else 3  # 1: engines alone, 2: precisions on the fastest, 3: done
        self.waiting: set[int] = set()  # phase-1 trials sent and not yet told
        self.speedups: dict[str, float] = {"eager": 1.0}  # the baseline is eager PyTorch in float

    def next(self) -> tuple[Params, int] | None:
        """The next design point and its phase, if one is ready (None: let the sampler choose)."""
        if self.phase == 1 and not self.queue and not self.waiting:
            self.queue, self.phase = [p for e in self.contenders() for p in precision_trials(self.space, e)], 2
        if self.queue:
            return self.queue.pop(0), self.phase
        if self.phase == 2:
            self.phase = 3
        return None

    def contenders(self) -> list[str]:
        """The engines phase 2 tries the precisions on: the fastest and those within TIE of it, fastest first."""
        ranked = sorted(self.speedups, key=lambda e: -self.speedups[e])
        return [e for e in ranked if self.speedups[e] >= TIE * self.speedups[ranked[0]]]

    def sent(self, number: int, phase: int) -> None:
        if phase == 1:
            self.waiting.add(number)

    def told(self, number: int, params: Params, speedup: float | None, feasible: bool | None) -> None:
        if number in self.waiting:
            self.waiting.discard(number)
            engine = (params.get("runtime") or {}).get("engine")
            if engine and feasible and speedup and speedup > max(self.speedups.get(engine, 0.0), 1.0):
                self.speedups[engine] = speedup
