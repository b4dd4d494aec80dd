"""DIMSE outcomes map to the error tree: rejection codes, statuses, refused/silent/closing peers, timeouts, aborts,
TLS, and the completeness rules of C-GET/C-MOVE. Fake peers are pynetdicom SCPs or raw sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pynetdicom import AE, evt

from testbed.orthanc import free_port
from tests.conftest import service_missing
from trolley_tasks.core import InstanceReference, Query, SeriesReference
from trolley_tasks.downloaders.dimse_retrieve import RetrieveLoop, RetrieveRequest, plan_requests
from trolley_tasks.errors import (
    AuthError,
    ConfigurationError,
    ErrorClass,
    NotFoundError,
    PacsTimeoutError,
    PayloadInvalidError,
    RequestRejectedError,
    ServerBusyError,
    ServerError,
    TransientNetworkError,
)
from trolley_tasks.searchers.dicom_qr import DICOMQR
from trolley_tasks.transports.dimse import (
    STUDY_ROOT_FIND,
    DimseCancelledError,
    DimseTLS,
    error_for_rejection,
    error_for_status,
)

UID = "1.2.826.0.1.3680043.8.498.1"


# ---------------------------------------------------------------------------------------------------------------------
# Pure mapping tables


@pytest.mark.parametrize(
    ("result", "source", "reason", "expected"),
    [
        (1, 1, 3, AuthError),  # calling AE title not recognised
        (1, 1, 7, RequestRejectedError),  # called AE title not recognised
        (1, 1, 2, RequestRejectedError),  # application context not supported
        (1, 2, 2, RequestRejectedError),  # protocol version not supported
        (2, 3, 2, ServerBusyError),  # local limit exceeded
        (2, 3, 1, ServerBusyError),  # temporary congestion
        (2, 1, 1, TransientNetworkError),  # transient, no reason given
    ],
)
def test_rejection_mapping(result: int, source: int, reason: int, expected: type[Exception]) -> None:
    error = error_for_rejection(result, source, reason, source="pacs")
    assert type(error) is expected
    assert error.source == "pacs"


@pytest.mark.parametrize(
    ("status", "operation", "expected"),
    [
        (0xA700, "C-FIND", ServerBusyError),
        (0xA702, "C-GET", ServerBusyError),
        (0xA900, "C-FIND", RequestRejectedError),
        (0xC000, "C-GET", RequestRejectedError),
        (0xC311, "C-FIND", RequestRejectedError),
        (0x0122, "C-GET", RequestRejectedError),
        (0x0124, "C-GET", AuthError),
        (0x0110, "C-FIND", ServerError),
        (0xFE00, "C-GET", DimseCancelledError),
        (0xA801, "C-MOVE", ConfigurationError),
        (0xC000, "C-MOVE", ConfigurationError),
    ],
)
def test_status_mapping(status: int, operation: str, expected: type[Exception]) -> None:
    error = error_for_status(status, operation=operation, source="pacs", reference=None, destination="ELSEWHERE")
    assert type(error) is expected
    assert f"0x{status:04X}" in str(error)


def test_move_destination_error_names_the_destination() -> None:
    error = error_for_status(0xA801, operation="C-MOVE", source="pacs", destination="NOWHERE")
    assert isinstance(error, ConfigurationError) and "'NOWHERE'" in str(error)
    assert error.error_class is ErrorClass.CONFIGURATION


def test_cancel_is_transient() -> None:
    error = error_for_status(0xFE00, operation="C-MOVE", source=None)
    assert error is not None and error.error_class is ErrorClass.TRANSIENT


@pytest.mark.parametrize("status", [0x0000, 0xFF00, 0xFF01, 0xB000, 0x0001, 0x0107])
def test_success_pending_and_warnings_are_not_errors(status: int) -> None:
    assert error_for_status(status, operation="C-GET", source=None) is None


# ---------------------------------------------------------------------------------------------------------------------
# Fake peers


@pytest.fixture
def find_scp() -> Iterator[Any]:
    """Start a pynetdicom C-FIND SCP: ``start(handler, **ae_settings) -> port``."""
    servers: list[Any] = []

    def start(handler: Any, tls: Any = None, **settings: Any) -> int:
        ae = AE("FAKEPACS")
        ae.add_supported_context(STUDY_ROOT_FIND)
        for name, value in settings.items():
            setattr(ae, name, value)
        port = free_port()
        servers.append(
            ae.start_server(("127.0.0.1", port), block=False, ssl_context=tls, evt_handlers=[(evt.EVT_C_FIND, handler)])
        )
        return port

    yield start
    for server in servers:
        server.shutdown()


def one_study(event: Any) -> Iterator[tuple[int, Dataset | None]]:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = UID
    yield 0xFF00, ds


def qr(port: int, **kwargs: Any) -> DICOMQR:
    kwargs.setdefault("timeout", 5)
    return DICOMQR("127.0.0.1", port, "TROLLEY", "FAKEPACS", **kwargs)


def test_fake_scp_answers_and_association_is_reused(find_scp: Any) -> None:
    port = find_scp(one_study)
    searcher = qr(port)
    for _ in range(3):
        assert [study.uid for study in searcher.find_studies(Query())] == [UID]
    assert searcher.associations.associations_opened == 1
    searcher.close()


def test_association_released_by_peer_is_reopened(find_scp: Any) -> None:
    def release_after_answer(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        yield from one_study(event)

    port = find_scp(release_after_answer)
    searcher = qr(port)
    assert len(searcher.find_studies(Query())) == 1
    assoc = searcher.associations.association()
    assoc.abort()  # the association dies while idle, as when a PACS closes idle associations
    assert len(searcher.find_studies(Query())) == 1
    assert searcher.associations.associations_opened == 2
    searcher.close()


def test_calling_ae_not_recognised_is_auth(find_scp: Any) -> None:
    port = find_scp(one_study, require_calling_aet=["SOMEONE"])
    with pytest.raises(AuthError, match="calling AE"):
        qr(port).find_studies(Query())


def test_called_ae_not_recognised_is_rejected(find_scp: Any) -> None:
    port = find_scp(one_study, require_called_aet=True)
    with pytest.raises(RequestRejectedError, match="called AE"):
        DICOMQR("127.0.0.1", port, "TROLLEY", "WRONGNAME", timeout=5).find_studies(Query())


def test_connection_refused_is_transient_not_timeout() -> None:
    with pytest.raises(TransientNetworkError) as info:
        qr(free_port()).find_studies(Query())
    assert type(info.value) is TransientNetworkError


@pytest.fixture
def raw_server() -> Iterator[Any]:
    """A TCP server on 127.0.0.1 that accepts, then stays silent (``close=False``) or closes at once."""
    sockets: list[socket.socket] = []

    def start(close: bool) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        sockets.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                sockets.append(conn)
                if close:
                    conn.close()

        threading.Thread(target=serve, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for sock in sockets:
        sock.close()


def test_silent_peer_is_acse_timeout(raw_server: Any) -> None:
    with pytest.raises(PacsTimeoutError, match="no association answer"):
        qr(raw_server(close=False), timeout=0.5).find_studies(Query())


def test_peer_closing_the_connection_is_transient(raw_server: Any) -> None:
    with pytest.raises(TransientNetworkError) as info:
        qr(raw_server(close=True), timeout=5).find_studies(Query())
    assert not isinstance(info.value, PacsTimeoutError)


@pytest.mark.parametrize(("status", "expected"), [(0xA700, ServerBusyError), (0xC001, RequestRejectedError)])
def test_find_failure_status(find_scp: Any, status: int, expected: type[Exception]) -> None:
    def fail(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        yield status, None

    with pytest.raises(expected):
        qr(find_scp(fail)).find_studies(Query())


def test_slow_find_is_dimse_timeout(find_scp: Any) -> None:
    stop = threading.Event()

    def slow(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        stop.wait(3)
        yield from one_study(event)

    try:
        with pytest.raises(PacsTimeoutError, match="DIMSE timeout"):
            qr(find_scp(slow), timeout=0.5).find_studies(Query())
    finally:
        stop.set()


def test_peer_abort_during_find_is_transient(find_scp: Any) -> None:
    def abort(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        event.assoc.abort()
        time.sleep(0.2)
        yield from one_study(event)

    with pytest.raises(TransientNetworkError) as info:
        qr(find_scp(abort)).find_studies(Query())
    assert not isinstance(info.value, PacsTimeoutError)


# ---------------------------------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1 (openssl CLI)."""
    folder = tmp_path_factory.mktemp("tls")
    command = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        service_missing(f"openssl cannot make a test certificate: {exc}")  # a failure under CI=true
    return folder


