"""What plugin authors and optagent's own tests use to check their code.

- `StrategyConformance` / `MetricConformance`: the conformance suites (subclass, override one fixture);
- `make_trial`, `apply_strategy`, `default_model_file`, `space_context`, `load_model_file`: a real
  TrialContext and one strategy applied as the pipeline applies it, for a plugin's own unit tests;
- `FakeExecutor`, `fake_answer`: the coordinator's loop in-process, with no model and no worker.

pytest is needed for the conformance suites, as for any test suite; the helpers do not need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optagent.testing.conformance import MetricConformance, StrategyConformance
    from optagent.testing.fake import FakeExecutor, fake_answer
    from optagent.testing.helpers import (
        DEFAULT_MODEL_SOURCE,
        apply_strategy,
        default_model_file,
        load_model_file,
        make_trial,
        space_context,
    )

__all__ = ["DEFAULT_MODEL_SOURCE", "FakeExecutor", "MetricConformance", "StrategyConformance", "apply_strategy",
           "default_model_file", "fake_answer", "load_model_file", "make_trial", "space_context"]

_LAZY = {"MetricConformance": "optagent.testing.conformance", "StrategyConformance": "optagent.testing.conformance",
         "FakeExecutor": "optagent.testing.fake", "fake_answer": "optagent.testing.fake",
         **{name: "optagent.testing.helpers" for name in ("DEFAULT_MODEL_SOURCE", "apply_strategy",
                                                          "default_model_file", "load_model_file", "make_trial",
                                                          "space_context")}}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optagent.testing' has no attribute {name!r}")
