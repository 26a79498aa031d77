"""What plugin authors and optagent's own tests use to check their code.

- `StrategyConformance` / `MetricConformance`: the conformance suites (subclass, override one fixture);
- `FakeExecutor`, `fake_answer`: the coordinator's loop in-process, with no model and no worker.

pytest is needed for the conformance suites, as for any test suite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optagent.testing.conformance import DEFAULT_MODEL_SOURCE, MetricConformance, StrategyConformance
    from optagent.testing.fake import FakeExecutor, fake_answer

__all__ = ["DEFAULT_MODEL_SOURCE", "FakeExecutor", "MetricConformance", "StrategyConformance", "fake_answer"]

_LAZY = {"DEFAULT_MODEL_SOURCE": "optagent.testing.conformance", "MetricConformance": "optagent.testing.conformance",
         "StrategyConformance": "optagent.testing.conformance", "FakeExecutor": "optagent.testing.fake",
         "fake_answer": "optagent.testing.fake"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optagent.testing' has no attribute {name!r}")
