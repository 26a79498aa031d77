"""Metrics measured on every trial's final model, registered by plugins (built-ins included)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optagent.strategy import TrialContext


# The measurements every trial takes, the figures built-in strategies leave in `trial.extra_metrics`, and
# the figures the coordinator and the confirmation add: no model file metric and no plugin metric may take
# these names (they would overwrite the measurement). The registry skips a plugin metric named so, with a
# warning; `optagent check` refuses a model file whose evaluate() returns one.
RESERVED = frozenset({
    "latency_ms", "latency_p90_ms", "latency_p99_ms", "latency_spread", "latency_per_sample_ms", "throughput",
    "baseline_latency_ms", "baseline_latency_spread", "speedup", "speedup_low", "speedup_high", "batch_size",
    "latency_measured_ms", "latency_reference_ms", "baseline_drift", "confirmed_speedup", "confirmed_speedup_low",
    "confirmed_speedup_high", "confirmed_speedup_ci_low", "confirmed_speedup_ci_high", "confirmed_speedup_runs",
    "confirmed_processes", "confirmed_noise", "confirmed_phase_noise", "confirmed_latency_ms", "tie_group",
    "compile_time_s", "export_time_s", "quantize_time_s", "runtime_max_abs_diff", "tokens_per_s", "generate_speedup"})


# Metric.direction: the two values, and the short spellings `--objective NAME:max|min` uses.
DIRECTIONS = {"maximize": "maximize", "minimize": "minimize", "max": "maximize", "min": "minimize"}


@dataclass(frozen=True)
class Metric:
    """A named figure computed on the final model of a trial.

    `compute(model, trial, batch)` gets the model as it will be served (possibly quantized or wrapped),
    the trial context, and one input batch at the trial's inference batch size, on `trial.device` and in
    the model file's form (a tensor, a tuple or a dict of tensors: call the model with
    `optagent.inputs.call(model, batch)`). It returns a float (NaN when the figure does not apply).

    `direction` is "maximize" or "minimize" ("max" and "min" are accepted and stored as the long form);
    anything else is a ValueError here, so a plugin that constructs such a metric is skipped with a warning
    naming it. The name must not be one of `RESERVED`, the model file's metrics or another plugin's.
    """

    name: str
    direction: str  # "maximize" | "minimize": the default when used as an objective
    unit: str
    description: str
    compute: Callable[[Any, TrialContext, Any], float]

    def __post_init__(self) -> None:
        way = DIRECTIONS.get(self.direction.strip().lower()) if isinstance(self.direction, str) else None
        if way is None:
            raise ValueError(f"metric {self.name!r}: direction {self.direction!r} is not 'maximize' or 'minimize' "
                             "(or 'max' / 'min')")
        object.__setattr__(self, "direction", way)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "direction": self.direction, "unit": self.unit,
                "description": self.description}
