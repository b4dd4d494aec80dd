"""dicomtrolley's public API as its users call it (issue 15, docs/dicomtrolley.md): each name in the module a user
finds after swapping ``dicomtrolley`` for ``trolley_tasks``, against the real Orthanc where a server is involved."""

from __future__ import annotations

import importlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from testbed.cohort import GeneratedCohort, generate_cohort
from tests.fakehttp import FakeHTTPServer, FakeRequest, Reply
from tests.mint_fake import mint_handler
from trolley_tasks.caching import DICOMObjectCache, NodeNotFound
from trolley_tasks.core import (
    InstanceReference,
    Query,
    QueryLevels,
    SeriesReference,
    StudyReference,
)
from trolley_tasks.dicom_qr import DICOMQR, DICOMQuery
from trolley_tasks.errors import AuthError, PayloadInvalidError, UsageError
from trolley_tasks.mint import MintQuery, MintStudy, parse_mint_studies_response
from trolley_tasks.qido_rs import HierarchicalQuery, QidoRS
from trolley_tasks.rad69 import Rad69
from trolley_tasks.servers import IMPAXDataCenter, VitreaConnection
from trolley_tasks.storage import DcmStorageDir, FlatDcmStorageDir, FlatStorageDir, StorageDir, make_writable
from trolley_tasks.trolley import Trolley
from trolley_tasks.wado_rs import WadoRS, WadoRSMetaData

COHORT = generate_cohort(studies=2, series=2, instances=3, seed=15, rows=16, columns=16)
PASSWORD = "s3cret-compat"


def _underscored(uid: str) -> str:
    return uid.replace(".", "_")


@pytest.fixture(scope="module")
def pacs(orthanc_factory: Any) -> Any:
    return orthanc_factory(COHORT)


# ------------------------------------------------------------------------------------------------ module names


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("auth", ["create_session", "VitreaAuth", "DICOMTrolleyAuthError"]),
        ("caching", ["CachedSearcher", "DICOMObjectCache", "NodeNotFound"]),
        ("core", ["Query", "ExtendedQuery", "Study", "InstanceReference", "QueryLevels"]),
        ("dicom_qr", ["DICOMQR", "DICOMQuery"]),
        ("exceptions", ["DICOMTrolleyError", "UnSupportedParameterError", "NoQueryResultsError"]),
        ("fields", ["StudyLevel", "SeriesLevel", "SeriesLevelPromotable", "InstanceLevel"]),
        ("mint", ["Mint", "MintQuery", "MintStudy", "parse_mint_studies_response"]),
        ("qido_rs", ["QidoRS", "HierarchicalQuery", "RelationalQuery"]),
        ("rad69", ["Rad69", "XDSMissingDocumentError"]),
        ("servers", ["VitreaConnection", "IMPAXDataCenter"]),
        ("storage", ["StorageDir", "FlatStorageDir", "DICOMDiskStorage", "make_writable"]),
        ("trolley", ["Trolley"]),
        ("wado_rs", ["WadoRS", "WadoRSMetaData"]),
        ("wado_uri", ["WadoURI"]),
    ],
)
def test_dicomtrolley_module_names_resolve(module: str, names: list[str]) -> None:
    loaded = importlib.import_module(f"trolley_tasks.{module}")
    assert [name for name in names if not hasattr(loaded, name)] == []


# ------------------------------------------------------------------------------------------------- object tree


def test_tree_lookup_root_and_dump(pacs: Any) -> None:
    item = next(iter(COHORT))
    study = QidoRS(requests.Session(), pacs.dicomweb_url).find_study_by_id(item.study_uid, QueryLevels.INSTANCE)
    series = study[item.series_uid]
    instance = series[item.sop_instance_uid]
    assert instance.uid == item.sop_instance_uid
    assert instance.root() is study and series.root() is study and study.root() is study
    with pytest.raises(KeyError):
        study["1.2.3.4"]
    dump = study.dump_content()
    assert item.sop_instance_uid in dump and item.series_uid in dump and item.study_uid in dump


# ------------------------------------------------------------------------------------------------------ queries


def test_extended_query_fields_reach_mint_parameters() -> None:
    params = MintQuery(
        PatientSex="F",
        StudyDescription="CHEST*",
        SeriesDescription="AX*",
        InstitutionName="TROLLEY HOSPITAL",
        InstitutionalDepartmentName="RADIOLOGY",
        PatientBirthDate=date(1970, 1, 2),
    ).as_parameters()
    assert isinstance(params, dict)
    assert params["PatientSex"] == "F" and params["PatientBirthDate"] == "19700102"
    assert params["StudyDescription"] == "CHEST*" and params["SeriesDescription"] == "AX*"
    assert params["InstitutionName"] == "TROLLEY HOSPITAL" and params["InstitutionalDepartmentName"] == "RADIOLOGY"


