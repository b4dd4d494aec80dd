"""The ``trolley-tasks`` command: search a PACS, export a cohort, watch and control jobs, run workers and Flower.

The global options ``--config PATH``, ``--log-level`` and ``--log-json`` are declared once
(:data:`~trolley_tasks.cli.common.GLOBAL_PARAMETERS`) and accepted before the command name and after it:
``trolley-tasks --config f export ...`` and ``trolley-tasks export ... --config f`` (the nearer wins). Exit codes are in
:mod:`trolley_tasks.cli.common`. The commands live in one module per seam: :mod:`~trolley_tasks.cli.search`,
:mod:`~trolley_tasks.cli.export`, :mod:`~trolley_tasks.cli.jobs` (status, jobs, cancel, pause, resume,
retry-failed), :mod:`~trolley_tasks.cli.services` (worker, flower), :mod:`~trolley_tasks.cli.metrics` (the
Prometheus endpoint) and :mod:`~trolley_tasks.cli.fleet` (workers).
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from trolley_tasks import __version__
from trolley_tasks.cli import fleet, jobs, metrics, services
from trolley_tasks.cli.common import with_global_options
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
@with_global_options
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Export DICOM cohorts from a PACS with Celery workers: fast, gentle on the PACS, resumable.

    Quick start: make demo. Then write a trolley.toml with a [sources.NAME] profile for your PACS (see README.md).
    """


COMMANDS: dict[str, Callable[..., None]] = {
    "search": search,
    "export": export,
    "status": jobs.status,
    "jobs": jobs.jobs,
    "cancel": jobs.cancel,
    "pause": jobs.pause,
    "resume": jobs.resume,
    "retry-failed": jobs.retry_failed,
    "report": jobs.report,
    "worker": services.worker,
    "flower": services.flower,
    "metrics": metrics.metrics,
    "workers": fleet.workers,
}
"""Every command, by name. Each gets the global options from :func:`with_global_options` as it is registered."""
for _name, _command in COMMANDS.items():
    app.command(_name)(with_global_options(_command))


def main() -> None:
    """Console-script entry point (``trolley-tasks``)."""
    app()
