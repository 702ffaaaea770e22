"""Progress of kd's long phases, on a terminal and in a log.

On a terminal a phase shows rich's bar. Elsewhere (a CI log, nohup, a pipe) rich draws nothing until
the phase ends, so a fine-tune of many minutes looked hung: there ``phase_progress`` prints a plain line
when a task starts, every ``LOG_EVERY`` seconds while it runs and when it ends, with the count, the
rate and the time left.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

LOG_EVERY = 15.0  # seconds between a phase's lines in a log


def phase_progress(console: Console, status: bool = False) -> Progress:
    """The bars of a phase (with a ``status`` field after each when asked): rich's on a terminal, a
    line every ``LOG_EVERY`` seconds elsewhere. Used like rich's Progress: start, add_task,
    advance/update, stop."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    if console.is_terminal:
        return Progress(*columns, console=console)
    return _LoggedProgress(*columns, console=console)


class _LoggedProgress(Progress):
    """rich's Progress without its live display: its tasks are printed as lines instead."""

    def __init__(self, *columns: Any, console: Console) -> None:
        super().__init__(*columns, console=console, auto_refresh=False)
        self._every = LOG_EVERY  # read when made: a test may change it
        self._printed: dict[TaskID, float] = {}

    def start(self) -> None:
        pass  # no live display to start

    def stop(self) -> None:
        for task in self.tasks:
            if not task.finished:
                self._print(task.id)

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        self._print(task_id)
        return task_id

    def update(self, task_id: TaskID, **changes: Any) -> None:
        super().update(task_id, **changes)
        self._print_when_due(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._print_when_due(task_id)

    def _print_when_due(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if task.finished or time.monotonic() - self._printed.get(task_id, 0.0) >= self._every:
            self._print(task_id)

    def _print(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if task.finished and self._printed.get(task_id) == float("inf"):
            return  # its last line is out
        done = f"{task.completed:,.0f}/{task.total:,.0f}" if task.total else f"{task.completed:,.0f}"
        parts = [done]
        if task.speed:
            parts.append(f"{task.speed:.1f}/s")
        if task.time_remaining is not None and not task.finished:
            minutes, seconds = divmod(round(task.time_remaining), 60)
            parts.append(f"{minutes}:{seconds:02d} left")
        status = task.fields.get("status")
        self.console.print(escape(f"{task.description}: {', '.join(parts)}" + (f"  {status}" if status else "")),
                           highlight=False, soft_wrap=True)  # a log line is not cut at 80 columns
        self._printed[task_id] = float("inf") if task.finished else time.monotonic()


class Steps:
    """The step a phase without a known total is on (`kd prepare` reading a source of unknown length):
    rich's spinner on a terminal; elsewhere a line when a step starts and, while rows are counted, one
    every ``LOG_EVERY`` seconds with the rows so far and the rate. Call it with the step's name; call
    ``rows`` with the rows done in the step so far."""

    def __init__(self, console: Console, status: Any | None) -> None:
        self._console, self._status = console, status
        self._step, self._started, self._printed = "", time.monotonic(), 0.0
        self._every = LOG_EVERY

    def __call__(self, step: str) -> None:
        self._step, self._started = step, time.monotonic()
        if self._status is not None:
            self._status.update(escape(step))
        else:
            self._line(step)

    def rows(self, done: int) -> None:
        now = time.monotonic()
        if self._status is not None:
            self._status.update(escape(f"{self._step}: {done:,} rows"))
        elif now - self._printed >= self._every:
            rate = done / (now - self._started) if now > self._started else 0.0
            self._line(f"{self._step}: {done:,} rows, {rate:,.0f}/s")

    def _line(self, text: str) -> None:
        self._console.print(escape(text), highlight=False, soft_wrap=True)
        self._printed = time.monotonic()
