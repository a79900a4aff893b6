"""The base class of errors that the user fixes (a config value, an input file, a busy run).

Why a common base: the command line prints such an error as one line, ``megaclass: <message>``,
and exits with status 2; a Python traceback would only bury the message, which already names
the file or config key to change. Every other exception is a bug or an environment failure and
keeps its traceback. ``--debug`` (or ``MEGACLASS_DEBUG=1``) shows the traceback of user errors
too (docs/reliability.md, "Errors").

Each package keeps its own error classes beside the code that raises them and adds
:class:`UserError` to their bases (``class ShardSpecError(UserError, ValueError)``), so code
that catches the builtin base keeps working. Lowest floor: every package may import it.
"""

from __future__ import annotations

import os

DEBUG_ENV = "MEGACLASS_DEBUG"
"""Environment variable: ``1`` prints the traceback of user errors as well."""


class UserError(Exception):
    """An error in what the user gave (config, input files, run directory state).

    The message is complete on its own: it names the file, config key or process concerned
    and what to do.
    """


class InputError(UserError, ValueError):
    """A stage cannot use its input as configured (too few points for ``cluster.k``, …)."""


class MissingInputError(UserError, FileNotFoundError):
    """A stage's input is not there (no centroids before assign, no shards in a folder)."""


def debug_from_env() -> bool:
    """Whether ``MEGACLASS_DEBUG`` asks for tracebacks of user errors."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def user_error_of(exc: BaseException) -> UserError | None:
    """The :class:`UserError` that ``exc`` is or wraps, else None.

    Why unwrap: an error raised inside a Ray task reaches the driver as a ``RayTaskError``
    that also subclasses the original class, but whose text is the remote traceback; its
    ``cause`` holds the original error with the plain message.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, UserError):
        return cause
    if isinstance(exc, UserError):
        return exc
    return None
