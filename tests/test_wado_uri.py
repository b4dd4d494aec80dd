"""WADO-URI against the real Orthanc: a whole study, byte-identical, streamed; and its failure modes."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
import requests

from tests.conftest import RunningOrthanc
from tests.fakehttp import FakeHTTPServer, Reply
from trolley_tasks.core import InstanceReference, SeriesReference, Study, StudyReference
from trolley_tasks.downloaders import Downloader, wado_uri
from trolley_tasks.downloaders.wado_uri import WadoURI
from trolley_tasks.errors import ConfigurationError, NonInstanceParameterError, NotFoundError, PayloadInvalidError


class OneMoreAtOnce:
    """A shared cap that lets a batch send one request beyond its own (tests/test_in_flight.py tests the bounds)."""

    def __init__(self) -> None:
        self.out: set[str] = set()

    def try_acquire(self) -> str | None:
        if self.out:
            return None
        self.out.add("token")
        return "token"

    def release(self, token: str) -> None:
        self.out.remove(token)


IN_FLIGHT = {"one at a time": {}, "4 at once": {"max_in_flight": 4}, "gated": {"max_in_flight": 4, "gate": True}}


def in_flight(options: dict[str, object]) -> dict[str, object]:
    """WadoURI keywords for one of :data:`IN_FLIGHT`."""
    found = dict(options)
    if found.pop("gate", False):
        found["request_gate"] = OneMoreAtOnce()
    return found


@pytest.mark.parametrize("options", IN_FLIGHT.values(), ids=list(IN_FLIGHT))
def test_downloads_a_study_byte_identical(orthanc: RunningOrthanc, options: dict[str, object]) -> None:
    cohort = orthanc.cohort
    study_uid = cohort.study_refs()[1].study_uid
    items = cohort.in_study(study_uid)
    downloader = WadoURI(requests.Session(), orthanc.wado_url, **in_flight(options))  # type: ignore[arg-type]
    assert isinstance(downloader, Downloader)
    files = {}
    for ref, payload in downloader.iter_raw([item.reference() for item in items]):
        assert not isinstance(payload, bytes)  # streamed, not buffered
        files[ref] = b"".join(payload)
    print(f"\nWADO-URI: study {study_uid}: {len(files)} files")
    assert len(files) == len(items) == 6
    for item in items:
        data = files[item.reference()]
        assert data == cohort.encode(item)
        assert pydicom.dcmread(BytesIO(data)).SOPInstanceUID == item.sop_instance_uid


def test_an_answer_larger_than_the_read_ahead_streams_the_rest(
    orthanc: RunningOrthanc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wado_uri, "PREFETCH_BYTES", 64 * 1024)  # the instances are 0.5 MB: most of each streams later
    items = orthanc.cohort.in_study(orthanc.cohort.study_refs()[0].study_uid)
    downloader = WadoURI(requests.Session(), orthanc.wado_url, max_in_flight=3)
    files = {ref: b"".join(payload) for ref, payload in downloader.iter_raw([item.reference() for item in items])}
    assert [files[item.reference()] for item in items] == [orthanc.cohort.encode(item) for item in items]


def test_query_keeps_the_slash_literal(orthanc: RunningOrthanc) -> None:
    ref = orthanc.cohort.instance_refs()[0]
    url = WadoURI(requests.Session(), orthanc.wado_url).instance_url(ref)
    assert url.endswith("&contentType=application/dicom") and "%2F" not in url
    assert f"objectUID={ref.instance_uid}" in url and url.startswith(f"{orthanc.wado_url}?requestType=WADO&")


@pytest.mark.parametrize("options", IN_FLIGHT.values(), ids=list(IN_FLIGHT))
def test_missing_instance_raises_after_the_others(orthanc: RunningOrthanc, options: dict[str, object]) -> None:
    refs = orthanc.cohort.instance_refs()[:3]
    ghost = InstanceReference(refs[0].study_uid, refs[0].series_uid, "1.2.3.4.404")
    delivered = []
    downloader = WadoURI(requests.Session(), orthanc.wado_url, **in_flight(options))  # type: ignore[arg-type]
    with pytest.raises(NotFoundError) as caught:
        for ref, payload in downloader.iter_raw([refs[0], ghost, *refs[1:]]):
            delivered.append(ref)
            b"".join(payload)
    assert delivered == refs
    assert caught.value.reference == ghost


@pytest.mark.parametrize(
    "objects", [StudyReference("1.2.3"), SeriesReference("1.2.3", "1.2.3.4"), Study("1.2.3")], ids=str
)
def test_needs_instances(objects: object) -> None:
    with pytest.raises(NonInstanceParameterError):
        WadoURI(requests.Session(), "http://127.0.0.1:9/wado").iter_raw(objects)  # type: ignore[arg-type]


def test_a_200_that_is_not_dicom_is_invalid_payload() -> None:
    page = Reply(200, [b"<html>Welcome to the PACS portal</html>"], {"Content-Type": "text/html"})
    with FakeHTTPServer(lambda request: page) as fake:
        downloader = WadoURI(requests.Session(), f"{fake.url}/wado")
        with pytest.raises(PayloadInvalidError, match="not a DICOM"):
            list(downloader.iter_raw(InstanceReference("1.2.3", "1.2.3.4", "1.2.3.4.5")))
        assert "contentType=application/dicom" in fake.requests[0].raw_query  # the "/" stays literal


def test_another_instance_than_asked_is_invalid_payload(orthanc: RunningOrthanc) -> None:
    cohort = orthanc.cohort
    wrong = cohort.encode(next(iter(cohort)))
    with FakeHTTPServer(lambda request: Reply(200, [wrong], {"Content-Type": "application/dicom"})) as fake:
        other = cohort.instance_refs()[1]
        with pytest.raises(PayloadInvalidError, match="SOPInstanceUID"):
            list(WadoURI(requests.Session(), f"{fake.url}/wado").iter_raw(other))


def test_a_transfer_syntax_is_asked_for_and_checked() -> None:
    ref = InstanceReference("1.2.3", "1.2.3.4", "1.2.3.4.5")
    downloader = WadoURI(None, "http://127.0.0.1:1/wado/", transfer_syntax="1.2.840.10008.1.2.4.50")
    assert downloader.url == "http://127.0.0.1:1/wado" and downloader.owns_session
    assert downloader.instance_url(ref).endswith("&transferSyntax=1.2.840.10008.1.2.4.50")
    assert "transferSyntax" not in WadoURI(requests.Session(), "http://x/wado").instance_url(ref)
    with pytest.raises(ConfigurationError, match="WADO-URI"):
        WadoURI(requests.Session(), "http://x/wado", transfer_syntax="jpeg please")
    downloader.close()
