"""The one user-facing exception type of ditmerge."""

from __future__ import annotations


class DitmergeError(Exception):
    """A user error: bad input, an unsupported model, a broken plan.

    The CLIs print its message without a traceback and exit 1. Bugs raise anything else and keep
    their traceback. Messages say what was asked and what is possible.
    """
