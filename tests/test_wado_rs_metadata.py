"""WADO-RS metadata as a searcher: against the real Orthanc, and its failure mapping on a local fake."""

from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import STANDARD_COHORT, RunningOrthanc
from tests.fakehttp import FakeHTTPServer, FakeRequest, Reply
from trolley_tasks.core import Query, QueryLevels
from trolley_tasks.errors import PayloadInvalidError, ServerError, StudyNotFoundError, UnSupportedParameterError
from trolley_tasks.searchers.wado_rs_metadata import WadoRSMetadata

ITEM = STANDARD_COHORT.instance(2, 1, 0)


@pytest.fixture
def metadata(orthanc: RunningOrthanc) -> WadoRSMetadata:
    return WadoRSMetadata(requests.Session(), orthanc.dicomweb_url)


def test_find_study_by_id_at_every_depth(metadata: WadoRSMetadata) -> None:
    loaded = STANDARD_COHORT.in_study(ITEM.study_uid)
    full = metadata.find_study_by_id(ITEM.study_uid, QueryLevels.INSTANCE)
    assert sorted(i.uid for i in full.all_instances()) == sorted(item.sop_instance_uid for item in loaded)
    assert len(full.all_instances()) == 6
    instance = full.all_instances()[0]
    assert instance.data.Rows == 512 and instance.data.PatientID == ITEM.patient_id
    assert "PixelData" in instance.data and instance.data.PixelData is None  # BulkDataURI: kept, not fetched
    assert full.data.AccessionNumber == ITEM.accession_number
    series = metadata.find_study_by_id(ITEM.study_uid, QueryLevels.SERIES)
    assert len(series.series) == 2 and series.all_instances() == []
    study = metadata.find_study_by_id(ITEM.study_uid, QueryLevels.STUDY)
    assert study.series == [] and study.data.PatientID == ITEM.patient_id


def test_find_studies_by_study_and_series_uid(metadata: WadoRSMetadata) -> None:
    (study,) = metadata.find_studies(
        Query(StudyInstanceUID=ITEM.study_uid, SeriesInstanceUID=ITEM.series_uid, query_level=QueryLevels.INSTANCE)
    )
    assert [s.uid for s in study.series] == [ITEM.series_uid] and len(study.all_instances()) == 3


def test_unknown_uid(metadata: WadoRSMetadata) -> None:
    assert metadata.find_studies(Query(StudyInstanceUID="1.2.3.4.5.6")) == []
    with pytest.raises(StudyNotFoundError):
        metadata.find_study_by_id("1.2.3.4.5.6", QueryLevels.INSTANCE)


@pytest.mark.parametrize(
    "query",
    [Query(PatientID="x"), Query(StudyInstanceUID="1.2.*"), Query(StudyInstanceUID="1.2", AccessionNumber="A")],
    ids=["no-uid", "wildcard", "extra-filter"],
)
def test_searching_is_not_supported(query: Query) -> None:
    searcher = WadoRSMetadata(requests.Session(), "http://127.0.0.1:9/dicom-web")
    with pytest.raises(UnSupportedParameterError, match="cannot search"):
        searcher.find_studies(query)


def test_status_is_checked_and_bad_json_is_invalid() -> None:
    def handler(request: FakeRequest) -> Reply:
        if "1.2.500" in request.path:
            return Reply(500, b"oops")
        if "1.2.204" in request.path:
            return Reply(204)
        if "1.2.7" in request.path:
            return Reply(200, json.dumps({"not": "a list"}).encode())
        return Reply(200, b"<html>login</html>")

    with FakeHTTPServer(handler) as server:
        searcher = WadoRSMetadata(requests.Session(), server.url)
        with pytest.raises(ServerError):
            searcher.find_study_by_id("1.2.500", QueryLevels.INSTANCE)
        with pytest.raises(StudyNotFoundError):
            searcher.find_study_by_id("1.2.204", QueryLevels.INSTANCE)
        with pytest.raises(PayloadInvalidError, match="expected a JSON array"):
            searcher.find_study_by_id("1.2.7", QueryLevels.INSTANCE)
        with pytest.raises(PayloadInvalidError, match="not JSON"):
            searcher.find_study_by_id("1.2.8", QueryLevels.INSTANCE)
