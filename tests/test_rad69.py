"""RAD-69 against a local fake written from the IHE profile: success, missing document, fault, huge SOAP part."""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Iterator

import pytest
import requests

from testbed.cohort import generate_cohort
from tests.fakehttp import FakeHTTPServer
from tests.http_fakes import Rad69Responder
from trolley_tasks.core import InstanceReference, SeriesReference, StudyReference
from trolley_tasks.downloaders import Downloader
from trolley_tasks.downloaders.base import payload_bytes
from trolley_tasks.downloaders.rad69 import Rad69, XDSMissingDocumentError, XDSUnknownRepositoryError
from trolley_tasks.downloaders.rad69_soap import IHE_NS, IHERAD_NS, read_answer
from trolley_tasks.errors import (
    NonInstanceParameterError,
    PayloadInvalidError,
    RequestRejectedError,
    ServerError,
)

COHORT = generate_cohort(studies=1, series=2, instances=3, seed=21, rows=32, columns=32)
FILES = {item.sop_instance_uid: COHORT.encode(item) for item in COHORT}
GHOST = InstanceReference(COHORT.study_refs()[0].study_uid, COHORT.series_refs()[0].series_uid, "1.2.3.4.5.404")


@pytest.fixture
def responder() -> Rad69Responder:
    return Rad69Responder(FILES)


@pytest.fixture
def server(responder: Rad69Responder) -> Iterator[FakeHTTPServer]:
    with FakeHTTPServer(responder) as fake:
        yield fake


def rad69(server: FakeHTTPServer, **kwargs: object) -> Rad69:
    return Rad69(requests.Session(), f"{server.url}/rad69", **kwargs)  # type: ignore[arg-type]


def test_success_one_request_per_series_bytes_identical(server: FakeHTTPServer, responder: Rad69Responder) -> None:
    downloader = rad69(server)
    assert isinstance(downloader, Downloader)
    got = {ref: payload_bytes(payload) for ref, payload in downloader.iter_raw(COHORT.instance_refs())}
    assert list(got) == COHORT.instance_refs()
    assert all(data == FILES[ref.instance_uid] for ref, data in got.items())
    assert responder.asked_series() == [[ref.series_uid] for ref in COHORT.series_refs()]
    first = responder.requests[0]
    assert [e.text for e in first.iter(f"{{{IHE_NS}}}RepositoryUniqueId")] == ["1.3.6.1.4.1.21367.13.80.110"] * 3
    assert len(list(first.iter(f"{{{IHERAD_NS}}}TransferSyntaxUID"))) > 1
    assert server.requests[0].headers["content-type"].startswith("application/soap+xml")


def test_missing_document_raises_after_delivering_the_others(server: FakeHTTPServer) -> None:
    asked = [*COHORT.instance_refs()[:2], GHOST, COHORT.instance_refs()[2]]
    delivered = []
    with pytest.raises(XDSMissingDocumentError, match="1.2.3.4.5.404"):
        for ref, _ in rad69(server).iter_raw(asked):
            delivered.append(ref)
    assert delivered == COHORT.instance_refs()[:3]