def test_extended_query_fields_filter_dicom_qr_against_orthanc(pacs: Any) -> None:
    item = next(iter(COHORT))
    truth = pydicom.dcmread(__import__("io").BytesIO(COHORT.encode(item)))
    searcher = DICOMQR("127.0.0.1", pacs.dicom_port, "TROLLEY", pacs.aet)
    try:
        found = searcher.find_studies(DICOMQuery(PatientID=item.patient_id, PatientSex=str(truth.PatientSex)))
        assert [s.uid for s in found] == [item.study_uid]
        other_sex = "M" if str(truth.PatientSex) != "M" else "F"
        assert searcher.find_studies(DICOMQuery(PatientID=item.patient_id, PatientSex=other_sex)) == []
        none = DICOMQuery(StudyInstanceUID=item.study_uid, SeriesDescription="NO SUCH SERIES*")
        assert searcher.find_studies(none) == []
    finally:
        searcher.close()


def test_dicom_query_open_ended_date_range_against_orthanc(pacs: Any) -> None:
    item = next(iter(COHORT))
    study_date = datetime.strptime(item.study_date, "%Y%m%d")
    assert DICOMQuery(min_study_date=study_date).study_filters()["StudyDate"] == f"{item.study_date}-"
    with pytest.raises(ValueError, match="both"):
        Query(min_study_date=study_date)  # the plain Query keeps "both or neither" (docs/dicomtrolley.md)
    searcher = DICOMQR("127.0.0.1", pacs.dicom_port, "TROLLEY", pacs.aet)
    try:
        since = searcher.find_studies(DICOMQuery(PatientID=item.patient_id, min_study_date=study_date))
        before = searcher.find_studies(
            DICOMQuery(PatientID=item.patient_id, max_study_date=datetime(study_date.year - 1, 1, 1))
        )
    finally:
        searcher.close()
    assert [s.uid for s in since] == [item.study_uid] and before == []


def test_dicom_qr_defaults_and_public_parser() -> None:
    searcher = DICOMQR("127.0.0.1", 11112)
    assert (searcher.associations.aet, searcher.associations.aec) == ("DICOMTROLLEY", "ANY-SCP")
    items = list(COHORT)[:2]
    answers = []
    for item in items:
        ds = pydicom.Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
            item.study_uid,
            item.series_uid,
            (item.sop_instance_uid),
        )
        answers.append(ds)
    studies = DICOMQR.parse_c_find_response(answers)
    assert [i.uid for i in studies[0].all_instances()] == [item.sop_instance_uid for item in items]


def test_uri_search_params_is_a_dict() -> None:
    query = HierarchicalQuery(PatientID="P1", include_fields=["PatientBirthDate", "StudyDescription"])
    assert query.uri_search_params() == {"PatientID": "P1", "includefield": ["PatientBirthDate", "StudyDescription"]}


# ------------------------------------------------------------------------------------------------------------ MINT


def _mint_server(cohort: GeneratedCohort) -> FakeHTTPServer:
    return FakeHTTPServer(mint_handler(cohort))


def test_parse_mint_studies_response_gives_mint_studies() -> None:
    server = _mint_server(COHORT)
    try:
        item = next(iter(COHORT))
        response = requests.get(f"{server.url}/mint/studies", params={"StudyInstanceUID": item.study_uid})
    finally:
        server.close()
    studies = parse_mint_studies_response(response)
    assert [type(s) for s in studies] == [MintStudy] and studies[0].uid == item.study_uid
    assert studies[0].mint_uuid and studies[0].last_modified


def test_mint_unknown_encoding_is_our_error() -> None:
    body = b'<?xml version="1.0" encoding="x-no-such-codec"?><studySearchResults xmlns="http://medical.nema.org/mint"/>'
    server = FakeHTTPServer(lambda request: Reply(200, body, {"Content-Type": "application/xml"}))
    try:
        from trolley_tasks.mint import Mint

        with pytest.raises(PayloadInvalidError, match="encoding"):
            Mint(requests.Session(), f"{server.url}/mint", request_tries=1).find_studies(Query(PatientID="X"))
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------------- downloads


