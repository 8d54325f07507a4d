"""User-facing errors and the exit codes every entry point shares.

A `UserError` is a problem the user can fix (a missing dataset, a bad config value, a run
that was never trained); its message names the file or field and the fix. Entry points
(`main`, `predict`, `data_prep.prepare`, `experiments.*`) catch `UserError`, print its
message on one line and exit with its `exit_code`, never with a traceback. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_PARTIAL = 1  # prep: some videos failed, the rest were written
EXIT_USER_ERROR = 2
EXIT_STOPPED = 3  # training stopped early on request; re-running resumes


class UserError(Exception):
    """A problem with the user's input or files; the message names the fix."""

    exit_code = EXIT_USER_ERROR
    prefix = "error"


class StopRequested(UserError):
    """Training stopped early on request (`config.debug.stop_after_epochs`)."""

    exit_code = EXIT_STOPPED
    prefix = "stopped"


def report(error: UserError, *, hint: str = "", stream=None) -> int:
    """Prints `error` (and an optional hint) to stderr; returns its exit code."""
    message = f"{error.prefix}: {error}" + (f"\n{hint}" if hint else "")
    print(message, file=stream or sys.stderr)
    return error.exit_code
