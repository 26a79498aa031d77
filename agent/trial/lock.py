"""The host lock: local trial processes share the host's cores, so timing must not share them.

A trial timing its model while another one trains would charge the training's load (cores, caches,
memory bandwidth) to the timing. So timing takes a host lock exclusively, and trials take it shared around
each unit of heavy compute (a training step, an evaluation, a stage). A turnstile in front lets a waiting
timer in: compute waits at it while a timer holds it, so steps cannot starve the timer. Celery workers
run one trial per host slot and do not take it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from optagent.contract import cache_dir, file_lock


def lock_path() -> Path:
    return cache_dir() / "measure.lock"


@contextlib.contextmanager
def measure_exclusively(path: Path | None = None) -> Iterator[None]:
    """Hold the host's measure lock alone: no other trial computes or times meanwhile."""
    path = path or lock_path()
    with file_lock(path.with_suffix(".turnstile")), file_lock(path):
        yield


@contextlib.contextmanager
def computing(path: Path | None = None) -> Iterator[None]:
    """Hold the host's measure lock shared, for one unit of compute (waits while a trial times)."""
    path = path or lock_path()
    with file_lock(path.with_suffix(".turnstile"), shared=True):  # pass the turnstile: blocks while a timer waits
        pass
    with file_lock(path, shared=True):
        yield
