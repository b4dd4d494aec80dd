"""Cohort input: a CSV file, a list of references, or a Query, turned into expansion rows. Streams.

A cohort CSV has a header and one row per study (or per series or instance, as ``trolley-tasks search --format csv``
writes at deeper levels). Columns, by name, case-sensitive as DICOM keywords:

- ``StudyInstanceUID``: the study. When present and not empty it identifies the row; other identifiers are kept
  for the record only.
- ``SeriesInstanceUID``, ``SOPInstanceUID``: restrict the row to those series / instances of its study.
- ``AccessionNumber`` or ``PatientID``: searched on the source when the row has no StudyInstanceUID; every study
  they match is exported.
- ``StudyDate`` (``YYYYMMDD``, ``YYYY-MM-DD`` or a DICOM range ``YYYYMMDD-YYYYMMDD``), or ``StudyDateFrom`` and
  ``StudyDateTo``: restrict an AccessionNumber/PatientID search to those dates (inclusive).
- Any other column (PatientName, Modality, ...) is informational and ignored.

Every row is validated as it is read (:func:`iter_csv_rows`): a bad row is a :class:`CohortError`
naming the file, the row (the line number, header = 1) and the column. Consecutive rows of the same study (a
series- or instance-level CSV) become one row with the union of their filters, so a study is expanded once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from trolley_tasks.core import (
    InstanceReference,
    Query,
    QueryLevels,
    SeriesReference,
    StudyReference,
    is_valid_uid,
)
from trolley_tasks.errors import UsageError

UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
SEARCH_COLUMNS = ("AccessionNumber", "PatientID")
_DATE_RE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
_MAX_LENGTH = {"AccessionNumber": 16, "PatientID": 64}  # PS3.5 6.2: SH and LO value lengths


class CohortError(UsageError):
    """A cohort row is wrong. The message names the file, the row and the column; nothing was queued."""


@dataclass
class CohortRow:
    """One unit of expansion: a study (maybe restricted to some series/instances) or a search.

    ``key()`` is the row's canonical JSON, and :meth:`row_id` a digest of it. A search row's key holds patient data
    (a PatientID, an AccessionNumber): so the engine keeps the row itself in one place only (the ledger's row store,
    :meth:`record`), and everything that travels -- task messages, events, logs -- names the row by its id and its
    line in the cohort file (:meth:`describe` shows no values of a search).
    """

    study_uid: str = ""
    series_uids: list[str] = field(default_factory=list)
    instance_uids: list[str] = field(default_factory=list)
    query: dict[str, Any] = field(default_factory=dict)
    """For a search row: the Query's non-default values (AccessionNumber / PatientID / dates)."""
    line: int = 0

    def key(self) -> str:
        data: dict[str, Any] = {}
        if self.study_uid:
            data["st"] = self.study_uid
            if self.instance_uids:
                # instance rows keep their series: (series, instance) pairs, parallel in the lists
                data["in"] = sorted({(se, uid) for se, uid in zip(self.series_uids, self.instance_uids, strict=True)})
            elif self.series_uids:
                data["se"] = sorted(set(self.series_uids))
        else:
            data["q"] = self.query
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def row_id(self) -> str:
        """A digest of :meth:`key`: the row's name in messages and logs (it reveals nothing of the row)."""
        return hashlib.sha256(self.key().encode()).hexdigest()[:24]

    def record(self) -> str:
        """What the ledger's row store keeps: the key and the row's line in the cohort file."""
        return json.dumps({"key": self.key(), "line": self.line}, separators=(",", ":"))

    @classmethod
    def from_record(cls, record: str) -> CohortRow:
        data = json.loads(record)
        row = cls.from_key(data["key"])
        row.line = int(data.get("line") or 0)
        return row

    @classmethod
    def from_key(cls, key: str) -> CohortRow:
        data = json.loads(key)
        pairs = data.get("in", ())
        return cls(
            study_uid=data.get("st", ""),
            series_uids=[se for se, _ in pairs] if pairs else list(data.get("se", ())),
            instance_uids=[uid for _, uid in pairs],
            query=dict(data.get("q", {})),
        )

    def series_of(self, instance_uid: str) -> str:
        """The series the cohort names for one of this row's instances."""
        return self.series_uids[self.instance_uids.index(instance_uid)]

    def to_query(self) -> Query:
        """The study-level search this row stands for (search rows only)."""
        return Query(**self.query, query_level=QueryLevels.STUDY)

    def describe(self) -> str:
        """The row for logs, failure records and the report: its line and what it names, never a search's values
        (``cohort line 12: search by AccessionNumber, StudyDate``)."""
        where = f"cohort line {self.line}: " if self.line else ""
        if self.study_uid:
            if self.instance_uids:
                return f"{where}StudyInstanceUID={self.study_uid} ({len(self.instance_uids)} instances)"
            if self.series_uids:
                return f"{where}StudyInstanceUID={self.study_uid} ({len(self.series_uids)} series)"
            return f"{where}StudyInstanceUID={self.study_uid}"
        return f"{where}search by {', '.join(sorted(self.query))} (row {self.row_id()})"


