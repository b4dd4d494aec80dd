"""``status``, ``jobs``, ``cancel``, ``pause``, ``resume`` and ``retry-failed``: watching and steering jobs.

In embedded mode these commands read the embedded Redis in the state directory: the running export's, or one they
start for themselves. ``resume`` and ``retry-failed`` need workers to do anything; in embedded mode, when no export is
running, they start the local workers and wait, like ``export``.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich import filesize
from rich.table import Table

from trolley_tasks.cli.common import (
    EXIT_OK,
    console,
    global_options,
    handles_errors,
    notice,
    start,
)
from trolley_tasks.cli.export import run_with_workers, wait_for
from trolley_tasks.cli.progress import failure_table, format_eta, progress_line, rate_text
from trolley_tasks.cli.tables import fit_table
from trolley_tasks.engine.api import EngineClient, open_engine
from trolley_tasks.engine.models import JobStatus

JobArgument = Annotated[str, typer.Argument(metavar="JOB", help="The job id (see 'trolley-tasks jobs').")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def status_json(status: JobStatus) -> str:
    data = status.model_dump(mode="json")
    data["missing"] = status.missing
    data["complete"] = status.complete
    return json.dumps(data, indent=2)


@handles_errors
def status(
    ctx: typer.Context,
    job: JobArgument,
    as_json: JsonOption = False,
    watch_it: Annotated[bool, typer.Option("--watch", help="Show progress until the job ends or pauses.")] = False,
) -> None:
    """Show a job's counts, rate, ETA and failures by error class.

    Example:

    \b
        trolley-tasks status 3f2a9c1e --watch
    """
    settings = start(ctx)
    with open_engine(settings, exclusive=False) as engine:
        if watch_it:
            code = wait_for(engine, job)
            if as_json:
                console.print_json(status_json(engine.status(job)))
            raise typer.Exit(code)
        current = engine.status(job)
        if as_json:
            console.print_json(status_json(current))
            return
        table = Table(show_header=False, title=f"job {current.job_id}", title_justify="left")
        for name, value in (
            ("state", current.state.value + (f" ({current.pause_reason})" if current.pause_reason else "")),
            ("source", current.source),
            ("output", f"{current.output} (layout {current.layout})"),
            (
                "instances",
                f"{current.done}/{current.expected} done, {current.skipped} already on disk, "
                f"{current.failed} failed, {current.missing} to go",
            ),
            ("cohort rows", f"{current.rows_expanded}/{current.rows} expanded, {current.rows_failed} failed"),
            ("bytes", filesize.decimal(current.bytes)),
            (
                "rate",
                f"{rate_text(current)}, ETA {format_eta(current.eta_seconds)}",
            ),
            ("started", str(current.started_at or "-")),
            ("finished", str(current.finished_at or "-")),
        ):
            table.add_row(name, value)
        console.print(table)
        if current.excluded:  # left out on purpose (series filter, de-identification), each with its rule
            counts: dict[tuple[str, str], int] = {}
            for item in current.excluded:  # one row per series and rule, instances left out one by one summed
                counts[(item.series_uid, item.rule)] = counts.get((item.series_uid, item.rule), 0) + item.instances
            excluded = Table("SeriesInstanceUID", "instances", "excluded by", title="excluded", title_justify="left")
            for (series_uid, rule), count in counts.items():
                excluded.add_row(series_uid, str(count), rule)
            console.print(excluded)
        if current.failed or current.rows_failed:
            console.print(failure_table(current, engine.failures(job)))


@handles_errors
def jobs(
    ctx: typer.Context,
    as_json: JsonOption = False,
) -> None:
    """List the jobs the ledger knows, newest first.

    Example:

    \b
        trolley-tasks jobs --json
    """
    settings = start(ctx)
    with open_engine(settings, exclusive=False) as engine:
        found = engine.jobs()
    if as_json:
        console.print_json(json.dumps([json.loads(status_json(item)) for item in found]))
        return
    columns = ("job", "state", "done", "failed", "expected", "source", "output", "created")
    rows = [
        {
            "job": item.job_id,
            "state": item.state.value,
            "done": str(item.done),
            "failed": str(item.failed),
            "expected": str(item.expected),
            "source": item.source,
            "output": item.output,
            "created": item.created_at.astimezone().strftime("%Y-%m-%d %H:%M") if item.created_at else "",
        }
        for item in found
    ]
    fitted = fit_table(columns, rows, console.width, whole=("job", "state"), caption=f"{len(found)} jobs")
    console.print(fitted.table)
    if fitted.left_out:
        notice(f"left out at {console.width} columns: {', '.join(fitted.left_out)} (see --json)")


@handles_errors
def cancel(ctx: typer.Context, job: JobArgument) -> None:
    """Cancel a job: stop queueing, drop pending work, keep what is on disk.

    Example:

    \b
        trolley-tasks cancel 3f2a9c1e
    """
    settings = start(ctx)
    with open_engine(settings, exclusive=False) as engine:
        engine.cancel(job)
        notice(progress_line(engine.status(job)))


@handles_errors
def pause(ctx: typer.Context, job: JobArgument) -> None:
    """Pause a job: workers stop taking its work; running fetches finish. Resume with 'resume'.

    Example:

    \b
        trolley-tasks pause 3f2a9c1e
    """
    settings = start(ctx)
    with open_engine(settings, exclusive=False) as engine:
        engine.pause(job, reason="paused by the user")
        notice(progress_line(engine.status(job)))


@handles_errors
def report(ctx: typer.Context, job: JobArgument) -> None:
    """Write the job's report (trolley-report.json and .csv in its output directory) now, from the ledger.

    A job writes its report when it ends; use this to rewrite it, or to get one for a running job.

    Example:

    \b
        trolley-tasks report 3f2a9c1e
    """
    settings = start(ctx)
    with open_engine(settings, exclusive=False) as engine:
        json_path, csv_path = engine.write_report(job)
    console.print(f"{json_path}\n{csv_path}", highlight=False, soft_wrap=True)


def _restart(engine: EngineClient, job: str, workers: int, log_level: str) -> int:
    """After resume or retry-failed: in embedded mode with nobody else's workers, run ours until the job ends."""
    if engine.owns_embedded:
        return run_with_workers(engine, job, workers, log_level)
    notice(progress_line(engine.status(job)))
    return EXIT_OK


WorkersOption = Annotated[
    int, typer.Option("--workers", "-w", min=0, metavar="N", help="Embedded mode: worker processes.")
]


@handles_errors
def resume(
    ctx: typer.Context,
    job: JobArgument,
    workers: WorkersOption = 0,
) -> None:
    """Resume a paused job. In embedded mode, runs the local workers until it ends.

    Example:

    \b
        trolley-tasks resume 3f2a9c1e
    """
    settings = start(ctx)
    with open_engine(settings, exclusive=False) as engine:
        engine.resume(job)
        raise typer.Exit(_restart(engine, job, workers, global_options(ctx).level))


@handles_errors
def retry_failed(
    ctx: typer.Context,
    job: JobArgument,
    workers: WorkersOption = 0,
) -> None:
    """Re-queue only the failed instances of an ended job (after fixing the cause).

    Example:

    \b
        trolley-tasks retry-failed 3f2a9c1e
    """
    settings = start(ctx)
    with open_engine(settings, exclusive=False) as engine:
        count = engine.retry_failed(job)
        notice(f"re-queued {count} failed instances of job {job}")
        raise typer.Exit(_restart(engine, job, workers, global_options(ctx).level))
