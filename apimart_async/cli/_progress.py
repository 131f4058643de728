"""Showing work as it happens: a batch progress bar, a status line, summary tables.

``BatchProgress`` counts jobs done, failed and in flight, and images written; it draws
a rich progress bar (with images/s and an ETA) or prints a plain status line every few
seconds when stderr is not a terminal. ``StatusLine`` is the one-line live status of a
single pipeline (``generate``, ``task --wait``). Summaries are rich tables on a
terminal, and ``plain_rows`` (tab-separated, no box drawing, no padding) elsewhere.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.progress import Progress, TaskID
    from rich.status import Status
    from rich.table import Table
    from typing_extensions import Self

    from ._ui import Ui

__all__ = ["BatchProgress", "StatusLine", "counts_table", "plain_rows", "problems_table"]

# Plain mode prints a line at most this often while things change, and at least this
# often while nothing does (so a log shows the run is alive).
PLAIN_EVERY = 5.0
PLAIN_QUIET = 30.0
# The bar redraws at most 8 times a second, so updating it more often than this is
# work nobody sees (a batch finishes hundreds of jobs a second against a fast service).
BAR_EVERY = 0.1


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class BatchProgress:
    """Counters of one batch run and their display; use as a context manager."""

    def __init__(
        self,
        ui: Ui,
        *,
        title: str,
        total: int,
        done: int = 0,
        failed: int = 0,
        limit: int | None = None,
    ) -> None:
        self.ui = ui
        self._limit = limit
        self.title = title
        self.total = total
        self.done = done
        self.failed = failed
        self.in_flight = 0
        self.images = 0
        self._finished_here = 0
        self._started = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._printed_at = self._started
        self._printed = ""
        self._refreshed_at = 0.0

    # -- counting -------------------------------------------------------------------

    def started(self) -> None:
        """A job entered the pipeline (or a download began)."""
        self.in_flight += 1
        self._refresh()

    def finished(self, *, ok: bool, images: int = 0, counted: bool = True) -> None:
        """A started job ended: *ok* with *images* written, or not; not *counted*: it
        never really started (submitting had stopped), so it only leaves the flight."""
        self.in_flight = max(0, self.in_flight - 1)
        if not counted:
            self._refresh()
            return
        self._finished_here += 1
        if ok:
            self.done += 1
            self.images += images
        else:
            self.failed += 1
        self._refresh()

    def counted(self, *, done: int = 0, failed: int = 0) -> None:
        """Jobs settled before this run (done earlier, or left alone): counted, not timed."""
        self.done += done
        self.failed += failed
        self._refresh()

    def set_total(self, total: int) -> None:
        """The number of jobs, once the whole batch file has been read."""
        self.total = total
        self._refresh(force=True)

    @property
    def running(self) -> int:
        """Jobs in flight, at most *limit* (the pipeline reads one job ahead)."""
        return self.in_flight if self._limit is None else min(self.in_flight, self._limit)

    @property
    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self._started

    @property
    def rate(self) -> float:
        """Images written per second in this run."""
        elapsed = self.elapsed
        return self.images / elapsed if elapsed > 0 else 0.0

    def _eta(self) -> str:
        left = self.total - self.done - self.failed
        if left <= 0:
            return "0:00:00"
        if not self._finished_here:
            return "-:--:--"
        return _clock(left * self.elapsed / self._finished_here)

    def line(self) -> str:
        """The plain status line."""
        return (
            f"[{_clock(self.elapsed)}] {self.done + self.failed}/{self.total}: "
            f"{self.done} done, {self.failed} failed, {self.running} in flight, "
            f"{self.rate:.1f} images/s, ETA {self._eta()}"
        )

    # -- display --------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self.ui.mode == "bar":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "[green]{task.fields[done]} done[/] [red]{task.fields[failed]} failed[/] "
                    "[cyan]{task.fields[in_flight]} in flight[/] {task.fields[rate]} img/s"
                ),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.ui.err,
                refresh_per_second=8,
            )
            self._task = self._progress.add_task(
                self.title, total=self.total, completed=self.done + self.failed
            )
            self._refresh()
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live display (or print the last plain line). Safe to call twice."""
        if self._progress is not None:
            self._refresh(force=True)
            self._progress.stop()
            self._progress = None
        elif self.ui.mode == "plain" and self._printed != self.line():
            self._print()

    def note(self, text: str) -> None:
        """A line of text above the bar (or among the plain lines; also when ``off``)."""
        if self._progress is not None:
            from rich.text import Text

            self._progress.console.print(Text(text))
        else:
            self.ui.info(text)

    def tick(self) -> None:
        """Called every second: plain mode prints a line when it is time."""
        if self.ui.mode != "plain":
            self._refresh(force=True)
            return
        since = time.monotonic() - self._printed_at
        changed = self.line().split("]", 1)[1] != self._printed.split("]", 1)[-1]
        if (changed and since >= PLAIN_EVERY) or since >= PLAIN_QUIET:
            self._print()

    def _print(self) -> None:
        self._printed = self.line()
        self._printed_at = time.monotonic()
        self.ui.info(self._printed)

    def _refresh(self, *, force: bool = False) -> None:
        if self._progress is None or self._task is None:
            return
        now = time.monotonic()
        if not force and now - self._refreshed_at < BAR_EVERY:
            return  # throttled: the next change or tick shows the latest counts
        self._refreshed_at = now
        self._progress.update(
            self._task,
            total=self.total,
            completed=self.done + self.failed,
            done=self.done,
            failed=self.failed,
            in_flight=self.running,
            rate=f"{self.rate:.1f}",
        )