def test_tls_find(find_scp: Any, certificates: Path) -> None:
    import ssl

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificates / "cert.pem", certificates / "key.pem")
    port = find_scp(one_study, tls=server_context)
    tls = DimseTLS(ca_file=certificates / "cert.pem", server_hostname="localhost")
    searcher = qr(port, tls=tls)
    assert [study.uid for study in searcher.find_studies(Query())] == [UID]
    searcher.close()
    untrusted = qr(port, tls=DimseTLS(server_hostname="localhost"))  # system trust store: our cert is unknown
    with pytest.raises(TransientNetworkError, match="TLS"):
        untrusted.find_studies(Query())


def test_tls_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="both"):
        DimseTLS(cert_file=tmp_path / "c.pem").ssl_context()
    with pytest.raises(ConfigurationError, match="not a readable file"):
        DimseTLS(ca_file=tmp_path / "missing.pem").ssl_context()


# ---------------------------------------------------------------------------------------------------------------------
# Completeness rules of C-GET / C-MOVE, on a scripted retrieve


class _FakeAssociations:
    def __init__(self, present: set[str]) -> None:
        self.present = present
        self.aborted = 0

    def find(self, identifier: Dataset, reference: Any) -> list[Dataset]:
        out = []
        for uid in sorted(self.present):
            ds = Dataset()
            ds.SOPInstanceUID = uid
            out.append(ds)
        return out

    def abort(self) -> None:
        self.aborted += 1