def test_download_use_async_one_call_per_series(pacs: Any, tmp_path: Path) -> None:
    calls: list[set[str]] = []

    class CountingWadoRS(WadoRS):
        def iter_raw(self, objects: Any) -> Iterator[Any]:
            items = [objects] if not isinstance(objects, list) else objects
            calls.append({ref.series_uid for ref in items})
            return super().iter_raw(objects)

    session = requests.Session()
    trolley = Trolley(QidoRS(session, pacs.dicomweb_url), CountingWadoRS(session, pacs.dicomweb_url))
    study = COHORT.study_refs()[0]
    results = trolley.download(study, tmp_path, use_async=True, max_workers=2)
    expected = COHORT.in_study(study.study_uid)
    assert sorted(r.path.name for r in results) == sorted(_underscored(i.sop_instance_uid) for i in expected)
    assert len(calls) == 2 and all(len(series) == 1 for series in calls)
    with pytest.raises(UsageError, match="max_workers"):
        trolley.download(study, tmp_path, max_workers=2)
    with pytest.raises(UsageError, match="threads"):
        Trolley(trolley.searcher, pacs.c_get()).download(study, tmp_path, use_async=True)


def test_wado_rs_metadata_downloader_against_orthanc(pacs: Any, tmp_path: Path) -> None:
    item = next(iter(COHORT))
    downloader = WadoRSMetaData(requests.Session(), pacs.dicomweb_url)
    series = list(downloader.datasets(SeriesReference(item.study_uid, item.series_uid)))
    assert {str(ds.SOPInstanceUID) for ds in series} == {
        i.sop_instance_uid for i in COHORT if i.series_uid == item.series_uid
    }
    one = downloader.get_dataset(item.reference())
    assert one.Rows == 16 and not one.get("PixelData")  # bulk data stays on the server
    with pytest.raises(UsageError):
        list(downloader.iter_raw(item.reference()))
    trolley = Trolley(QidoRS(requests.Session(), pacs.dicomweb_url), downloader)
    [result] = trolley.download(item.reference(), tmp_path)
    written = pydicom.dcmread(result.path)
    assert written.SOPInstanceUID == item.sop_instance_uid and not written.get("PixelData")
    assert StudyReference(item.study_uid) and len(list(downloader.datasets(StudyReference(item.study_uid)))) == 6


def test_make_writable_gives_file_meta(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "P"
    ds.add_new(0x00091010, "UN", 12)  # a decoded private value pydicom cannot write as UN
    made = make_writable(ds)
    assert made is ds and ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4" and 0x00091010 not in ds
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "x.dcm").PatientID == "P"


def test_rad69_request_templates_name_every_instance() -> None:
    refs = [i.reference() for i in list(COHORT)[:4]]
    body = Rad69(requests.Session(), "http://127.0.0.1:9/rad69").create_instances_request(refs)
    root = ET.fromstring(body)
    documents = [el.text for el in root.iter("{urn:ihe:iti:xds-b:2007}DocumentUniqueId")]
    assert documents == [ref.instance_uid for ref in refs]
    single = Rad69(requests.Session(), "http://127.0.0.1:9/rad69").create_instance_request(refs[0])
    assert refs[0].instance_uid in single and refs[1].instance_uid not in single


# ------------------------------------------------------------------------------------------------------- storage


def test_dicomtrolley_file_names_and_both_recognised(tmp_path: Path) -> None:
    item = next(iter(COHORT))
    ref = item.reference()
    raw = COHORT.encode(item)
    nested = StorageDir().save_raw(ref, raw, tmp_path / "a").path
    flat = FlatStorageDir().save_raw(ref, raw, tmp_path / "b").path
    assert nested.relative_to(tmp_path / "a").parts == tuple(
        _underscored(uid) for uid in (item.study_uid, item.series_uid, item.sop_instance_uid)
    )
    assert flat.relative_to(tmp_path / "b").parts == (_underscored(item.sop_instance_uid),)
    found = DcmStorageDir().existing_valid(ref, tmp_path / "a")  # a folder dicomtrolley filled
    assert found is not None and found.path == nested
    found = FlatDcmStorageDir().existing_valid(ref, tmp_path / "b")
    assert found is not None and found.path == flat
    dotted = DcmStorageDir().save_raw(ref, raw, tmp_path / "c").path
    assert dotted.name == f"{item.sop_instance_uid}.dcm"
    again = StorageDir().existing_valid(ref, tmp_path / "c")
    assert again is not None and again.path == dotted
    assert StorageDir().existing_valid(list(COHORT)[1].reference(), tmp_path / "c") is None
    # a re-run's check of what it counted done looks where existing_valid looks, by one stat each
    assert DcmStorageDir().stored_size(ref, tmp_path / "a") == len(raw) == StorageDir().stored_size(ref, tmp_path / "c")
    assert StorageDir().stored_size(list(COHORT)[1].reference(), tmp_path / "c") is None


