"""The one exception type for user mistakes.

A :class:`UserError` is printed by the CLI as a single line (what is wrong, what
is allowed) with exit code 2, never as a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (config, command line, files) with a one-line message."""

    exit_code = 2


def one_of(kind: str, value: object, allowed, where: str = "") -> UserError:
    """``unknown {kind} 'x'{where}; allowed: a, b, c`` as a :class:`UserError`."""
    allowed = sorted(allowed)
    shown = ", ".join(map(str, allowed)) if allowed else "(none registered)"
    return UserError(f"unknown {kind} '{value}'{where}; allowed: {shown}")