def _parse_date(value: str) -> date:
    match = _DATE_RE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a date (YYYYMMDD or YYYY-MM-DD)")
    return date(int(match.group(1)), int(match.group(2)), int(match.group(3)))


def _date_range(values: dict[str, str]) -> tuple[date, date] | None:
    """(first, last) from StudyDate or StudyDateFrom/StudyDateTo; raises ValueError naming the column."""
    single = values.get("StudyDate", "").strip()
    first_text, last_text = values.get("StudyDateFrom", "").strip(), values.get("StudyDateTo", "").strip()
    if single and (first_text or last_text):
        raise ValueError("StudyDate|give StudyDate or StudyDateFrom/StudyDateTo, not both")
    if single:
        if "-" in single and not _DATE_RE.match(single):
            start, _, end = single.partition("-")
            try:
                first, last = _parse_date(start), _parse_date(end)
            except ValueError as exc:
                raise ValueError(f"StudyDate|{exc}") from None
        else:
            try:
                first = last = _parse_date(single)
            except ValueError as exc:
                raise ValueError(f"StudyDate|{exc}") from None
    elif first_text or last_text:
        try:
            first = _parse_date(first_text) if first_text else date(1900, 1, 1)
        except ValueError as exc:
            raise ValueError(f"StudyDateFrom|{exc}") from None
        try:
            last = _parse_date(last_text) if last_text else date.today()
        except ValueError as exc:
            raise ValueError(f"StudyDateTo|{exc}") from None
    else:
        return None
    if first > last:
        raise ValueError(f"{'StudyDate' if single else 'StudyDateTo'}|the range ends before it starts")
    return first, last