def test_cache_add_and_retrieve(pacs: Any) -> None:
    item = next(iter(COHORT))
    study = QidoRS(requests.Session(), pacs.dicomweb_url).find_study_by_id(item.study_uid, QueryLevels.INSTANCE)
    cache = DICOMObjectCache(expiry_seconds=None)
    assert cache.add(study.series[0]) is study.series[0]
    assert cache.retrieve(StudyReference(item.study_uid)) is study
    assert cache.retrieve(item.reference()).uid == item.sop_instance_uid
    with pytest.raises(NodeNotFound):
        cache.retrieve(InstanceReference(item.study_uid, item.series_uid, "1.2.3"))
    assert DICOMObjectCache([study]).retrieve(SeriesReference(item.study_uid, item.series_uid)).uid == item.series_uid


# ---------------------------------------------------------------------------------------------------- servers


def _vitrea_gate(inner: Any, logins: list[str]) -> Any:
    """Vitrea's login (PROTOCOLS.md) in front of ``inner``: POST /login with X- headers sets a cookie."""

    def handle(request: FakeRequest) -> Reply:
        if request.method == "POST" and request.path == "/login":
            if request.headers.get("X-Password") != PASSWORD:
                return Reply(401, b"bad login")
            logins.append(request.headers.get("X-Userid", ""))
            return Reply(200, b"{}", {"Set-Cookie": "JSESSIONID=ok; Path=/"})
        if "JSESSIONID=ok" not in request.headers.get("Cookie", ""):
            return Reply(401, b"log in first")
        return inner(request)

    return handle


def test_vitrea_connection_and_impax_login(pacs: Any) -> None:
    logins: list[str] = []
    vitrea = FakeHTTPServer(_vitrea_gate(mint_handler(COHORT), logins))
    try:
        connection = VitreaConnection(f"{vitrea.url}/login")
        trolley = connection.get_mint_trolley(
            "anne", PASSWORD, "DefaultSystemRealm", pacs.wado_url, f"{vitrea.url}/mint"
        )
        assert len(trolley.find_studies(Query(PatientName="*"))) == 2 and logins == ["anne"]
        with pytest.raises(AuthError):
            connection.log_in("anne", "wrong", "DefaultSystemRealm")
    finally:
        vitrea.close()

    def impax(request: FakeRequest) -> Reply:
        if request.path.endswith("/j_security_check"):
            ok = request.param("j_password") == PASSWORD
            return Reply(403, b"forbidden") if ok else Reply(200, b"<html>Login Failed!</html>")
        return Reply(200, b"<html>login page</html>", {"Set-Cookie": "JSESSIONID=impax; Path=/"})

    server = FakeHTTPServer(impax)
    try:
        center = IMPAXDataCenter(f"{server.url}/wado")
        assert isinstance(center.log_in("anne", PASSWORD), requests.Session)
        assert server.requests[-1].headers.get("Cookie") == "JSESSIONID=impax"  # the session of the first GET
        with pytest.raises(AuthError, match="IMPAX"):
            center.log_in("anne", "wrong")
        trolley = center.get_dicom_qr_trolley(
            "anne", PASSWORD, "127.0.0.1", pacs.dicom_port, aet="TROLLEY", aec=pacs.aet
        )
        try:
            assert len(trolley.find_studies(Query(PatientName="*"))) == 2
        finally:
            trolley.searcher.close()
    finally:
        server.close()


# --------------------------------------------------------------- dicomtrolley's authentication page, as written


def test_authentication_page_examples(pacs: Any) -> None:
    from trolley_tasks.auth import VitreaAuth, create_session  # dicomtrolley.auth
    from trolley_tasks.mint import Mint  # dicomtrolley.mint

    logins: list[str] = []
    server = FakeHTTPServer(_vitrea_gate(mint_handler(COHORT), logins))
    try:
        session = requests.Session()
        session.auth = VitreaAuth(
            login_url=f"{server.url}/login",  # "https://server/login"
            user="user",
            password=PASSWORD,  # "password"
            realm="realm",
        )
        # then just use the session
        searcher = Mint(session, f"{server.url}/mint")  # "https://server/mint"
        assert len(searcher.find_studies(Query(PatientName="*"))) == 2

        session = create_session(f"{server.url}/login", "user", PASSWORD, "realm")  # four of five examples
        trolley = Trolley(searcher=Mint(session, f"{server.url}/mint"), downloader=WadoRS(session, pacs.dicomweb_url))
        assert len(trolley.find_studies(Query(PatientName="*"))) == 2
        assert logins == ["user", "user"]
    finally:
        server.close()