def test_ignored_missing_document_is_skipped_with_a_log_line(
    server: FakeHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    asked = [*COHORT.instance_refs()[:3], GHOST]
    with caplog.at_level(logging.WARNING, logger="trolley"):
        got = [ref for ref, _ in rad69(server, errors_to_ignore=[XDSMissingDocumentError]).iter_raw(asked)]
    assert got == COHORT.instance_refs()[:3]
    assert any("skipping" in line and "1.2.3.4.5.404" in line for line in caplog.messages)


def test_whole_series_missing_is_failure_and_ignorable(server: FakeHTTPServer) -> None:
    ghosts = [InstanceReference(GHOST.study_uid, "1.2.3.77", f"1.2.3.77.{i}") for i in range(3)]
    with pytest.raises(XDSMissingDocumentError):
        list(rad69(server).iter_raw(ghosts))
    assert list(rad69(server, errors_to_ignore=[XDSMissingDocumentError]).iter_raw(ghosts)) == []


def test_other_registry_errors_map_to_their_class(responder: Rad69Responder, server: FakeHTTPServer) -> None:
    responder.error_code = "XDSUnknownRepositoryId"
    with pytest.raises(XDSUnknownRepositoryError) as caught:
        list(rad69(server).iter_raw([GHOST]))
    assert isinstance(caught.value, RequestRejectedError)


@pytest.mark.parametrize("code,error", [("Receiver", ServerError), ("Sender", RequestRejectedError)])
def test_soap_fault(responder: Rad69Responder, server: FakeHTTPServer, code: str, error: type[Exception]) -> None:
    responder.fault = code
    with pytest.raises(error, match="database is offline") as caught:
        list(rad69(server).iter_raw(COHORT.instance_refs()[:1]))
    assert f"SOAP fault {code}" in str(caught.value)


def test_very_large_soap_part_is_parsed_incrementally(responder: Rad69Responder, server: FakeHTTPServer) -> None:
    """40 MB of vendor text in the SOAP part: parsed as it streams, Python's allocations stay far below it."""
    responder.padding = 40 * 1024 * 1024
    tracemalloc.start()
    try:
        got = {ref: payload_bytes(payload) for ref, payload in rad69(server).iter_raw(COHORT.instance_refs()[:3])}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(got) == COHORT.instance_refs()[:3]
    assert all(data == FILES[ref.instance_uid] for ref, data in got.items())
    print(f"\n40 MB SOAP part: peak traced Python memory {peak / 2**20:.1f} MiB")
    assert peak < 16 * 2**20


def test_answer_reader_accepts_any_chunking() -> None:
    envelope = (
        '<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>'
        f'<RetrieveDocumentSetResponse xmlns="{IHE_NS}">'
        '<rs:RegistryResponse xmlns:rs="urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0" status="x:Success"/>'
        "<DocumentResponse><DocumentUniqueId>1.2.3</DocumentUniqueId><mimeType>application/dicom</mimeType>"
        '<Document><Include xmlns="http://www.w3.org/2004/08/xop/include" href="cid:a%40b"/></Document>'
        "</DocumentResponse></RetrieveDocumentSetResponse></s:Body></s:Envelope>"
    ).encode()
    for size in (1, 2, 5, 64, len(envelope)):
        answer = read_answer(envelope[i : i + size] for i in range(0, len(envelope), size))
        assert [(d.document_uid, d.content_id, d.mime_type) for d in answer.documents] == [
            ("1.2.3", "a@b", "application/dicom")
        ]
        assert answer.status == "x:Success" and answer.fault is None


def test_broken_soap_is_invalid_payload() -> None:
    with pytest.raises(PayloadInvalidError, match="not valid XML"):
        read_answer([b"<s:Envelope><unclosed>"])


def test_refused_transfer_syntax_is_invalid_payload(server: FakeHTTPServer) -> None:
    downloader = rad69(server, transfer_syntaxes=["1.2.840.10008.1.2.4.70"])
    with pytest.raises(PayloadInvalidError, match="1.2.840.10008.1.2.1"):
        list(downloader.iter_raw(COHORT.instance_refs()[:1]))


@pytest.mark.parametrize("objects", [StudyReference(GHOST.study_uid), SeriesReference(GHOST.study_uid, "1.2.3")])
def test_needs_instance_references_before_any_request(server: FakeHTTPServer, objects: object) -> None:
    with pytest.raises(NonInstanceParameterError):
        rad69(server).iter_raw(objects)  # type: ignore[arg-type]
    assert server.requests == []


def test_a_soap_answer_with_a_dtd_or_entities_is_refused() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;">]><s>&b;</s>'
    with pytest.raises(PayloadInvalidError, match="forbidden XML feature"):
        read_answer([bomb[:30], bomb[30:]])
