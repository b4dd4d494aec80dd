"""``trolley-tasks export``: a cohort (CSV, study UIDs or search filters) to verified files in a directory.

With a broker configured, the command submits the job and, with ``--wait``, shows its progress. Without one
(embedded mode) it starts a private Redis and ``--workers`` Celery workers, submits, waits, and stops them: the same
engine path as on a cluster. Re-running the same command (same cohort, source and output) is the same job: it resumes
a paused or interrupted job and fetches nothing that is already on disk and valid.

Ctrl-C pauses the job before the command exits (code 130), so the job is kept, not lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import filesize

from trolley_tasks.cli.common import (
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    CliUsageError,
    console,
    err_console,
    global_options,
    handles_errors,
    log,
    notice,
    start,
)
from trolley_tasks.cli.export_filters import (
    Deid,
    DryRun,
    ExcludeDescription,
    ExcludeModality,
    ExcludeSopClass,
    FiltersName,
    IncludeDescription,
    IncludeModality,
    LinkTable,
    MinInstances,
    check_deid,
    print_preview,
    series_filter,
)
from trolley_tasks.cli.progress import EngineJob, failure_table, format_eta, watch
from trolley_tasks.cli.search import NO_FILTERS, Filters, SourceOption, with_filters
from trolley_tasks.core import QueryLevels
from trolley_tasks.engine.api import EngineClient, open_engine
from trolley_tasks.engine.api import dry_run as engine_dry_run
from trolley_tasks.engine.embedded import EmbeddedWorkers, default_worker_count, embedded_workers
from trolley_tasks.engine.models import JobState, JobStatus
from trolley_tasks.engine.settings import Settings
from trolley_tasks.engine.throttle import Window


def cohort_input(cohort: Path | None, filters: Filters) -> Any:
    """The one cohort the user gave, as the engine client's ``submit`` takes it: a CSV path, references, a Query.

    A cohort file is read by the engine, once, as it is submitted: a bad row is one clear line naming the file, row
    and column, and nothing is queued.
    """
    if cohort is not None and filters.given:
        raise CliUsageError("give a cohort file, or --study-uid / search filters, not both")
    if cohort is not None:
        if not cohort.is_file():
            raise CliUsageError(f"{cohort}: no such cohort file")
        return cohort
    if not filters.given:
        raise CliUsageError("nothing to export: give a cohort CSV, --study-uid UID, or search filters (see --help)")
    if filters.study_uids and not (
        filters.accession
        or filters.patient_id
        or filters.patient_name
        or filters.modality
        or filters.date_from
        or filters.date_to
    ):
        filters.queries()  # validates every UID: one clear line for a bad one
        from trolley_tasks.core import StudyReference

        return [StudyReference(uid) for uid in filters.study_uids]
    queries = filters.queries(QueryLevels.STUDY)
    if len(queries) > 1:
        raise CliUsageError("combine several --study-uid with search filters is not supported; use a cohort CSV")
    return queries[0]


def conclude(engine: EngineClient, status: JobStatus, interrupted: bool = False) -> int:
    """Say how the job ended, and return the exit code (see :mod:`trolley_tasks.cli.common`)."""
    if status.complete:
        err_console.print(
            f"[green]✓[/] job {status.job_id}: all {status.expected} instances on disk "
            f"({status.skipped} were already there), {filesize.decimal(status.bytes)} in {status.output}",
            soft_wrap=True,
        )
        return EXIT_OK
    if status.state is JobState.PAUSED:
        reason = f" ({status.pause_reason})" if status.pause_reason else ""
        err_console.print(
            f"[yellow]job {status.job_id} is paused{reason}[/]: {status.done}/{status.expected} on disk", soft_wrap=True
        )
        hint = "run the same command again" if engine.embedded else f"trolley-tasks resume {status.job_id}"
        notice(f"to continue: {hint}")
        return EXIT_INTERRUPTED if interrupted else EXIT_FAILURES
    if status.state is JobState.CANCELLED:
        err_console.print(
            f"[red]job {status.job_id} was cancelled[/]: {status.done}/{status.expected} on disk", soft_wrap=True
        )
        return EXIT_FAILURES
    err_console.print(failure_table(status, engine.failures(status.job_id)))
    missing = status.missing
    err_console.print(
        f"[red]✗[/] job {status.job_id}: {status.failed} instances failed"
        + (f", {missing} missing" if missing else "")
        + (f", {status.rows_failed} cohort rows failed" if status.rows_failed else "")
        + f"; the report lists each one: {Path(status.output) / 'trolley-report.csv'}",
        soft_wrap=True,
    )
    notice(f"after fixing the cause: trolley-tasks retry-failed {status.job_id}")
    return EXIT_FAILURES


def wait_for(engine: EngineClient, job_id: str, workers: EmbeddedWorkers | None = None) -> int:
    """Show progress until the job ends or pauses; on Ctrl-C pause it first. Returns the exit code."""
    view = EngineJob(engine, job_id)
    try:
        status = watch(view, err_console, workers.check if workers else lambda: None)
    except KeyboardInterrupt:
        engine.pause(job_id, reason="interrupted (Ctrl-C)")
        log.info("paused job %s on Ctrl-C", job_id)
        return conclude(engine, engine.status(job_id), interrupted=True)
    return conclude(engine, status)


def window_notice(settings: Settings, source: str) -> None:
    """Say so when the source's time window is closed now: otherwise the bars would sit still without a reason."""
    window = settings.sources[source].window
    if window and (wait := Window.parse(window).seconds_until_open()) > 0:
        notice(f"source {source} fetches only in the window {window}: the job waits {format_eta(wait)} for it")


