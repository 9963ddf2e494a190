"""Errors every layer may raise; the command line turns them into exit codes (torch-free)."""
from __future__ import annotations

__all__ = ["UsageError", "one_line", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A bad argument, an unreadable input or a failed model check: one line, exit code 2.

    Raise it with a message that names the argument or file and the fix, before any slow work.
    """


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__
