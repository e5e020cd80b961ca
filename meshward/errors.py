"""Errors the CLI turns into a one-line message and exit code 1 (never a traceback)."""


class UserError(Exception):
    """Something the operator can fix: bad input, a missing file, an absent binary.

    The message is shown as-is on one line, so it must say what is wrong and how to fix it.
    """
