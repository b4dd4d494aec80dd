"""MINT: the XML parser on fixtures written from the wire format, and the searcher against a fake MINT server."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError

from testbed.cohort import generate_cohort
from tests.fakehttp import FakeHTTPServer, FakeRequest, Reply
from tests.mint_fake import EXPLICIT_LE, JPEG_LOSSLESS, mint_xml, start_mint_server
from trolley_tasks.core import Query, QueryLevels
from trolley_tasks.errors import PayloadInvalidError, ServerError, StudyNotFoundError, UnSupportedParameterError
from trolley_tasks.searchers.mint import Mint, MintQuery, parse_mint_xml

DATA = Path(__file__).parent / "data" / "mint"
BIG = generate_cohort(studies=1, series=7, instances=22, seed=11)  # 154 instances, like the real answer


def test_study_level_fixture() -> None:
    studies = parse_mint_xml((DATA / "study_level.xml").read_bytes(), QueryLevels.STUDY)
    assert [s.uid for s in studies] == ["1.2.3.4.100", "1.2.3.4.200"]
    first = studies[0].data
    assert first.PatientName == "BEAN^MR" and first.AccessionNumber == "ACC0001"
    assert list(first.ModalitiesInStudy) == ["CT", "MR"]
    assert "StudyDescription" in first and first.StudyDescription in ("", None)  # present, empty: no val
    assert studies[0].series == []


def test_series_level_fixture_in_any_attribute_order() -> None:
    (study,) = parse_mint_xml((DATA / "series_level.xml").read_bytes(), QueryLevels.SERIES)
    assert [s.uid for s in study.series] == ["1.2.3.4.100.1", "1.2.3.4.100.2"]
    assert study.series[1].data.SeriesDescription == "T1 AXIAL" and study.series[0].data.SeriesNumber == 1
    assert study.data.PatientID == "PAT1"


def test_instance_level_many_series_mixed_syntaxes_attrs_after_instances() -> None:
    body = mint_xml(BIG, "INSTANCE", syntax_for_series=[JPEG_LOSSLESS, EXPLICIT_LE], series_attrs_last=True)
    (study,) = parse_mint_xml(body, QueryLevels.INSTANCE)
    assert len(study.series) == 7 and len(study.all_instances()) == 154
    assert sorted(i.uid for i in study.all_instances()) == sorted(ref.instance_uid for ref in BIG.instance_refs())
    syntaxes = {s.uid: {i.data.TransferSyntaxUID for i in s.instances} for s in study.series}
    assert syntaxes[study.series[0].uid] == {JPEG_LOSSLESS} and syntaxes[study.series[1].uid] == {EXPLICIT_LE}
    first = study.series[0].instances[0]
    assert first.data.Rows == 512 and first.data.InstanceNumber == 1
    assert first.reference().series_uid == study.series[0].uid
    assert int(study.series[0].data.NumberOfSeriesRelatedInstances) == 22


def test_levels_deeper_than_asked_are_not_read() -> None:
    body = mint_xml(BIG, "INSTANCE")
    (study,) = parse_mint_xml(body, QueryLevels.SERIES)
    assert len(study.series) == 7 and study.all_instances() == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<studySearchResults xmlns='http://medical.nema.org/mint'><study>", "not well-formed XML"),
        (b"<html><body><h1>500 Internal Server Error</h1></body></html>", "expected studySearchResults"),
        (b"<studySearchResults><study/></studySearchResults>", "expected studySearchResults"),
        (
            b'<!DOCTYPE x [<!ENTITY a "aaaaaaaa">]><studySearchResults xmlns="http://medical.nema.org/mint">'
            b"&a;</studySearchResults>",
            "forbidden XML feature",
        ),
        (
            b'<studySearchResults xmlns="http://medical.nema.org/mint"><study>'
            b'<attr tag="0020000d" vr="UI" val="not a uid"/></study></studySearchResults>',
            "invalid StudyInstanceUID",
        ),
        (
            b'<studySearchResults xmlns="http://medical.nema.org/mint"><study>'
            b'<attr tag="00280010" vr="US" val="many"/></study></studySearchResults>',
            "unreadable attr",
        ),
        (b"", "not well-formed XML"),
    ],
    ids=["truncated", "html-page", "no-namespace", "entity", "bad-uid", "bad-number", "empty"],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's own note on the bad UID
def test_malformed_answers_get_a_clear_error(body: bytes, message: str) -> None:
    with pytest.raises(PayloadInvalidError, match=message):
        parse_mint_xml(body, QueryLevels.INSTANCE, source="mint-test")


def test_mint_query_validates_include_fields_per_level_and_limit() -> None:
    with pytest.raises(ValidationError, match="cannot be returned at query_level STUDY"):
        MintQuery(include_fields=["SOPClassUID"])
    assert MintQuery(include_fields=["SOPClassUID"], query_level=QueryLevels.INSTANCE).limit == 0
    with pytest.raises(ValidationError):
        MintQuery(limit=-1)
    params = MintQuery(
        PatientName="B*",
        min_study_date=datetime(2020, 3, 1),
        max_study_date=datetime(2020, 3, 3),
        include_fields=["PatientBirthDate", "StudyID"],
        limit=10,
    ).as_parameters()
    assert list(params.items()) == [
        ("PatientName", "B*"),
        ("min_study_date", "20200301"),
        ("max_study_date", "20200303"),
        ("QueryLevel", "STUDY"),
        ("IncludeFields", "PatientBirthDate,StudyID"),
        ("limit", "10"),
    ]


def test_searcher_against_fake_server_and_invalid_plain_query() -> None:
    cohort = generate_cohort(3, 2, 4, seed=5)
    with start_mint_server(cohort) as server:
        mint = Mint(requests.Session(), server.url + "/mint")
        item = cohort.instance(2, 1, 3)
        study = mint.find_study_by_id(item.study_uid, QueryLevels.INSTANCE)
        assert len(study.all_instances()) == 8 and study.data.PatientID == item.patient_id
        assert [s.uid for s in mint.find_studies(Query(PatientName="TROLLEY*"))] == [
            r.study_uid for r in cohort.study_refs()
        ]
        assert server.requests[-1].raw_query == "PatientName=TROLLEY*&QueryLevel=STUDY&limit=0"
        with pytest.raises(StudyNotFoundError):
            mint.find_study_by_id("1.2.3.999", QueryLevels.STUDY)
        with pytest.raises(UnSupportedParameterError, match="cannot be returned"):
            mint.find_studies(Query(include_fields=["SOPClassUID"]))


def test_html_500_page_is_a_server_error() -> None:
    def handler(request: FakeRequest) -> Reply:
        return Reply(500, b"<html><body>java.lang.NullPointerException</body></html>", {"Content-Type": "text/html"})

    with FakeHTTPServer(handler) as server, pytest.raises(ServerError, match="HTTP 500"):
        Mint(requests.Session(), server.url + "/mint").find_studies(Query(PatientID="x"))


def test_html_page_with_200_is_an_invalid_payload() -> None:
    def handler(request: FakeRequest) -> Reply:
        return Reply(200, b"<html><body>Please log in</body></html>", {"Content-Type": "text/html"})

    with FakeHTTPServer(handler) as server, pytest.raises(PayloadInvalidError, match="expected studySearchResults"):
        Mint(requests.Session(), server.url + "/mint").find_studies(Query(PatientID="x"))
