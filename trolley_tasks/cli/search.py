"""``trolley-tasks search``: find studies, series or instances on a source, as a table, CSV or JSON.

The CSV is a cohort file for ``export``: a header row, then one row per object, with StudyInstanceUID first (and
SeriesInstanceUID / SOPInstanceUID at deeper levels) so that ``search ... --format csv > cohort.csv`` followed by
``export cohort.csv`` exports exactly what the search found.
"""

from __future__ import annotations

import csv
import inspect
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from trolley_tasks.cli.common import (
    CliUsageError,
    console,
    handles_errors,
    notice,
    option_group,
    start,
)
from trolley_tasks.cli.tables import fit_table
from trolley_tasks.core import Query, QueryLevels, Study, validate_uid

EARLIEST = date(1900, 1, 1)


class Level(StrEnum):
    study = "study"
    series = "series"
    instance = "instance"


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


SourceOption = Annotated[
    str, typer.Option("--source", "-s", metavar="NAME", help="Source profile name: [sources.NAME] in the config.")
]
StudyUidOption = Annotated[
    list[str] | None,
    typer.Option("--study-uid", metavar="UID", help="StudyInstanceUID (repeat the option for several)."),
]
AccessionOption = Annotated[str, typer.Option("--accession", metavar="TEXT", help="AccessionNumber.")]
PatientIdOption = Annotated[str, typer.Option("--patient-id", metavar="TEXT", help="PatientID.")]
PatientNameOption = Annotated[
    str, typer.Option("--patient-name", metavar="TEXT", help="PatientName; DICOM wildcards * and ? work.")
]
ModalityOption = Annotated[str, typer.Option("--modality", metavar="TEXT", help="Modality in study, for example CT.")]
DateFromOption = Annotated[
    str, typer.Option("--date-from", metavar="YYYY-MM-DD", help="First StudyDate, YYYY-MM-DD.", show_default=False)
]
DateToOption = Annotated[
    str, typer.Option("--date-to", metavar="YYYY-MM-DD", help="Last StudyDate, YYYY-MM-DD (inclusive).")
]


def _filter_option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


