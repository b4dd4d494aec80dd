"""Cohort CSV validation: every bad row named by row and column before anything is queued."""

from __future__ import annotations

from pathlib import Path

import pytest

from trolley_tasks.cohort import (
    CohortError,
    CohortRow,
    iter_csv_rows,
    row_from_query,
    rows_from_references,
)
from trolley_tasks.core import InstanceReference, Query, SeriesReference, StudyReference


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cohort.csv"
    path.write_text(text)
    return path


def test_rows_of_every_kind(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "StudyInstanceUID,AccessionNumber,PatientID,StudyDate,StudyDateFrom,StudyDateTo,PatientName\n"
        "1.2.3,,,,,,Doe^John\n"
        ",ACC1,,20240102,,,\n"
        ",,P1,,2024-01-01,2024-01-31,\n"
        ",,P2,20240101-20240105,,,\n"
        ",,,,,,\n",
    )
    rows = [r for r in iter_csv_rows(path) if isinstance(r, CohortRow)]
    assert [r.study_uid for r in rows] == ["1.2.3", "", "", ""]
    assert rows[1].query == {"AccessionNumber": "ACC1", "min_study_date": "2024-01-02", "max_study_date": "2024-01-02"}
    assert rows[2].to_query().min_study_date is not None
    assert rows[3].query["max_study_date"] == "2024-01-05"
    assert CohortRow.from_key(rows[1].key()).key() == rows[1].key()


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("1.2.x,\n", "row 2, column StudyInstanceUID"),
        (",20240101\n", "row 2, column StudyInstanceUID"),  # a date but no identifier
        ("1.2.3,\n1.2.3,20241301\n", "row 3, column StudyDate"),
    ],
)
def test_bad_rows_are_named(tmp_path: Path, body: str, where: str) -> None:
    path = write(tmp_path, "StudyInstanceUID,StudyDate\n" + body)
    with pytest.raises(CohortError) as info:
        list(iter_csv_rows(path))
    assert where in str(info.value) and str(path) in str(info.value)


def test_skip_bad_rows_reports_them(tmp_path: Path) -> None:
    path = write(tmp_path, "StudyInstanceUID,AccessionNumber\n1.2.3,\nnope,\n,A*\n1.2.4,\n")
    rows = list(iter_csv_rows(path, skip_bad_rows=True))
    bad = [row for row in rows if isinstance(row, CohortError)]
    assert len(rows) - len(bad) == 2 and len(bad) == 2
    assert "row 3, column StudyInstanceUID" in str(bad[0]) and "row 4, column AccessionNumber" in str(bad[1])


def test_header_without_identifier_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="row 1"):
        list(iter_csv_rows(write(tmp_path, "PatientName\nDoe\n")))


def test_instance_level_csv_merges_per_study(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID\n1.1,1.1.1,1.1.1.1\n1.1,1.1.1,1.1.1.2\n1.2,1.2.1,1.2.1.1\n",
    )
    rows = list(iter_csv_rows(path))
    assert len(rows) == 2
    assert isinstance(rows[0], CohortRow) and rows[0].instance_uids == ["1.1.1.1", "1.1.1.2"]


def test_references_and_queries() -> None:
    rows = rows_from_references(
        [InstanceReference("1.1", "1.1.1", "1.1.1.1"), SeriesReference("1.2", "1.2.1"), StudyReference("1.1")]
    )
    assert sorted((r.study_uid, r.series_uids) for r in rows) == [("1.1", []), ("1.2", ["1.2.1"])]
    [instances] = rows_from_references([InstanceReference("1.1", "1.1.1", "1.1.1.1")])
    assert CohortRow.from_key(instances.key()).series_of("1.1.1.1") == "1.1.1"
    assert row_from_query(Query(StudyInstanceUID="1.3")).study_uid == "1.3"
    assert row_from_query(Query(PatientID="P1")).query == {"PatientID": "P1"}
    with pytest.raises(CohortError):
        row_from_query(Query())
