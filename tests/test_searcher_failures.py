"""Every HTTP searcher maps server failures to the right class of the error tree (a local fake server on 127.0.0.1).

401 -> AuthError, 404 -> NotFoundError, 500 -> ServerError, 503 + Retry-After -> ServerBusyError with retry_after,
connection refused -> TransientNetworkError, a server that stalls past the read timeout -> PacsTimeoutError.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests

from testbed.orthanc import free_port
from tests.fakehttp import FakeHTTPServer, FakeRequest, Reply
from trolley_tasks.core import Query, QueryLevels
from trolley_tasks.errors import (
    AuthError,
    NotFoundError,
    PacsTimeoutError,
    ServerBusyError,
    ServerError,
    TransientNetworkError,
    TrolleyError,
)
from trolley_tasks.searchers.base import Searcher
from trolley_tasks.searchers.mint import Mint
from trolley_tasks.searchers.qido_rs import QidoRS
from trolley_tasks.searchers.wado_rs_metadata import WadoRSMetadata

TIMEOUT = (2.0, 0.5)
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"

SEARCHERS: list[tuple[str, Callable[[str], Searcher]]] = [
    ("qido_rs", lambda url: QidoRS(requests.Session(), url, timeout=TIMEOUT, request_tries=1)),
    ("mint", lambda url: Mint(requests.Session(), url + "/mint", timeout=TIMEOUT, request_tries=1)),
    ("wado_rs_metadata", lambda url: WadoRSMetadata(requests.Session(), url, timeout=TIMEOUT, request_tries=1)),
]
"""Asked once (``request_tries=1``): these tests pin the error mapping; retrying has its own tests below."""

FAILURES: list[tuple[str, Reply, type[TrolleyError]]] = [
    ("401", Reply(401, b"who are you", {"WWW-Authenticate": 'Basic realm="pacs"'}), AuthError),
    ("404", Reply(404, b"<html>no such resource</html>", {"Content-Type": "text/html"}), NotFoundError),
    ("500", Reply(500, b"<html>java.lang.NullPointerException</html>", {"Content-Type": "text/html"}), ServerError),
    ("503", Reply(503, b"busy", {"Retry-After": "7"}), ServerBusyError),
    ("stall", Reply(200, b"[]", {"Content-Type": "application/dicom+json"}, delay=2.0), PacsTimeoutError),
]


def _search(searcher: Searcher) -> None:
    searcher.find_study_by_id(STUDY_UID, QueryLevels.INSTANCE)


@pytest.mark.parametrize(("name", "factory"), SEARCHERS, ids=[s[0] for s in SEARCHERS])
@pytest.mark.parametrize(("case", "reply", "error"), FAILURES, ids=[f[0] for f in FAILURES])
def test_http_failures_map_to_error_classes(
    name: str, factory: Callable[[str], Searcher], case: str, reply: Reply, error: type[TrolleyError]
) -> None:
    def handler(request: FakeRequest) -> Reply:
        return reply

    with FakeHTTPServer(handler) as server:
        searcher = factory(server.url)
        with pytest.raises(error) as info:
            _search(searcher)
    assert info.value.source  # every error says which server
    if case == "503":
        assert info.value.retry_after == 7
    if case == "404" and name != "wado_rs_metadata":
        assert type(info.value) is NotFoundError  # a wrong URL, not "no such study"


@pytest.mark.parametrize(("name", "factory"), SEARCHERS, ids=[s[0] for s in SEARCHERS])
def test_connection_refused_is_transient(name: str, factory: Callable[[str], Searcher]) -> None:
    searcher = factory(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientNetworkError) as info:
        searcher.find_studies(Query(StudyInstanceUID=STUDY_UID))
    assert type(info.value) is TransientNetworkError  # refused, not a timeout


def _qido_answer(study_uid: str) -> bytes:
    return (
        b'[{"0020000D": {"vr": "UI", "Value": ["' + study_uid.encode() + b'"]},'
        b' "00201206": {"vr": "IS", "Value": [0]}, "00201208": {"vr": "IS", "Value": [0]}}]'
    )


@pytest.mark.parametrize(
    ("flaky", "retried"),
    [
        (Reply(503, b"busy", {"Retry-After": "0"}), True),
        (Reply(502, b"bad gateway"), True),
        (Reply(200, b'[{"0020000D": {"vr": "UI", "Val', {"Content-Type": "application/dicom+json"}), True),
        (Reply(404, b"no such resource"), False),
    ],
    ids=["busy", "bad-gateway", "cut-json", "not-found"],
)
def test_each_search_request_is_retried_on_its_own(flaky: Reply, retried: bool) -> None:
    """One flaky request costs one more request, not the whole search; a 4xx is the caller's to judge."""
    calls = {"n": 0}

    def handler(request: FakeRequest) -> Reply:
        calls["n"] += 1
        if calls["n"] <= 2:
            return flaky
        return Reply(200, _qido_answer(STUDY_UID), {"Content-Type": "application/dicom+json"})

    with FakeHTTPServer(handler) as server:
        searcher = QidoRS(requests.Session(), server.url, timeout=TIMEOUT, request_tries=3)
        if retried:
            [study] = searcher.find_studies(Query(StudyInstanceUID=STUDY_UID))
            assert study.uid == STUDY_UID and calls["n"] == 3
        else:
            with pytest.raises(NotFoundError):
                searcher.find_studies(Query(StudyInstanceUID=STUDY_UID))
            assert calls["n"] == 1
