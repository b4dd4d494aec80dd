"""The ``trolley-tasks`` command: search a PACS, export a cohort, watch and control jobs, run workers and Flower.

Every command takes ``--config PATH``, ``--log-level`` and ``--log-json``. Exit codes are in
:mod:`trolley_tasks.cli.common`. The commands live in one module per seam: :mod:`~trolley_tasks.cli.search`,
:mod:`~trolley_tasks.cli.export`, :mod:`~trolley_tasks.cli.jobs` (status, jobs, cancel, pause, resume,
retry-failed) and :mod:`~trolley_tasks.cli.services` (worker, flower).
"""

from __future__ import annotations

import typer

from trolley_tasks import __version__
from trolley_tasks.cli import jobs, services
from trolley_tasks.cli.export import export
from trolley_tasks.cli.search import search

app = typer.Typer(
    name="trolley-tasks",
    help="Export DICOM cohorts from a PACS with Celery workers: fast, gentle on the PACS, resumable.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"trolley-tasks {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Export DICOM cohorts from a PACS with Celery workers: fast, gentle on the PACS, resumable.

    Quick start: make demo. Then write a trolley.toml with a [sources.NAME] profile for your PACS (see README.md).
    """


app.command()(search)
app.command()(export)
app.command()(jobs.status)
app.command()(jobs.jobs)
app.command()(jobs.cancel)
app.command()(jobs.pause)
app.command()(jobs.resume)
app.command("retry-failed")(jobs.retry_failed)
app.command()(services.worker)
app.command()(services.flower)


def main() -> None:
    """Console-script entry point (``trolley-tasks``)."""
    app()
