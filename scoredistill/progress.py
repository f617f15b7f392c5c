"""Progress on stderr, results on stdout: a bar on a terminal, plain lines in a log file.

:func:`progress` is what every long step (training, ODE pairs, the digits teacher) shows its
progress with. On a terminal it is a rich bar whose columns keep, at 80 columns, the step,
the total and the time left: the free-text fields (losses, speed) come last and are cut
first. When stderr is not a terminal (``> log.txt 2>&1``, a batch system), it writes plain
lines instead, at most one every ``interval`` seconds (time-based, on an injectable clock)
and one when a task ends, so that a log shows the run moving and never holds a bar's frames.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

#: seconds between two plain progress lines
PLAIN_INTERVAL = 10.0


def progress(enabled: bool = True, *fields: str, transient: bool = False, stream: Optional[TextIO] = None,
             clock: Callable[[], float] = time.monotonic, interval: float = PLAIN_INTERVAL) -> Any:
    """A progress display on ``stream`` (stderr): a rich bar on a terminal, :class:`PlainProgress` otherwise.

    ``fields`` name the free-text fields each task carries (``bar.update(task, losses="...")``), shown after the
    step, the total and the times, in that order. Both kinds are context managers with rich's ``add_task``,
    ``advance`` and ``update``."""
    stream = stream if stream is not None else sys.stderr
    if enabled and not _is_terminal(stream):
        return PlainProgress(stream, fields, clock=clock, interval=interval)
    return rich_progress(Console(file=stream), fields, transient=transient, disable=not enabled)


def rich_progress(console: Console, fields: tuple[str, ...] = (), transient: bool = False, disable: bool = False) -> Progress:
    """The bar: what must stay visible first (description, step/total, time left, elapsed, a short bar), then the
    fields, cut (with an ellipsis) to what is left of the console's width."""
    return Progress(TextColumn("[bold]{task.description}"), MofNCompleteColumn(), TimeRemainingColumn(), TimeElapsedColumn(),
                    BarColumn(bar_width=BAR_WIDTH), _FieldsColumn(console, fields),
                    console=console, transient=transient, disable=disable, expand=False)


BAR_WIDTH = 12


class _FieldsColumn(ProgressColumn):
    """The free-text fields of a task, cut to the width the other columns leave."""

    def __init__(self, console: Console, fields: tuple[str, ...]) -> None:
        super().__init__()
        self.console, self.fields = console, fields

    def render(self, task: Task) -> Text:
        text = "  ".join(str(task.fields.get(name, "")) for name in self.fields if str(task.fields.get(name, "")).strip())
        total = f"{task.total:g}" if task.total is not None else "?"
        # description, "done/total", two clocks, the bar, and the padding between the six columns
        used = len(task.description) + 2 * len(total) + 1 + 2 * len("0:00:00") + BAR_WIDTH + 5
        room = max(self.console.width - used - 1, 0)
        return Text(text if len(text) <= room else text[: max(room - 1, 0)] + "…" if room else "", no_wrap=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass
class _Task:
    description: str
    total: Optional[float]
    completed: float
    fields: dict[str, Any]
    start: float
    start_completed: float
    last_line: float
    done: bool = False
    extra: dict = field(default_factory=dict)


class PlainProgress:
    """Progress as plain lines (``dmd: 120/1000 (12%), 0:00:40 elapsed, 0:04:53 left, loss=0.3``) on a stream that
    is not a terminal: at most one line per task every ``interval`` seconds of ``clock``, and one when it ends."""

    def __init__(self, stream: TextIO, fields: tuple[str, ...] = (), clock: Callable[[], float] = time.monotonic,
                 interval: float = PLAIN_INTERVAL) -> None:
        self.stream, self.fields, self.clock, self.interval = stream, tuple(fields), clock, interval
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        for task_id, task in self.tasks.items():
            if not task.done and task.completed > task.start_completed:
                self._line(task)  # where it stopped (an interruption, an error)
                task.done = True

    def add_task(self, description: str, total: Optional[float] = None, completed: float = 0, **fields: Any) -> int:
        now = self.clock()
        task_id = len(self.tasks)
        self.tasks[task_id] = _Task(description, total, completed, dict(fields), now, completed, last_line=now)
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        task = self.tasks[task_id]
        self.update(task_id, completed=task.completed + advance)

    def update(self, task_id: int, *, completed: Optional[float] = None, advance: Optional[float] = None,
               total: Optional[float] = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if advance is not None:
            task.completed += advance
        if completed is not None:
            task.completed = completed
        task.fields.update(fields)
        now = self.clock()
        finished = task.total is not None and task.completed >= task.total
        if finished and not task.done:
            task.done = True
            self._line(task, now)
        elif not finished and now - task.last_line >= self.interval:
            self._line(task, now)

    def _line(self, task: _Task, now: Optional[float] = None) -> None:
        now = self.clock() if now is None else now
        task.last_line = now
        elapsed = now - task.start
        parts = [f"{task.completed:g}/{task.total:g} ({100 * task.completed / task.total:.0f}%)" if task.total else f"{task.completed:g}",
                 f"{_clock(elapsed)} elapsed"]
        done_here = task.completed - task.start_completed
        if task.total and done_here > 0 and task.completed < task.total:
            parts.append(f"{_clock(elapsed / done_here * (task.total - task.completed))} left")
        parts += [str(task.fields[name]) for name in self.fields if str(task.fields.get(name, "")).strip()]
        self.stream.write(f"{task.description}: " + ", ".join(parts) + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
