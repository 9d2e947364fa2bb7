"""`submit --wait` and the API's wait: a bar redrawn in place on a terminal, and plain lines at most
once every few seconds anywhere else (a CI log must hold lines, not hundreds of frames)."""

from __future__ import annotations

import io

from services.progress import PLAIN_EVERY_S, ProgressReporter, progress_line
from services.queries import ExperimentSummary


def _summary(done: int, *, trials: int = 4, epochs: int = 100) -> ExperimentSummary:
    ended = done * trials // epochs
    counts = {"queued": 0, "running": trials - ended, "succeeded": ended, "failed": 0, "cancelled": 0}
    return ExperimentSummary(id=1, name="grid", method="grid", submitted_by=None, created_at=None, trials=trials,
                             counts=counts, epochs_done=done, epochs_planned=epochs)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_not_on_a_terminal_progress_is_a_plain_line_at_most_every_few_seconds() -> None:
    stream, clock = io.StringIO(), _Clock()
    reporter = ProgressReporter(stream, interactive=False, clock=clock)
    for done in range(0, 101):  # one poll every 0.5 s for 50 s
        reporter.update(_summary(done))
        clock.now += 0.5
    reporter.close(_summary(100))

    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == 50 / PLAIN_EVERY_S + 1  # one per interval, and the end on its own line
    assert lines[-1] == progress_line(_summary(100)) and "100.0%" in lines[-1] and "4/4 trials ended" in lines[-1]


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_ends_with_a_newline() -> None:
    stream = io.StringIO()
    reporter = ProgressReporter(stream, interactive=True)
    for done in (0, 0, 50, 100):
        reporter.update(_summary(done))
    reporter.close(_summary(100))

    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 3  # an unchanged summary is not drawn again
    assert frames[1].startswith("[" + "#" * 15 + "." * 15 + "]") and frames[-1].endswith("\n")


def test_a_stream_that_is_not_a_terminal_gets_plain_lines_by_default() -> None:
    assert ProgressReporter(io.StringIO()).interactive is False
