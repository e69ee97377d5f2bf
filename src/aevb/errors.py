"""Errors a user can cause.

Every problem that a user can fix (a bad option, a missing file, a corrupt
checkpoint, a diverging loss) is raised as :class:`UserError`.  The command
line prints its message on one line and exits with status 2, without a
traceback; Python callers can catch it like any other exception.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the cause and the fix."""

    exit_code = 2


class NoLikelihoodError(UserError, NotImplementedError):
    """Raised where a model defines no density (the deterministic autoencoder)."""


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name where it has none (for one-line messages)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
