"""Errors a user can act on. The CLI prints them as one line (no traceback unless --debug) and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""

    exit_code = 2


class TrialFailed(Exception):
    """A trial could not produce a result; the message is stored as the trial's failure reason."""


class TrialPruned(TrialFailed):
    """A trial stopped early because it cannot meet the constraint (recorded as `pruned`, not failed).

    `intermediate` holds the constraint metric by step as reported so far.
    """

    def __init__(self, reason: str, intermediate: dict[int, float] | None = None):
        super().__init__(reason)
        self.intermediate = dict(intermediate or {})


def describe(exc: BaseException) -> str:
    """One line for a failure reason: the exception and the file and line that raised it."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"
