"""Errors a user can act on. The CLI prints them as one line (no traceback unless --debug) and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""

    exit_code = 2


class TrialFailed(Exception):
    """A trial could not produce a result; the message is stored as the trial's failure reason."""
