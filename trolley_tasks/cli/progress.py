"""Waiting on a job: rich progress bars on a terminal, plain periodic log lines otherwise.

On a terminal the user sees the overall bar (instances done of expected, bytes, the rate and the ETA the engine
computes from its ledger), each failure as it happens, printed above the bars, and the series still in progress
(the ones complete are counted, not listed, so a 10,000-series cohort does not flood the screen). Without a terminal
(cron, nohup, CI) the same facts go to the ``trolley.progress`` logger every :data:`LOG_EVERY` seconds.

The display only reads the ledger; it never changes the job. What happens on Ctrl-C is the caller's business
(:mod:`trolley_tasks.cli.export` pauses the job).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import monotonic
from typing import Any, Protocol

from rich import filesize
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table

from trolley_tasks.engine.api import EngineClient
from trolley_tasks.engine.models import Failure, JobState, JobStatus, SeriesProgress

log = logging.getLogger("trolley.progress")

POLL_SECONDS = 0.5
SERIES_SHARE = 0.1
"""At most this share of the display's time goes to reading every series' counts: a million-instance job has
20,000 series or more, whose counts take about 0.4 s to read (pipelined), so they are read every 4 s or so there,
and every poll for a small job. The job's own counts (one hash) are read every poll."""
LOG_EVERY = 10.0
MAX_SERIES_ROWS = 8
MAX_FAILURE_LINES = 20


class JobView(Protocol):
    """What the display reads about one job (the engine API, bound to a job id)."""

    job_id: str

    def status(self) -> JobStatus: ...

    def failures(self) -> Iterable[Failure]: ...

    def series(self) -> Iterable[SeriesProgress]: ...


def waiting_is_over(status: JobStatus) -> bool:
    """Ended, or paused: a paused job waits for a person, so the command stops waiting and says why."""
    return status.state.ended or status.state is JobState.PAUSED


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def describe_failure(failure: Failure) -> str:
    what = failure.instance_uid or failure.series_uid or failure.study_uid or failure.row or "?"
    return f"{failure.error_class} {what}: {failure.message}"


def rate_text(status: JobStatus) -> str:
    """``12.5 inst/s, 6.3 MB/s``: sizes in decimal units, as rich's transfer-speed column shows them."""
    return f"{status.rate:.1f} inst/s, {filesize.decimal(int(status.byte_rate))}/s"


def progress_line(status: JobStatus) -> str:
    """The one-line summary used in logs and after the bars."""
    return (
        f"job {status.job_id} {status.state.value}: {status.done}/{status.expected} instances"
        f" ({status.skipped} already on disk), {status.failed} failed, {filesize.decimal(status.bytes)},"
        f" {rate_text(status)}, ETA {format_eta(status.eta_seconds)}"
    )


class _FailureTicker:
    """Prints each new failure once, up to :data:`MAX_FAILURE_LINES`."""

    def __init__(self, view: JobView, emit: Callable[[str], None]) -> None:
        self.view = view
        self.emit = emit
        self.seen = 0

    def update(self, status: JobStatus) -> None:
        total = status.failed + status.rows_failed
        if total <= self.seen:
            return
        if self.seen < MAX_FAILURE_LINES:  # read the records only as far as the lines still to print
            for failure in itertools.islice(self.view.failures(), self.seen, MAX_FAILURE_LINES):
                self.emit(describe_failure(failure))
                self.seen += 1
        if self.seen == MAX_FAILURE_LINES and total > MAX_FAILURE_LINES:
            self.emit(f"more failures: see 'trolley-tasks status {self.view.job_id}' or the report")
            self.seen = total
        elif self.seen > MAX_FAILURE_LINES:  # the pointer is printed: only count
            self.seen = total


def _overall_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[failed]}"),
        TextColumn("{task.fields[bytes]}"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
    )


def _series_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("  {task.description}", style="dim"),
        BarColumn(bar_width=20),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        console=console,
    )


def _overall_fields(status: JobStatus) -> dict[str, Any]:
    return {
        "failed": f"[red]{status.failed} failed[/]" if status.failed else "0 failed",
        "bytes": filesize.decimal(status.bytes),
        "rate": rate_text(status),
        "eta": format_eta(status.eta_seconds),
    }


