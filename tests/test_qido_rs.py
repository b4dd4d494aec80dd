"""QIDO-RS: query forms and their rules, paging, and the searcher against the real Orthanc fixture."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

import pytest
import requests
from pydantic import ValidationError
from pydicom import Dataset

from testbed.cohort import generate_cohort
from tests.conftest import STANDARD_COHORT, RunningOrthanc
from tests.fakehttp import FakeHTTPServer, FakeRequest, Reply
from trolley_tasks.core import ExtendedQuery, Query, QueryLevels
from trolley_tasks.errors import PayloadInvalidError, StudyNotFoundError, UnSupportedParameterError
from trolley_tasks.searchers.qido_rs import HierarchicalQuery, IncompleteResultError, QidoRS, RelationalQuery
from trolley_tasks.searchers.qido_rs_paging import warning_says_truncated
from trolley_tasks.searchers.qido_rs_query import choose_query_type, query_string

STUDY_1 = STANDARD_COHORT.instance(1, 0, 0)

# --------------------------------------------------------------------------------------------------------------------
# Query forms (no server)


def test_hierarchical_rules_follow_dicomtrolley() -> None:
    with pytest.raises(ValidationError, match="needs its StudyInstanceUID"):
        HierarchicalQuery(SeriesInstanceUID="1.2")
    with pytest.raises(ValidationError, match="SERIES-level hierarchical query needs a StudyInstanceUID"):
        HierarchicalQuery(query_level=QueryLevels.SERIES)
    with pytest.raises(ValidationError, match="needs a SeriesInstanceUID"):
        HierarchicalQuery(StudyInstanceUID="1.2", query_level=QueryLevels.INSTANCE)
    q = HierarchicalQuery(StudyInstanceUID="1.2", SeriesInstanceUID="1.3", query_level=QueryLevels.INSTANCE)
    assert q.uri_base() == "/studies/1.2/series/1.3/instances"
    assert q.uri_search_params() == {}


def test_relational_is_for_series_and_instances_only() -> None:
    with pytest.raises(ValidationError, match="SERIES or INSTANCE"):
        RelationalQuery(PatientID="P1")
    assert RelationalQuery(query_level=QueryLevels.SERIES).uri_base() == "/series"
    assert RelationalQuery(query_level=QueryLevels.INSTANCE).uri_base() == "/instances"
    q = RelationalQuery(StudyInstanceUID="1.2", query_level=QueryLevels.INSTANCE)
    assert q.uri_base() == "/studies/1.2/instances"


def test_plain_query_conversion_is_an_explicit_choice() -> None:
    assert choose_query_type(Query(PatientID="P")) is HierarchicalQuery
    assert choose_query_type(Query(StudyInstanceUID="1.2", query_level=QueryLevels.SERIES)) is HierarchicalQuery
    assert choose_query_type(Query(query_level=QueryLevels.INSTANCE)) is RelationalQuery
    assert choose_query_type(Query(StudyInstanceUID="1.2", query_level=QueryLevels.INSTANCE)) is RelationalQuery
    with pytest.raises(UnSupportedParameterError, match="relational queries are disabled"):
        choose_query_type(Query(query_level=QueryLevels.INSTANCE), relational=False)


def test_query_that_would_lose_a_value_is_refused() -> None:
    class WithModality(ExtendedQuery):
        Modality: str = ""

    searcher = QidoRS(requests.Session(), "http://127.0.0.1:9/dicom-web")
    with pytest.raises(UnSupportedParameterError, match="Modality"):
        searcher.ensure_query_type(WithModality(Modality="CT"))


def test_search_parameters_dates_wildcards_includefield_fuzzy() -> None:
    q = HierarchicalQuery(
        PatientName="TROLLEY*",
        min_study_date=datetime(2024, 1, 1),
        max_study_date=datetime(2024, 1, 2),
        include_fields=["PatientBirthDate", "all"],
        fuzzymatching=True,
    )
    assert query_string(q.uri_search_params()) == (
        "PatientName=TROLLEY*&StudyDate=20240101-20240102&includefield=PatientBirthDate&includefield=all"
        "&fuzzymatching=true"
    )
    assert query_string([("PatientName", "A B&C")]) == "PatientName=A%20B%26C"
    with pytest.raises(ValidationError, match="neither DICOM keywords"):
        HierarchicalQuery(include_fields=["NotAKeyword"])
    with pytest.raises(ValidationError):
        HierarchicalQuery(limit=-1)


def test_warning_header_detection() -> None:
    assert warning_says_truncated({"Warning": '299 pacs: "There are 3 additional results that can be requested"'})
    assert warning_says_truncated(
        {"Warning": '299 {SERVICE}: "The number of results exceeded the maximum supported by the server."'}
    )
    assert not warning_says_truncated({"Warning": '299 pacs: "The fuzzymatching parameter is not supported."'})
    assert not warning_says_truncated({})


# --------------------------------------------------------------------------------------------------------------------
# Paging against local fakes


def _instance_json(study: str, series: str, sop: str) -> dict[str, object]:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    return ds.to_json_dict()


ALL = [_instance_json("1.2", "1.2.3", f"1.2.3.{n}") for n in range(1, 8)]


def _paging_server(*, honour_offset: bool, cap: int, warn: bool) -> Callable[[FakeRequest], Reply]:
    def handler(request: FakeRequest) -> Reply:
        offset = int(request.param("offset", "0")) if honour_offset else 0
        limit = min(int(request.param("limit", str(cap))), cap)
        page = ALL[offset : offset + limit]
        headers = {"Content-Type": "application/dicom+json"}
        if warn and offset + limit < len(ALL):
            headers["Warning"] = f'299 fake: "There are {len(ALL) - offset - limit} additional results"'
        return Reply(200, json.dumps(page).encode(), headers)

    return handler


def test_paging_follows_warning_header_until_complete() -> None:
    with FakeHTTPServer(_paging_server(honour_offset=True, cap=3, warn=True)) as server:
        datasets = QidoRS(requests.Session(), server.url).search(RelationalQuery(query_level=QueryLevels.INSTANCE))
        offsets = [r.param("offset", "0") for r in server.requests]
    assert [ds.SOPInstanceUID for ds in datasets] == [f"1.2.3.{n}" for n in range(1, 8)]
    assert offsets == ["0", "3", "6"]


def test_paging_by_page_size_until_a_short_page() -> None:
    with FakeHTTPServer(_paging_server(honour_offset=True, cap=100, warn=False)) as server:
        searcher = QidoRS(requests.Session(), server.url, page_size=2)
        datasets = searcher.search(RelationalQuery(query_level=QueryLevels.INSTANCE))
        assert [r.param("limit") for r in server.requests] == ["2", "2", "2", "2"]
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets) == 7


def test_user_limit_and_offset_are_a_slice() -> None:
    with FakeHTTPServer(_paging_server(honour_offset=True, cap=2, warn=True)) as server:
        query = RelationalQuery(query_level=QueryLevels.INSTANCE, limit=3, offset=1)
        datasets = QidoRS(requests.Session(), server.url).search(query)
    assert [ds.SOPInstanceUID for ds in datasets] == ["1.2.3.2", "1.2.3.3", "1.2.3.4"]


@pytest.mark.parametrize("warn", [True, False], ids=["warning", "full-page"])
def test_server_ignoring_offset_raises_instead_of_looping(warn: bool) -> None:
    with FakeHTTPServer(_paging_server(honour_offset=False, cap=2, warn=warn)) as server:
        searcher = QidoRS(requests.Session(), server.url, page_size=None if warn else 2)
        with pytest.raises(PayloadInvalidError, match="ignore 'offset'"):
            searcher.search(RelationalQuery(query_level=QueryLevels.INSTANCE))
        assert len(server.requests) == 2


def test_warning_then_nothing_is_incomplete() -> None:
    def handler(request: FakeRequest) -> Reply:
        if request.param("offset"):
            return Reply(204)
        return Reply(200, json.dumps(ALL[:2]).encode(), {"Warning": '299 x: "5 additional results"'})

    with FakeHTTPServer(handler) as server, pytest.raises(IncompleteResultError, match="was cut"):
        QidoRS(requests.Session(), server.url).search(RelationalQuery(query_level=QueryLevels.INSTANCE))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's own note on the bad UID
def test_204_is_no_results_and_invalid_uid_is_the_servers_fault() -> None:
    bad = [{**_instance_json("1.2", "1.2.3", "1.2.3.4"), "00080018": {"vr": "UI", "Value": ["not-a-uid"]}}]

    def handler(request: FakeRequest) -> Reply:
        if request.path == "/instances":
            return Reply(200, json.dumps(bad).encode())
        return Reply(204)

    with FakeHTTPServer(handler) as server:
        searcher = QidoRS(requests.Session(), server.url)
        assert searcher.find_studies(Query(PatientID="nobody")) == []
        with pytest.raises(PayloadInvalidError, match="invalid SOPInstanceUID"):
            searcher.search(RelationalQuery(query_level=QueryLevels.INSTANCE))
        assert server.requests[0].headers["Accept"] == "application/dicom+json"
        assert server.requests[0].headers["Accept-Encoding"] == "identity"


# --------------------------------------------------------------------------------------------------------------------
# The real Orthanc


@pytest.fixture
def qido(orthanc: RunningOrthanc) -> QidoRS:
    return QidoRS(requests.Session(), orthanc.dicomweb_url)


def test_find_by_patient_id_accession_wildcard_and_date_range(qido: QidoRS) -> None:
    by_pid = qido.find_studies(Query(PatientID=STUDY_1.patient_id))
    assert [s.uid for s in by_pid] == [STUDY_1.study_uid]
    assert by_pid[0].data.PatientID == STUDY_1.patient_id
    by_acc = qido.find_study(Query(AccessionNumber=STUDY_1.accession_number))
    assert by_acc.uid == STUDY_1.study_uid
    # Orthanc's DICOMweb plugin 1.7 does not match '^' in a PN query: wildcard on either side of it instead.
    by_name = qido.find_studies(Query(PatientName="TROLLEY*"))
    assert {s.uid for s in by_name} == {r.study_uid for r in STANDARD_COHORT.study_refs()}
    ranged = qido.find_studies(Query(min_study_date=datetime(2024, 1, 2), max_study_date=datetime(2024, 1, 3)))
    assert {s.uid for s in ranged} == {STUDY_1.study_uid, STANDARD_COHORT.instance(2, 0, 0).study_uid}


@pytest.mark.parametrize("relational", [True, False], ids=["relational", "per-series"])
def test_find_study_by_id_at_every_depth(orthanc: RunningOrthanc, relational: bool) -> None:
    qido = QidoRS(requests.Session(), orthanc.dicomweb_url, relational=relational)
    loaded = STANDARD_COHORT.in_study(STUDY_1.study_uid)
    study = qido.find_study_by_id(STUDY_1.study_uid, QueryLevels.STUDY)
    assert study.series == [] and study.data.AccessionNumber == STUDY_1.accession_number
    series_level = qido.find_study_by_id(STUDY_1.study_uid, QueryLevels.SERIES)
    assert {s.uid for s in series_level.series} == {item.series_uid for item in loaded}
    assert all(not s.instances for s in series_level.series)
    full = qido.find_study_by_id(STUDY_1.study_uid, QueryLevels.INSTANCE)
    assert sorted(i.uid for i in full.all_instances()) == sorted(item.sop_instance_uid for item in loaded)
    assert len(full.all_instances()) == len(loaded) == 6
    assert full.all_instances()[0].data.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"


def test_include_fields_come_back_in_data(qido: QidoRS) -> None:
    study = qido.find_study(Query(PatientID=STUDY_1.patient_id, include_fields=["PatientBirthDate", "StudyID"]))
    assert study.data.PatientBirthDate == "19510101" and study.data.StudyID == "2"
    deep = qido.find_studies(
        Query(PatientID=STUDY_1.patient_id, query_level=QueryLevels.INSTANCE, include_fields=["InstanceNumber"])
    )
    assert sorted(int(i.data.InstanceNumber) for i in deep[0].all_instances()) == [1, 1, 2, 2, 3, 3]


def test_unknown_uid_is_empty_not_an_error(qido: QidoRS) -> None:
    assert qido.find_studies(Query(StudyInstanceUID="1.2.3.4.5.6.7")) == []
    assert qido.find_studies(Query(StudyInstanceUID="1.2.3.4.5.6.7", query_level=QueryLevels.INSTANCE)) == []
    with pytest.raises(StudyNotFoundError):
        qido.find_study_by_id("1.2.3.4.5.6.7", QueryLevels.INSTANCE)


def test_client_paging_against_orthanc_returns_every_instance_once(orthanc: RunningOrthanc) -> None:
    qido = QidoRS(requests.Session(), orthanc.dicomweb_url, page_size=2)
    flat = qido.search(RelationalQuery(query_level=QueryLevels.INSTANCE))
    uids = [ds.SOPInstanceUID for ds in flat]
    assert sorted(uids) == sorted(ref.instance_uid for ref in STANDARD_COHORT.instance_refs())
    studies = qido.find_studies(Query(PatientName="TROLLEY*", query_level=QueryLevels.INSTANCE))
    found = [i.uid for s in studies for i in s.all_instances()]
    assert len(found) == len(set(found)) == len(STANDARD_COHORT) == 18


def test_orthanc_result_limit_is_detected_and_worked_around(orthanc_factory: Callable[..., RunningOrthanc]) -> None:
    """Orthanc 1.10 with LimitFindResults/LimitFindInstances=2 returns 3 results, no Warning, and offset only
    within those 3. Series of 3 fit; a study's 6 instances do not: the counts catch it and per-series calls fix it.
    A series of 5 cannot be fetched completely at all, and says so."""
    small = generate_cohort(3, 2, 3, seed=7, rows=16, columns=16)
    big_series = generate_cohort(1, 1, 5, seed=8, rows=16, columns=16)
    pacs = orthanc_factory(small, extra_config={"LimitFindResults": 2, "LimitFindInstances": 2})
    pacs.server.load_cohort(big_series)
    qido = QidoRS(requests.Session(), pacs.dicomweb_url)

    raw = qido.search(RelationalQuery(StudyInstanceUID=STUDY_1.study_uid, query_level=QueryLevels.INSTANCE))
    assert len(raw) < 6  # the server's cut, silent
    studies = qido.find_studies(Query(PatientID="TT07*", query_level=QueryLevels.INSTANCE))
    found = [i.uid for s in studies for i in s.all_instances()]
    assert sorted(found) == sorted(ref.instance_uid for ref in small.instance_refs())
    assert len(found) == len(set(found)) == 18
    with pytest.raises(IncompleteResultError, match="3 of the 5 instances"):
        qido.find_study_by_id(big_series.study_refs()[0].study_uid, QueryLevels.INSTANCE)


@pytest.mark.parametrize("with_study", [True, False], ids=["study-and-series", "series-only"])
def test_find_studies_limited_to_one_series(qido: QidoRS, with_study: bool) -> None:
    item = STANDARD_COHORT.instance(2, 1, 0)
    query = Query(
        StudyInstanceUID=item.study_uid if with_study else "",
        SeriesInstanceUID=item.series_uid,
        query_level=QueryLevels.INSTANCE,
    )
    (study,) = qido.find_studies(query)
    assert [s.uid for s in study.series] == [item.series_uid]
    assert len(study.all_instances()) == 3
    missing = Query(StudyInstanceUID=item.study_uid, SeriesInstanceUID="1.2.3", query_level=QueryLevels.INSTANCE)
    assert qido.find_studies(missing) == []
