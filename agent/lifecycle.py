"""The lifecycle hooks (job and trial started/finished) never stop a job: a wrapper turns a plugin's
exception into a warning naming the plugin's module. The registry registers it first in every manager."""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

from optagent import hookspecs

log = logging.getLogger(__name__)
GUARD_NAME = "optagent.registry.guard"


def _culprit(exc: BaseException, hook_name: str) -> str:
    """The module of the innermost hook implementation in the traceback (the plugin that raised)."""
    tb, found = exc.__traceback__, "a plugin"
    while tb is not None:
        if tb.tb_frame.f_code.co_name == hook_name:
            found = repr(tb.tb_frame.f_globals.get("__name__", "a plugin"))
        tb = tb.tb_next
    return found


class LifecycleGuard:
    """Wraps the lifecycle hooks so a failing experiment-tracker plugin is logged, never fatal to a job.

    pluggy stops calling the remaining implementations of a hook once one raises; the guard turns that
    exception into a warning so the coordinator carries on.
    """

    @staticmethod
    def _guard(hook_name: str) -> Generator[None, Any, Any]:
        try:
            return (yield)
        except Exception as exc:
            log.warning("plugin %s failed in %s: %s: %s (ignored)", _culprit(exc, hook_name), hook_name,
                        type(exc).__name__, exc)
            return []

    @hookspecs.hookimpl(wrapper=True)
    def optagent_job_started(self, job: dict[str, Any]) -> Generator[None, Any, Any]:
        return (yield from self._guard("optagent_job_started"))

    @hookspecs.hookimpl(wrapper=True)
    def optagent_trial_started(self, job: dict[str, Any], trial: dict[str, Any]) -> Generator[None, Any, Any]:
        return (yield from self._guard("optagent_trial_started"))

    @hookspecs.hookimpl(wrapper=True)
    def optagent_trial_finished(self, job: dict[str, Any], trial: dict[str, Any]) -> Generator[None, Any, Any]:
        return (yield from self._guard("optagent_trial_finished"))

    @hookspecs.hookimpl(wrapper=True)
    def optagent_job_finished(self, job: dict[str, Any], pareto: list[dict[str, Any]]) -> Generator[None, Any, Any]:
        return (yield from self._guard("optagent_job_finished"))
