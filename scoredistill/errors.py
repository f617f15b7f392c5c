"""The exception types the command line turns into one line: user mistakes and interruptions.

A :class:`UserError` is printed by the CLI as a single line (what is wrong, what
is allowed) with exit code 2, never as a traceback; a :class:`RunInterrupted` as one
line saying how to continue, with exit code 128 + the signal's number.
"""

import signal
from pathlib import Path
from typing import Optional


class UserError(Exception):
    """A mistake in the user's input (config, command line, files) with a one-line message."""

    exit_code = 2


def one_of(kind: str, value: object, allowed, where: str = "") -> UserError:
    """``unknown {kind} 'x'{where}; allowed: a, b, c`` as a :class:`UserError`."""
    allowed = sorted(allowed)
    shown = ", ".join(map(str, allowed)) if allowed else "(none registered)"
    return UserError(f"unknown {kind} '{value}'{where}; allowed: {shown}")


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run. In ``phase`` "training" a checkpoint was saved first; "building" (before
    training) and "finishing" (evaluation and report) have nothing to save. ``checkpoint``: the newest, or None."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path], phase: str = "training") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.checkpoint, self.phase = signum, step, checkpoint, phase

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