@dataclass
class EngineJob:
    """One job of an :class:`~trolley_tasks.engine.api.EngineClient`, as the :class:`JobView` the display reads."""

    engine: EngineClient
    job_id: str

    def status(self) -> JobStatus:
        return self.engine.status(self.job_id, excluded=False)  # the bars never show the exclusions

    def failures(self) -> Iterable[Failure]:
        return self.engine.failures(self.job_id)

    def series(self) -> Iterable[SeriesProgress]:
        return self.engine.series(self.job_id)


def watch_terminal(view: JobView, console: Console, check: Callable[[], None] = lambda: None) -> JobStatus:
    """Bars until the job ends or pauses. ``check`` runs every poll (the embedded workers' health)."""
    overall = _overall_progress(console)
    per_series = _series_progress(console)
    status = view.status()
    main = overall.add_task(
        f"{status.state.value}", total=max(status.expected, 1), completed=0, **_overall_fields(status)
    )
    shown: dict[str, TaskID] = {}
    ticker = _FailureTicker(
        view, lambda line: console.print(f"[red]✗[/] {escape(line)}", soft_wrap=True, highlight=False)
    )
    series: list[SeriesProgress] = []
    series_due = 0.0
    with Live(Group(overall, per_series), console=console, refresh_per_second=4, transient=False):
        while True:
            status = view.status()
            ticker.update(status)
            asked = monotonic()
            if asked >= series_due or waiting_is_over(status):
                series = list(view.series())
                series_due = asked + max(POLL_SECONDS, (monotonic() - asked) / SERIES_SHARE)
            complete = sum(1 for s in series if s.done + s.failed >= s.expected)
            label = f"{status.state.value} · series {complete}/{len(series)}"
            overall.update(
                main,
                description=label,
                total=max(status.expected, 1),
                completed=status.done + status.failed,
                **_overall_fields(status),
            )
            _update_series_rows(per_series, shown, series)
            if waiting_is_over(status):
                return status
            check()
            time.sleep(POLL_SECONDS)


def _update_series_rows(progress: Progress, shown: dict[str, TaskID], series: list[SeriesProgress]) -> None:
    active = [s for s in series if 0 < s.done + s.failed < s.expected][:MAX_SERIES_ROWS]
    active_uids = {s.series_uid for s in active}
    for uid in list(shown):
        if uid not in active_uids:
            progress.remove_task(shown.pop(uid))
    for item in active:
        label = f"series …{item.series_uid[-12:]}"
        if item.series_uid not in shown:
            shown[item.series_uid] = progress.add_task(label, total=item.expected)
        progress.update(shown[item.series_uid], total=item.expected, completed=item.done + item.failed)


def watch_logs(view: JobView, check: Callable[[], None] = lambda: None) -> JobStatus:
    """Plain log lines every :data:`LOG_EVERY` seconds, and each failure as a warning."""
    ticker = _FailureTicker(view, lambda line: log.warning("failed: %s", line))
    last = 0.0
    while True:
        status = view.status()
        ticker.update(status)
        if waiting_is_over(status):
            log.info("%s", progress_line(status))
            return status
        if time.monotonic() - last >= LOG_EVERY:
            log.info("%s", progress_line(status))
            last = time.monotonic()
        check()
        time.sleep(POLL_SECONDS)


def watch(view: JobView, console: Console, check: Callable[[], None] = lambda: None) -> JobStatus:
    """Bars when ``console`` is a terminal, log lines otherwise. Returns the status that ended the wait."""
    if console.is_terminal:
        return watch_terminal(view, console, check)
    return watch_logs(view, check)


def failure_table(status: JobStatus, failures: Iterable[Failure]) -> Table:
    """Failures by error class: how many, and one example each, for the summary after a job."""
    examples: dict[str, str] = {}
    for failure in failures:
        examples.setdefault(failure.error_class, describe_failure(failure))
    table = Table(title=f"failures of job {status.job_id}", title_justify="left")
    table.add_column("error class")
    table.add_column("instances", justify="right")
    table.add_column("example")
    counts = dict(status.failures_by_class)
    for name in examples:
        counts.setdefault(name, 0)
    for name, count in sorted(counts.items(), key=lambda item: -item[1]):
        table.add_row(name, str(count), escape(examples.get(name, "")))
    return table