class StatusLine:
    """A live one-line status (a spinner on a terminal, changed lines otherwise)."""

    def __init__(self, ui: Ui, text: str, *, announce: bool = True) -> None:
        """*announce*: print *text* at once in plain mode (else only the first update)."""
        self.ui = ui
        self._text = text
        self._announce = announce
        self._status: Status | None = None
        self._printed_at = 0.0

    def __enter__(self) -> Self:
        if self.ui.mode == "bar":
            self._status = self.ui.err.status(self._text)
            self._status.start()
        elif self.ui.mode == "plain" and self._announce:
            self._print(self._text)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def update(self, text: str, *, important: bool = True) -> None:
        """Show *text*; in plain mode, unimportant updates print at most once a second."""
        if text == self._text:
            return
        self._text = text
        if self._status is not None:
            self._status.update(text)
        elif self.ui.mode == "plain" and (important or time.monotonic() - self._printed_at >= 1.0):
            self._print(text)

    def _print(self, text: str) -> None:
        self._printed_at = time.monotonic()
        self.ui.info(text)


def counts_table(title: str, rows: Sequence[tuple[str, str, str]]) -> Table:
    """A table of ``(status, count, meaning)`` rows."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("status")
    table.add_column("jobs", justify="right")
    table.add_column("")
    for status, count, meaning in rows:
        table.add_row(status, count, meaning)
    return table


def problems_table(rows: Sequence[tuple[int, str, str, str]], *, more: int) -> Table:
    """A table of ``(line, id, status, error)`` rows for jobs that did not finish."""
    from rich.table import Table

    caption = f"... and {more} more (see results.jsonl)" if more else None
    table = Table(
        title="not done", title_justify="left", caption=caption, show_edge=False, pad_edge=False
    )
    table.add_column("line", justify="right")
    table.add_column("id")
    table.add_column("status")
    table.add_column("error", overflow="fold")
    for line, job_id, status, error in rows:
        table.add_row(str(line), job_id, status, error)
    return table


def plain_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A header and *rows* as tab-separated lines: no box drawing, no padding."""

    def cell(value: str) -> str:
        return " ".join(value.split())  # no tab or newline inside a cell

    return ["\t".join(cell(v) for v in row) for row in (header, *rows)]