class ScriptedRetrieve(RetrieveLoop):
    """Answers each request with a final status and the instances in ``send_uids`` (of those asked)."""

    operation = "C-GET"
    source = "fake"

    def __init__(self, status: int, counts: tuple[int, int, int], send_uids: set[str], present: set[str]) -> None:
        self.status, self.counts, self.send_uids = status, counts, send_uids
        self.associations = _FakeAssociations(present)  # type: ignore[assignment]
        self.requests: list[RetrieveRequest] = []

    def send(self, request: RetrieveRequest) -> Iterator[Dataset]:
        self.requests.append(request)
        final = Dataset()
        final.Status = self.status
        final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations = self.counts[:2]
        final.NumberOfWarningSuboperations = self.counts[2]
        self._request = request
        yield final

    def collect(self, request: RetrieveRequest, delivered: set[str]) -> Iterator[tuple[InstanceReference, bytes]]:
        for uid in request.instance_uids:
            if uid in self.send_uids:
                yield InstanceReference(request.study_uid, str(request.series_uid), uid), b"DICM"

    def subop_failure_error(self, request: RetrieveRequest, failed: int) -> Exception:
        return RequestRejectedError(f"{failed} failed")


SERIES = SeriesReference("1.2.3", "1.2.3.4")
ASKED = [InstanceReference("1.2.3", "1.2.3.4", f"1.2.3.4.{n}") for n in range(1, 4)]
ALL = {ref.instance_uid for ref in ASKED}


def run(fake: ScriptedRetrieve) -> tuple[list[str], BaseException | None]:
    got: list[str] = []
    requests, _ = plan_requests(ASKED)
    try:
        for ref, _ in fake.run(requests):
            got.append(ref.instance_uid)
    except Exception as exc:
        return got, exc
    return got, None


def test_complete_retrieve_is_quiet() -> None:
    got, error = run(ScriptedRetrieve(0x0000, (3, 0, 0), ALL, ALL))
    assert sorted(got) == sorted(ALL) and error is None


def test_success_with_instances_missing_after_claiming_them_sent_is_payload_invalid() -> None:
    got, error = run(ScriptedRetrieve(0x0000, (3, 0, 0), ALL - {"1.2.3.4.2"}, ALL))
    assert len(got) == 2 and isinstance(error, PayloadInvalidError)


def test_success_with_instances_neither_sent_nor_failed_is_not_found() -> None:
    got, error = run(ScriptedRetrieve(0x0000, (2, 0, 0), ALL - {"1.2.3.4.2"}, ALL))
    assert len(got) == 2 and isinstance(error, NotFoundError) and "1.2.3.4.2" in str(error)


def test_failed_suboperations_use_the_downloaders_error() -> None:
    got, error = run(ScriptedRetrieve(0xB000, (2, 1, 0), ALL - {"1.2.3.4.2"}, ALL))
    assert len(got) == 2 and isinstance(error, RequestRejectedError)


def test_refusal_with_an_absent_instance_retries_the_rest_then_not_found() -> None:
    class RefuseLists(ScriptedRetrieve):
        def send(self, request: RetrieveRequest) -> Iterator[Dataset]:
            if "1.2.3.4.2" in request.instance_uids:  # Orthanc: one absent UID fails the whole list
                self.status, self.send_uids = 0xC000, set()
            else:
                self.status, self.send_uids = 0x0000, ALL
            yield from super().send(request)

    fake = RefuseLists(0, (0, 0, 0), set(), ALL - {"1.2.3.4.2"})
    got, error = run(fake)
    assert sorted(got) == ["1.2.3.4.1", "1.2.3.4.3"]
    assert isinstance(error, NotFoundError) and "1.2.3.4.2" in str(error)
    assert [len(r.instance_uids) for r in fake.requests] == [3, 2]


def test_refusal_with_everything_present_keeps_the_status_error() -> None:
    got, error = run(ScriptedRetrieve(0xC000, (0, 0, 0), set(), ALL))
    assert got == [] and type(error) is RequestRejectedError


def test_plan_drops_requests_covered_by_larger_ones() -> None:
    requests, _ = plan_requests([SERIES, *ASKED, SERIES.study()])
    assert [r.level for r in requests] == ["STUDY"]
    requests, _ = plan_requests([*ASKED, *ASKED])
    assert [(r.level, len(r.instance_uids)) for r in requests] == [("IMAGE", 3)]
