"""Metrics measured on every trial's final model, registered by plugins (built-ins included)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from optagent.strategy import TrialContext


@dataclass(frozen=True)
class Metric:
    """A named figure computed on the final model of a trial.

    `compute(model, trial, batch)` gets the model as it will be served (possibly quantized or wrapped),
    the trial context, and one input batch at the trial's inference batch size.
    """

    name: str
    direction: str  # "maximize" | "minimize": the default when used as an objective
    unit: str
    description: str
    compute: Callable[[Any, TrialContext, torch.Tensor], float]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "direction": self.direction, "unit": self.unit,
                "description": self.description}
