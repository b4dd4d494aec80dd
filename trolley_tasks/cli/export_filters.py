"""The series filter and de-identification options of ``trolley-tasks export``, and the ``--dry-run`` summary.

The options build one :class:`~trolley_tasks.series_filter.SeriesFilter`: a named ``[filters.NAME]`` table
(``--filters NAME``) with any option given on the command line on top. The engine stores it in the job record, so
that every worker applies the same filter during expansion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich import filesize
from rich.table import Table

from trolley_tasks.cli.common import CliUsageError, console
from trolley_tasks.engine.api import Preview
from trolley_tasks.engine.settings import Settings
from trolley_tasks.series_filter import SeriesFilter, merge_filters

IncludeModality = Annotated[
    list[str] | None,
    typer.Option("--include-modality", metavar="MOD", help="Keep only series of this Modality (repeatable)."),
]
ExcludeModality = Annotated[
    list[str] | None,
    typer.Option("--exclude-modality", metavar="MOD", help="Leave out series of this Modality (repeatable)."),
]
IncludeDescription = Annotated[
    str,
    typer.Option("--include-series-description", metavar="REGEX", help="Keep only series whose description matches."),
]
ExcludeDescription = Annotated[
    str,
    typer.Option(
        "--exclude-series-description",
        metavar="REGEX",
        help="Leave out series whose description matches, e.g. 'scout|localizer'.",
    ),
]
MinInstances = Annotated[
    int | None, typer.Option("--min-instances", min=0, metavar="N", help="Leave out series with fewer instances.")
]
ExcludeSopClass = Annotated[
    list[str] | None,
    typer.Option("--exclude-sop-class", metavar="UID", help="Leave out instances of this SOP Class UID (repeatable)."),
]
FiltersName = Annotated[str, typer.Option("--filters", metavar="NAME", help="A [filters.NAME] table of the config.")]
Deid = Annotated[
    str,
    typer.Option(
        "--deid",
        metavar="PROFILE",
        help="De-identify every file on its way to disk: a [deid.NAME] table, or 'basic' (key from $TROLLEY_DEID_KEY).",
    ),
]
LinkTable = Annotated[
    Path | None,
    typer.Option(
        "--link-table", metavar="PATH", help="With --deid: write the original-to-pseudonym table here (0600)."
    ),
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print what would be kept and excluded, and the size; queue nothing.")
]


def series_filter(
    settings: Settings,
    name: str,
    *,
    include_modality: list[str] | None,
    exclude_modality: list[str] | None,
    include_series_description: str,
    exclude_series_description: str,
    min_instances: int | None,
    exclude_sop_class: list[str] | None,
) -> SeriesFilter | None:
    """The export's filter, or None when neither ``--filters`` nor any filter option was given."""
    base = settings.series_filter(name) if name else None
    try:
        merged = merge_filters(
            base,
            include_modality=include_modality,
            exclude_modality=exclude_modality,
            include_series_description=include_series_description,
            exclude_series_description=exclude_series_description,
            min_instances=min_instances,
            exclude_sop_class=exclude_sop_class,
        )
    except ValidationError as exc:
        raise CliUsageError(f"series filter: {exc.errors()[0]['msg']}") from None
    return merged if merged.active else None


def check_deid(settings: Settings, name: str, link_table: Path | None) -> None:
    """Refuse a de-identified export whose profile is unknown or whose key is missing (exit 2, one line), before
    anything starts; and a linking table without ``--deid``."""
    if not name:
        if link_table is not None:
            raise CliUsageError("--link-table needs --deid PROFILE")
        return
    settings.deid_profile(name).read_key(f"[deid.{name}]")


def print_preview(result: Preview) -> None:
    """The dry run's answer: every series with its verdict, then the totals and the size estimate."""
    table = Table(title="dry run: nothing was queued", title_justify="left")
    for column in ("StudyInstanceUID", "SeriesInstanceUID", "modality", "description", "instances", "verdict"):
        table.add_column(column, overflow="fold")
    for item in result.series:
        verdict = "kept" if item.rule is None else f"excluded: {item.rule}"
        table.add_row(item.study_uid, item.series_uid, item.modality, item.description, str(item.instances), verdict)
    console.print(table)
    for label, (studies, series, instances) in (("kept", result.kept), ("excluded", result.excluded)):
        console.print(f"{label}: {studies} studies, {series} series, {instances} instances")
    if result.sample_size is None:
        console.print("estimated size: unknown (nothing kept to sample)")
    else:
        estimate = filesize.decimal(result.estimated_bytes or 0)
        console.print(
            f"estimated size: {estimate} ({result.kept[2]} instances x {filesize.decimal(result.sample_size)} sampled)"
        )
    for line in result.bad_rows:
        console.print(f"bad row (skipped): {line}")
