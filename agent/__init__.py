"""optagent: search compositions of model optimization strategies for a measured Pareto front.

The public API for model files and plugin authors. Heavy modules (torch, optuna, celery) are imported
lazily by the parts that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Constraint",
    "Data",
    "Metric",
    "Objective",
    "Param",
    "SpaceContext",
    "Stage",
    "Strategy",
    "TrialContext",
    "TrialFailed",
    "TrialPruned",
    "UserError",
    "__version__",
    "cached_weights",
    "categorical",
    "hookimpl",
    "integer",
    "real",
]

_LAZY = {
    "Data": "optagent.contract",
    "cached_weights": "optagent.contract",
    "Metric": "optagent.metrics",
    "Constraint": "optagent.strategy",
    "Objective": "optagent.strategy",
    "Param": "optagent.strategy",
    "SpaceContext": "optagent.strategy",
    "Stage": "optagent.strategy",
    "Strategy": "optagent.strategy",
    "TrialContext": "optagent.strategy",
    "categorical": "optagent.strategy",
    "integer": "optagent.strategy",
    "real": "optagent.strategy",
    "hookimpl": "optagent.hookspecs",
    "TrialFailed": "optagent.errors",
    "TrialPruned": "optagent.errors",
    "UserError": "optagent.errors",
}

if TYPE_CHECKING:
    from optagent.contract import Data, cached_weights
    from optagent.errors import TrialFailed, TrialPruned, UserError
    from optagent.hookspecs import hookimpl
    from optagent.metrics import Metric
    from optagent.strategy import (
        Constraint,
        Objective,
        Param,
        SpaceContext,
        Stage,
        Strategy,
        TrialContext,
        categorical,
        integer,
        real,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optagent' has no attribute {name!r}")
