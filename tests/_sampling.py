"""Pick a random-sampler seed by what it draws, so a test that needs certain kinds of trials stays valid on
any machine: which modes a strategy offers depends on the hardware (bf16, say), and that changes what a fixed
seed draws."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from optagent import hardware
from optagent.registry import build_registry
from optagent.strategy import Objective, SpaceContext, suggest_all

Points = list[dict[str, dict[str, Any]]]


def seed_where(strategies: list[str], trials: int, wanted: Callable[[Points], bool], *, tries: int = 300) -> int:
    """The first seed whose `trials` points, sampled as `optagent search --sampler random` samples them on this
    machine (default objectives, a model with conv and linear layers), satisfy `wanted`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    registry = build_registry()
    ctx = SpaceContext(capabilities=hardware.detect("cpu"),
                       objectives=(Objective.parse("accuracy:max"), Objective.parse("latency_ms:min")))
    searched = [registry.strategy(name) for name in strategies]
    fixed = {n: s.off_params(ctx) for n, s in registry.strategies.items() if n not in strategies}
    for seed in range(tries):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        if wanted([suggest_all(study.ask(), searched, ctx, fixed) for _ in range(trials)]):
            return seed
    raise AssertionError(f"no seed below {tries} draws what the test needs from {', '.join(strategies)}")