def ensure_running(engine: EngineClient, job_id: str) -> JobStatus:
    """A re-run of a paused job resumes it (Ctrl-C, or an auth pause fixed since)."""
    status = engine.status(job_id)
    if status.state is JobState.PAUSED:
        notice(f"resuming paused job {job_id} ({status.done}/{status.expected} already on disk)")
        engine.resume(job_id)
        status = engine.status(job_id)
    return status


def run_with_workers(engine: EngineClient, job_id: str, workers: int, loglevel: str) -> int:
    """Embedded mode: local workers for as long as the job runs."""
    assert engine.embedded is not None
    count = workers or default_worker_count()
    notice(f"embedded mode: {count} local workers, state in {engine.settings.state_dir}")
    with embedded_workers(engine.embedded, count, engine.settings.config_path, loglevel) as running:
        return wait_for(engine, job_id, running)


@with_filters
@handles_errors
def export(
    ctx: typer.Context,
    cohort: Annotated[
        Path | None,
        typer.Argument(
            metavar="[COHORT.csv]", help="Cohort CSV (as 'search --format csv' writes).", show_default=False
        ),
    ] = None,
    source: SourceOption = ...,  # type: ignore[assignment]
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Output directory.")] = ...,  # type: ignore[assignment]
    filters: Filters = NO_FILTERS,
    layout: Annotated[
        str,
        typer.Option(
            "--layout",
            metavar="LAYOUT",
            help="study-series, flat, or a template like '{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}.dcm'.",
        ),
    ] = "study-series",
    workers: Annotated[
        int, typer.Option("--workers", "-w", min=0, metavar="N", help="Embedded mode: worker processes (0: CPU count).")
    ] = 0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, metavar="N", help="Instances of one series per fetch message.")
    ] = 50,
    wait: Annotated[
        bool | None,
        typer.Option(
            "--wait/--no-wait", help="Wait with progress bars (default in embedded mode).", show_default=False
        ),
    ] = None,
    job_id: Annotated[
        str, typer.Option("--job-id", metavar="ID", help="Name the job (default: derived from cohort, source, out).")
    ] = "",
    skip_bad_rows: Annotated[
        bool, typer.Option("--skip-bad-rows", help="Record bad cohort rows instead of refusing.")
    ] = False,
    filters_name: FiltersName = "",
    include_modality: IncludeModality = None,
    exclude_modality: ExcludeModality = None,
    include_series_description: IncludeDescription = "",
    exclude_series_description: ExcludeDescription = "",
    min_instances: MinInstances = None,
    exclude_sop_class: ExcludeSopClass = None,
    deid: Deid = "",
    link_table: LinkTable = None,
    dry_run: DryRun = False,
) -> None:
    """Export a cohort from a source into a directory, as verified DICOM files.

    Example:

    \b
        trolley-tasks export cohort.csv --source orthanc --out ./export
        trolley-tasks export --source orthanc --study-uid 1.2.840.1.2.3 --out ./export --layout flat
        trolley-tasks export cohort.csv -s orthanc -o ./ct --include-modality CT --min-instances 20 --dry-run
        TROLLEY_DEID_KEY=... trolley-tasks export cohort.csv -s orthanc -o ./research --deid basic
    """
    settings = start(ctx)
    settings.source(source)  # unknown source or missing secret: refused before anything starts
    check_deid(settings, deid, link_table)  # so is a de-identified export without its key
    given = cohort_input(cohort, filters)
    chosen = series_filter(
        settings,
        filters_name,
        include_modality=include_modality,
        exclude_modality=exclude_modality,
        include_series_description=include_series_description,
        exclude_series_description=exclude_series_description,
        min_instances=min_instances,
        exclude_sop_class=exclude_sop_class,
    )
    if dry_run:  # no broker, no ledger, no worker: the searcher and one sampled instance
        preview = engine_dry_run(settings, given, source=source, filters=chosen, skip_bad_rows=skip_bad_rows, deid=deid)
        print_preview(preview)
        raise typer.Exit(EXIT_OK)
    window_notice(settings, source)
    embedded = not settings.broker.url
    if wait is None:
        wait = embedded
    if embedded and not wait:
        raise CliUsageError(
            "--no-wait needs a broker ([broker] url): in embedded mode the workers live as long as the command waits"
        )
    if workers and not embedded:
        raise CliUsageError("--workers is for embedded mode; with a broker, start workers with 'trolley-tasks worker'")
    with open_engine(settings, exclusive=embedded) as engine:
        job = engine.submit(
            given,
            source=source,
            output=out.resolve(),
            layout=layout,
            batch_size=batch_size,
            job_id=job_id or None,
            skip_bad_rows=skip_bad_rows,
            filters=chosen,
            deid=deid or None,
            link_table=link_table,
        )
        for line in engine.bad_rows(job):
            log.warning("skipped: %s", line)
        status = ensure_running(engine, job)
        log.info("job %s submitted (%s)", job, status.state.value)
        if not wait:
            console.print(job)
            notice(f"watch it with: trolley-tasks status {job} --watch")
            return
        if embedded and not status.state.ended:
            code = run_with_workers(engine, job, workers, global_options(ctx).level)
        else:
            code = wait_for(engine, job)
    raise typer.Exit(code)