def parse_day(value: str, option: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise CliUsageError(f"{option} {value!r} is not a date like 2024-01-31") from None


@dataclass(frozen=True)
class Filters:
    """The search filters as the user typed them; :meth:`queries` turns them into searcher queries."""

    study_uids: tuple[str, ...] = ()
    accession: str = ""
    patient_id: str = ""
    patient_name: str = ""
    modality: str = ""
    date_from: str = ""
    date_to: str = ""

    @property
    def given(self) -> bool:
        return any(
            (
                self.study_uids,
                self.accession,
                self.patient_id,
                self.patient_name,
                self.modality,
                self.date_from,
                self.date_to,
            )
        )

    def queries(self, level: QueryLevels = QueryLevels.STUDY) -> list[Query]:
        """One Query per study UID (or one in all when no UID is given). Invalid values raise CliUsageError.

        A lone ``--date-from`` means "from then until today", a lone ``--date-to`` "everything until then".
        """
        for uid in self.study_uids:
            validate_uid(uid, "--study-uid")
        first, last = parse_day(self.date_from, "--date-from"), parse_day(self.date_to, "--date-to")
        values: dict[str, Any] = {
            "AccessionNumber": self.accession,
            "PatientID": self.patient_id,
            "PatientName": self.patient_name,
            "ModalitiesInStudy": self.modality,
            "query_level": level,
        }
        if first or last:
            values["min_study_date"] = datetime.combine(first or EARLIEST, datetime.min.time())
            values["max_study_date"] = datetime.combine(last or date.today(), datetime.min.time())
        try:
            if not self.study_uids:
                return [Query(**values)]
            return [Query(StudyInstanceUID=uid, **values) for uid in self.study_uids]
        except ValidationError as exc:
            message = str(exc.errors()[0].get("msg", "invalid filter")).removeprefix("Value error, ")
            raise CliUsageError(f"search filters: {message}") from None

    @classmethod
    def from_options(
        cls,
        study_uid: list[str] | None,
        accession: str,
        patient_id: str,
        patient_name: str,
        modality: str,
        date_from: str,
        date_to: str,
    ) -> Filters:
        return cls(tuple(study_uid or ()), accession, patient_id, patient_name, modality, date_from, date_to)


NO_FILTERS = Filters()
FILTER_PARAMETERS = (
    _filter_option("study_uid", StudyUidOption, None),
    _filter_option("accession", AccessionOption, ""),
    _filter_option("patient_id", PatientIdOption, ""),
    _filter_option("patient_name", PatientNameOption, ""),
    _filter_option("modality", ModalityOption, ""),
    _filter_option("date_from", DateFromOption, ""),
    _filter_option("date_to", DateToOption, ""),
)
with_filters = option_group("filters", FILTER_PARAMETERS, Filters.from_options)
"""The search filters, declared once for ``search`` and ``export``: the command receives them as one ``filters``."""


STUDY_COLUMNS = (
    "StudyInstanceUID",
    "AccessionNumber",
    "PatientID",
    "PatientName",
    "StudyDate",
    "ModalitiesInStudy",
    "StudyDescription",
)
SERIES_COLUMNS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription")
INSTANCE_COLUMNS = ("SOPInstanceUID", "InstanceNumber")


def columns_for(level: Level) -> tuple[str, ...]:
    """UIDs first, deepest level last, so the first columns always identify what to export."""
    if level is Level.study:
        return STUDY_COLUMNS
    if level is Level.series:
        return ("StudyInstanceUID", "SeriesInstanceUID", *STUDY_COLUMNS[1:], *SERIES_COLUMNS[1:])
    return (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        *STUDY_COLUMNS[1:],
        *SERIES_COLUMNS[1:],
        *INSTANCE_COLUMNS[1:],
    )


def choose_columns(text: str, level: Level) -> tuple[str, ...]:
    """The columns ``--columns`` names (all of the level's when empty); CliUsageError for one the level lacks."""
    available = columns_for(level)
    if not text.strip():
        return available
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise CliUsageError(
            f"--columns: {', '.join(unknown)} not shown at level {level.value} (choose from {', '.join(available)})"
        )
    return chosen


def _value(data: Any, keyword: str) -> str:
    value = getattr(data, keyword, "")
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def rows(studies: list[Study], level: Level) -> Iterator[dict[str, str]]:
    """One row per object of ``level``; each row has the study's attributes, then its series' and instance's."""
    for study in studies:
        base = {key: _value(study.data, key) for key in STUDY_COLUMNS}
        base["StudyInstanceUID"] = study.uid
        if level is Level.study:
            yield base
            continue
        for series in study.series:
            with_series = dict(base, **{key: _value(series.data, key) for key in SERIES_COLUMNS})
            with_series["SeriesInstanceUID"] = series.uid
            if level is Level.series:
                yield with_series
                continue
            for instance in series.instances:
                row = dict(with_series, **{key: _value(instance.data, key) for key in INSTANCE_COLUMNS})
                row["SOPInstanceUID"] = instance.uid
                yield row


@with_filters
@handles_errors
def search(
    ctx: typer.Context,
    source: SourceOption,
    filters: Filters = NO_FILTERS,
    level: Annotated[Level, typer.Option("--level", help="Depth of the answer.")] = Level.study,
    output_format: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
    columns: Annotated[
        str,
        typer.Option(
            "--columns",
            metavar="LIST",
            help="Comma-separated attributes to show, in order (default: every one of the level; see --help).",
        ),
    ] = "",
) -> None:
    """Find studies, series or instances on a source.

    Example:

    \b
        trolley-tasks search --source orthanc --modality CT --date-from 2024-01-01 \\
            --date-to 2024-01-31 --format csv > cohort.csv
    """
    settings = start(ctx)
    chosen = choose_columns(columns, level)
    depth = {Level.study: QueryLevels.STUDY, Level.series: QueryLevels.SERIES, Level.instance: QueryLevels.INSTANCE}
    queries = filters.queries(depth[level])  # bad filters are refused before the PACS is asked anything
    profile = settings.source(source)
    from trolley_tasks.profiles import build_searcher

    searcher = build_searcher(profile, source)
    studies: dict[str, Study] = {}
    for query in queries:
        for study in searcher.find_studies(query):
            studies.setdefault(study.uid, study)
    write_rows(list(rows(list(studies.values()), level)), chosen, output_format)


def write_rows(found: list[dict[str, str]], columns: tuple[str, ...], output_format: OutputFormat) -> None:
    if output_format is OutputFormat.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(found)
    elif output_format is OutputFormat.json:
        sys.stdout.write(json.dumps([{c: row.get(c, "") for c in columns} for row in found], indent=2) + "\n")
    else:
        uids = [column for column in columns if column.endswith("UID")]
        fitted = fit_table(columns, found, console.width, whole=uids, caption=f"{len(found)} found")
        console.print(fitted.table)
        if fitted.left_out:
            notice(
                f"left out at {console.width} columns: {', '.join(fitted.left_out)} "
                "(choose with --columns, or --format csv)"
            )
