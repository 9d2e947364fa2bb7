"""Waiting for an experiment to end, and showing how far it got: `fitscope submit --wait` and the
Python API's ``wait`` both call :func:`wait_for_experiment`.

On a terminal (or in a notebook, whose output cell understands a carriage return) the bar is
redrawn in place; anywhere else (a CI log, `docker logs`, a file) it is a plain line at most once
every ``PLAIN_EVERY_S`` seconds and once at the end, so a log holds lines, not frames.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from sqlalchemy import Engine

PLAIN_EVERY_S = 5.0
POLL_S = 0.5
BAR_WIDTH = 30


class WaitTimedOut(TimeoutError):
    """The experiment had not ended when the wait gave up; the message says so in one sentence."""


def progress_line(summary) -> str:
    """One line for an ExperimentSummary: a bar of planned epochs done, the share, trial counts."""
    filled = int(round(summary.progress * BAR_WIDTH))
    counts = " ".join(f"{status}={count}" for status, count in summary.counts.items() if count)
    return (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {summary.progress:6.1%}  "
            f"{summary.ended}/{summary.trials} trials ended  {counts}")


class ProgressReporter:
    """Shows successive summaries of one experiment on ``stream`` (default stderr)."""

    def __init__(self, stream: TextIO | None = None, *, interactive: bool | None = None,
                 every_s: float = PLAIN_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.interactive = _redraws(self.stream) if interactive is None else interactive
        self.every_s = every_s
        self.clock = clock
        self._last_line = ""
        self._last_shown = -float("inf")

    def update(self, summary) -> None:
        line = progress_line(summary)
        if line == self._last_line:
            return
        if self.interactive:
            self.stream.write("\r" + line)
        elif self.clock() - self._last_shown >= self.every_s:
            self.stream.write(line + "\n")
            self._last_shown = self.clock()
        else:
            return  # the next line shown will carry this change
        self.stream.flush()
        self._last_line = line

    def close(self, summary=None) -> None:
        """The last state on its own line, whatever the interval."""
        if summary is not None and progress_line(summary) != self._last_line:
            self._last_shown = -float("inf")
            self.update(summary)
        if self.interactive and self._last_line:
            self.stream.write("\n")
            self.stream.flush()


def wait_for_experiment(engine: Engine, experiment_id: int, *, timeout_s: float = 0,
                        reporter: ProgressReporter | None = None, poll_s: float = POLL_S):
    """Poll the experiment until every trial has ended; returns its last ExperimentSummary.

    ``timeout_s`` > 0 gives up after that many seconds with WaitTimedOut. ``reporter`` (if any)
    is shown every poll and closed at the end, also on a timeout."""
    from services.actions import ExperimentNotFound
    from services.db import session_scope
    from services.queries import get_experiment

    started = time.monotonic()
    summary = None
    try:
        while True:
            with session_scope(engine) as session:
                summary = get_experiment(session, experiment_id)
            if summary is None:
                raise ExperimentNotFound(f"experiment {experiment_id} does not exist; `fitscope status` lists them")
            if reporter is not None:
                reporter.update(summary)
            if summary.finished:
                return summary
            if timeout_s and time.monotonic() - started > timeout_s:
                raise WaitTimedOut(f"experiment {experiment_id} did not finish within {timeout_s:g} s")
            time.sleep(poll_s)
    finally:
        if reporter is not None:
            reporter.close(summary)


def _redraws(stream: TextIO) -> bool:
    """A terminal, or a notebook's output cell: both draw a carriage return in place."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
    return "ipykernel" in sys.modules