def parse_row(values: dict[str, str]) -> CohortRow:
    """One CSV row as a :class:`CohortRow`; ValueError ``"column|reason"`` when it is wrong."""
    clean = {k: (v or "").strip() for k, v in values.items() if k}
    for column in UID_COLUMNS:
        if clean.get(column) and not is_valid_uid(clean[column]):
            raise ValueError(f"{column}|{clean[column]!r} is not a DICOM UID (digits and dots, at most 64)")
    study = clean.get("StudyInstanceUID", "")
    if (clean.get("SeriesInstanceUID") or clean.get("SOPInstanceUID")) and not study:
        column = "SeriesInstanceUID" if clean.get("SeriesInstanceUID") else "SOPInstanceUID"
        raise ValueError(f"{column}|a series or instance needs its StudyInstanceUID on the same row")
    if clean.get("SOPInstanceUID") and not clean.get("SeriesInstanceUID"):
        raise ValueError("SOPInstanceUID|an instance needs its SeriesInstanceUID on the same row")
    dates = _date_range(clean)
    if study:
        return CohortRow(
            study_uid=study,
            series_uids=[clean["SeriesInstanceUID"]] if clean.get("SeriesInstanceUID") else [],
            instance_uids=[clean["SOPInstanceUID"]] if clean.get("SOPInstanceUID") else [],
        )
    query: dict[str, Any] = {}
    for column in SEARCH_COLUMNS:
        value = clean.get(column, "")
        if value:
            if len(value) > _MAX_LENGTH[column] or "\\" in value or "*" in value or "?" in value:
                raise ValueError(  # the value itself is patient data: the row and column name it well enough
                    f"{column}|not a single {column} (at most {_MAX_LENGTH[column]} characters, "
                    "no backslash or wildcard)"
                )
            query[column] = value
    if not query:
        raise ValueError("StudyInstanceUID|the row has no StudyInstanceUID, AccessionNumber or PatientID")
    if dates:
        query["min_study_date"] = dates[0].isoformat()
        query["max_study_date"] = dates[1].isoformat()
    Query(**query)  # the model's own checks (date order)
    return CohortRow(query=query)


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise CohortError(f"{path}: cannot read the cohort: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        try:
            header = reader.fieldnames or []
            if not set(header) & {"StudyInstanceUID", *SEARCH_COLUMNS}:
                raise CohortError(
                    f"{path}: row 1: the header names none of StudyInstanceUID, AccessionNumber, PatientID "
                    f"(found: {', '.join(h for h in header if h) or 'nothing'})"
                )
            for values in reader:
                line = reader.line_num
                if None in values:
                    raise CohortError(f"{path}: row {line}: more values than header columns")
                if not any((v or "").strip() for v in values.values()):
                    continue
                yield line, values
        except UnicodeDecodeError as exc:  # found by tests/test_fuzz.py: a file saved as Latin-1 or UTF-16
            raise CohortError(
                f"{path}: row {reader.line_num + 1}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                "save the cohort as UTF-8 CSV"
            ) from None
        except csv.Error as exc:
            raise CohortError(f"{path}: row {reader.line_num}: not a CSV file: {exc}") from None


def iter_csv_rows(path: str | Path, *, skip_bad_rows: bool = False) -> Iterator[CohortRow | CohortError]:
    """The rows of a cohort file, merged per study (see the module docstring).

    With ``skip_bad_rows`` a bad row is yielded as its :class:`CohortError` (the caller records it) instead of
    being raised. Memory holds one study's rows at a time.
    """
    path = Path(path)
    pending: CohortRow | None = None
    for line, values in _rows(path):
        try:
            row = parse_row(values)
        except ValueError as exc:
            column, _, reason = str(exc).partition("|")
            if not reason:
                column, reason = "StudyDate", column
            error = CohortError(f"{path}: row {line}, column {column}: {reason}")
            if not skip_bad_rows:
                raise error from None
            yield error
            continue
        row.line = line
        if pending is not None and row.study_uid and row.study_uid == pending.study_uid:
            same_level = bool(row.instance_uids) == bool(pending.instance_uids)
            if row.series_uids and pending.series_uids and same_level:
                pending.series_uids += row.series_uids
                pending.instance_uids += row.instance_uids
                continue
            if not (row.series_uids or row.instance_uids or pending.series_uids or pending.instance_uids):
                continue  # the same study twice
        if pending is not None:
            yield pending
        pending = row
    if pending is not None:
        yield pending


def rows_from_references(references: Iterable[StudyReference | SeriesReference | InstanceReference]) -> list[CohortRow]:
    """Rows for a list of references: per study, one row of its named series and one of its named instances (or
    one whole-study row when the study itself is named), in order of first appearance."""
    rows: dict[tuple[str, str], CohortRow] = {}
    for ref in references:
        if isinstance(ref, InstanceReference):
            row = rows.setdefault((ref.study_uid, "instance"), CohortRow(study_uid=ref.study_uid))
            row.series_uids.append(ref.series_uid)
            row.instance_uids.append(ref.instance_uid)
        elif isinstance(ref, SeriesReference):
            rows.setdefault((ref.study_uid, "series"), CohortRow(study_uid=ref.study_uid)).series_uids.append(
                ref.series_uid
            )
        elif isinstance(ref, StudyReference):
            rows.setdefault((ref.study_uid, "study"), CohortRow(study_uid=ref.study_uid))
        else:
            raise CohortError(f"cohort item {ref!r} is not a study, series or instance reference")
    whole = {study for study, kind in rows if kind == "study"}
    return [row for (study, kind), row in rows.items() if kind == "study" or study not in whole]


def row_from_query(query: Query) -> CohortRow:
    """A search row for a Query: every study it matches is exported (its query level is not used)."""
    values = query.non_default_values()
    values.pop("query_level", None)
    values.pop("include_fields", None)
    for name in ("min_study_date", "max_study_date"):
        if isinstance(values.get(name), datetime):
            values[name] = values[name].date().isoformat()
    if not values:
        raise CohortError("the query matches every study on the source; give at least one filter")
    if "StudyInstanceUID" in values and len(values) == 1 and is_valid_uid(values["StudyInstanceUID"]):
        return CohortRow(study_uid=values["StudyInstanceUID"])
    return CohortRow(query=values)
