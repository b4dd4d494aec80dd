"""DICOMQR (Study Root C-FIND) against the real Orthanc fixture."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from trolley_tasks.core import Query, QueryLevels
from trolley_tasks.errors import StudyNotFoundError
from trolley_tasks.searchers.dicom_qr import DICOMQR, DICOMQuery


@pytest.fixture
def searcher(orthanc: Any) -> Iterator[DICOMQR]:
    qr = DICOMQR("127.0.0.1", orthanc.dicom_port, "TROLLEY", orthanc.aet, timeout=30)
    yield qr
    qr.close()


def test_find_by_patient_id(orthanc: Any, searcher: DICOMQR) -> None:
    item = next(iter(orthanc.cohort))
    studies = searcher.find_studies(Query(PatientID=item.patient_id))
    assert [study.uid for study in studies] == [item.study_uid]
    assert studies[0].data.PatientID == item.patient_id


def test_find_by_accession_number(orthanc: Any, searcher: DICOMQR) -> None:
    item = list(orthanc.cohort)[-1]
    study = searcher.find_study(Query(AccessionNumber=item.accession_number))
    assert study.uid == item.study_uid and study.data.AccessionNumber == item.accession_number


def test_find_by_wildcard_patient_name(orthanc: Any, searcher: DICOMQR) -> None:
    studies = searcher.find_studies(Query(PatientName="TROLLEY^PATIENT*"))
    assert {study.uid for study in studies} == {ref.study_uid for ref in orthanc.cohort.study_refs()}


def test_find_by_date_range(orthanc: Any, searcher: DICOMQR) -> None:
    dates = sorted({item.study_date for item in orthanc.cohort})
    first, second = (datetime.strptime(d, "%Y%m%d") for d in dates[:2])
    studies = searcher.find_studies(Query(min_study_date=first, max_study_date=second))
    expected = {item.study_uid for item in orthanc.cohort if item.study_date in dates[:2]}
    assert {study.uid for study in studies} == expected and len(expected) == 2


@pytest.mark.parametrize("level", list(QueryLevels))
def test_find_study_by_id_depth(orthanc: Any, searcher: DICOMQR, level: QueryLevels) -> None:
    study_uid = orthanc.cohort.study_refs()[0].study_uid
    loaded = orthanc.cohort.in_study(study_uid)
    study = searcher.find_study_by_id(study_uid, level)
    assert study.uid == study_uid
    if level == QueryLevels.STUDY:
        assert study.series == []
    elif level == QueryLevels.SERIES:
        assert {s.uid for s in study.series} == {item.series_uid for item in loaded}
        assert all(s.instances == [] for s in study.series)
    else:
        assert len(study.all_instances()) == len(loaded)
        assert {i.uid for i in study.all_instances()} == {item.sop_instance_uid for item in loaded}
        assert all(str(i.data.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2" for i in study.all_instances())


def test_instance_expansion_reuses_one_association(orthanc: Any, searcher: DICOMQR) -> None:
    """A STUDY, a SERIES and one IMAGE C-FIND per series, then a second expansion: all on one association."""
    refs = orthanc.cohort.study_refs()
    for ref in refs:
        searcher.find_study_by_id(ref.study_uid, QueryLevels.INSTANCE)
    assert searcher.associations.associations_opened == 1


def test_include_fields_come_back_in_data(orthanc: Any, searcher: DICOMQR) -> None:
    item = next(iter(orthanc.cohort))
    query = DICOMQuery(
        PatientID=item.patient_id,
        query_level=QueryLevels.INSTANCE,
        include_fields=["PatientBirthDate", "SeriesDate", "Rows"],
    )
    study = searcher.find_study(query)
    assert study.data.PatientBirthDate
    assert study.series[0].data.SeriesDate == item.study_date
    assert int(study.series[0].instances[0].data.Rows) == orthanc.cohort.rows


def test_series_filters(orthanc: Any, searcher: DICOMQR) -> None:
    assert searcher.find_studies(DICOMQuery(Modality="MR")) == []
    studies = searcher.find_studies(DICOMQuery(Modality="CT", ProtocolName="CHEST*", query_level=QueryLevels.SERIES))
    assert len(studies) == orthanc.cohort.studies
    assert all(s.data.Modality == "CT" for study in studies for s in study.series)


def test_unknown_uid_gives_empty_result(searcher: DICOMQR) -> None:
    assert searcher.find_studies(Query(StudyInstanceUID="1.2.3.4.5.6.7")) == []
    with pytest.raises(StudyNotFoundError):
        searcher.find_study_by_id("1.2.3.4.5.6.7", QueryLevels.INSTANCE)
