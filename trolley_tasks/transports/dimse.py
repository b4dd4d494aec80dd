"""The DIMSE transport: the one place where pynetdicom associations are set up and their outcomes become trolley errors.

Every C-FIND, C-GET and C-MOVE of :mod:`trolley_tasks.searchers.dicom_qr` and :mod:`trolley_tasks.downloaders.dicom_qr`
goes through an :class:`AssociationManager`, so that:

- one association is kept open and reused across calls (an export issues thousands of small requests; association
  set-up costs a round trip and, on many PACS, a log entry and a licence slot), and re-opened when it was released or
  aborted;
- the ACSE, DIMSE, network-idle and connect timeouts are always set (pynetdicom's DIMSE timeout defaults to none at
  all on some paths, and a stalled PACS would hang a worker);
- a rejected association, an abort, a timeout or a failure status maps to exactly one class of the error tree
  (:mod:`trolley_tasks.errors`), with the rules of PS3.8 (A-ASSOCIATE-RJ result, source, reason) and PS3.4 Annex C
  (C-FIND/C-GET/C-MOVE statuses) and PS3.7 Annex C (status classes), written in
  :mod:`~trolley_tasks.transports.dimse_status`.

Nothing secret passes through DIMSE; the only sensitive items are the TLS key paths, which never reach a message.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt, sop_class
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STATUS_PENDING, code_to_category

from trolley_tasks.errors import (
    ConfigurationError,
    PacsTimeoutError,
    PayloadInvalidError,
    RequestRejectedError,
    RetrievalError,
    TransientNetworkError,
)
from trolley_tasks.transports.dimse_status import DimseCancelledError, error_for_rejection, error_for_status

# pynetdicom.sop_class makes its SOP class names at import time, so mypy cannot see them.
STUDY_ROOT_FIND: str = sop_class.StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
STUDY_ROOT_MOVE: str = sop_class.StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]
STUDY_ROOT_GET: str = sop_class.StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]
"""Study Root Query/Retrieve Information Model SOP classes (PS3.4 C.6.2.1, PS3.6 Annex A), as pynetdicom names them."""

__all__ = [
    "STUDY_ROOT_FIND",
    "STUDY_ROOT_GET",
    "STUDY_ROOT_MOVE",
    "AssociationManager",
    "DimseCancelledError",
    "DimseTLS",
    "error_for_rejection",
    "error_for_status",
]


@dataclass(frozen=True)
class DimseTLS:
    """DICOM TLS (PS3.15 Annex B.1, the "basic TLS secure transport connection profile") for DIMSE.

    Parameters
    ----------
    ca_file
        PEM bundle of the CAs that sign the PACS certificate; None uses the system's trust store.
    cert_file, key_file
        Our client certificate and key, for PACS that authenticate the calling node by certificate. Give both or
        neither.
    server_hostname
        The name to check the PACS certificate against; defaults to the host we connect to.
    """

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_hostname: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the PACS certificate and presents ours, if given."""
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigurationError("DICOM TLS: give both cert_file and key_file, or neither")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigurationError(f"DICOM TLS: {name} {str(path)!r} is not a readable file")
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
            )
            if self.cert_file is not None and self.key_file is not None:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(f"DICOM TLS: cannot load the certificates: {exc.__class__.__name__}") from exc
        return context


# ---------------------------------------------------------------------------------------------------------------------
# Associations


class _Watch:
    """What happened on one association, from pynetdicom's notification events (its flags alone cannot tell a
    refused connection from an ACSE timeout, or our own timeout abort from the peer's abort)."""

    def __init__(self) -> None:
        self.connected = False
        self.we_aborted = False
        self.peer_aborted = False

    def handlers(self) -> list[tuple[Any, Callable[..., None]]]:
        return [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_ACSE_SENT, self._on_sent),
            (evt.EVT_ACSE_RECV, self._on_recv),
        ]

    def _on_open(self, event: Any) -> None:
        self.connected = True

    def _on_sent(self, event: Any) -> None:
        if isinstance(event.primitive, A_ABORT):
            self.we_aborted = True

    def _on_recv(self, event: Any) -> None:
        if isinstance(event.primitive, A_ABORT | A_P_ABORT):
            self.peer_aborted = True


class AssociationManager:
    """One association to one PACS, opened on first use, reused across calls, re-opened when it was lost.

    Not thread-safe: a worker process or thread owns one manager (the engine builds one per process).

    Parameters
    ----------
    host, port, aet, aec
        The PACS address, our calling AE title and the PACS's called AE title.
    contexts
        The presentation contexts to propose (at most 128, PS3.8 9.3.2.2 allows 128 odd context IDs).
    roles
        SCP/SCU role selection items (PS3.7 D.3.3.4), for C-GET's storage sub-operations.
    timeout
        Seconds for each of: the TCP connect, the ACSE reply, each DIMSE reply and network idleness. An idle
        association is released (not aborted) when it passes ``timeout``, and re-opened on the next call.
    tls
        DICOM TLS settings, or None for plain TCP.
    handlers
        Extra pynetdicom event handlers bound to every association (C-GET binds ``EVT_C_STORE``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        aet: str,
        aec: str,
        *,
        contexts: Sequence[PresentationContext],
        roles: Sequence[SCP_SCU_RoleSelectionNegotiation] = (),
        timeout: float = 30.0,
        tls: DimseTLS | None = None,
        source: str | None = None,
        handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
    ) -> None:
        if len(contexts) > 128:
            raise ConfigurationError(f"{len(contexts)} presentation contexts proposed; DICOM allows at most 128")
        self.host = host
        self.port = int(port)
        self.aet = aet
        self.aec = aec
        self.contexts = list(contexts)
        self.roles = list(roles)
        self.timeout = float(timeout)
        self.tls = tls
        self.source = source or f"dicom://{aec}@{host}:{self.port}"
        self.handlers = list(handlers)
        self.associations_opened = 0
        """How many associations this manager has opened: tests use it to prove reuse."""
        self._ssl_context = tls.ssl_context() if tls is not None else None
        self._assoc: Association | None = None
        self._watch = _Watch()

    @property
    def is_open(self) -> bool:
        """True while an association is established (between a first request and :meth:`release` or an abort)."""
        return self._assoc is not None and self._assoc.is_established

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.aet} -> {self.source}, tls={self.tls is not None})"

    def propose(
        self, contexts: Sequence[PresentationContext], roles: Sequence[SCP_SCU_RoleSelectionNegotiation]
    ) -> None:
        """Change what the next association proposes; the current one is released if it proposes something else."""
        if len(contexts) > 128:
            raise ConfigurationError(f"{len(contexts)} presentation contexts proposed; DICOM allows at most 128")
        self.release()
        self.contexts = list(contexts)
        self.roles = list(roles)

    def association(self) -> Association:
        """The open association, opening a new one when there is none or it was released or aborted."""
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        self._assoc = None
        ae = AE(ae_title=self.aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        ae.requested_contexts = self.contexts
        watch = _Watch()
        tls_args = (
            (self._ssl_context, self.tls.server_hostname or self.host) if self._ssl_context and self.tls else None
        )
        assoc = ae.associate(
            self.host,
            self.port,
            ae_title=self.aec,
            ext_neg=list(self.roles) or None,
            tls_args=tls_args,
            evt_handlers=[*watch.handlers(), *self.handlers],
        )
        if not assoc.is_established:
            raise self._failed_association(assoc, watch)
        assoc.network_timeout_response = "A-RELEASE"
        self.associations_opened += 1
        self._assoc, self._watch = assoc, watch
        return assoc

    def _failed_association(self, assoc: Association, watch: _Watch) -> RetrievalError:
        where = f"{self.host}:{self.port}"
        if not watch.connected:
            return TransientNetworkError(
                f"could not connect to {where} (refused, unreachable, or the TLS handshake failed)", source=self.source
            )
        answer = assoc.acceptor.primitive
        if assoc.is_rejected and answer is not None:
            return error_for_rejection(
                int(answer.result or 0), int(answer.result_source or 0), int(answer.diagnostic or 0), source=self.source
            )
        if watch.we_aborted and not watch.peer_aborted:
            return PacsTimeoutError(f"no association answer from {where} within {self.timeout:g}s", source=self.source)
        return TransientNetworkError(f"association with {where} aborted during set-up", source=self.source)

    def _lost(self, operation: str, reference: Any) -> RetrievalError:
        """The error for a request that got no (complete) answer: our timeout abort, or the peer's abort."""
        watch = self._watch
        self.release()
        if watch.we_aborted and not watch.peer_aborted:
            return PacsTimeoutError(
                f"{operation}: no answer within {self.timeout:g}s (DIMSE timeout)",
                source=self.source,
                reference=reference,
            )
        return TransientNetworkError(f"{operation}: association aborted", source=self.source, reference=reference)

    def request(
        self, operation: str, send: Callable[[Association], Iterator[tuple[Dataset, Dataset | None]]], reference: Any
    ) -> Iterator[tuple[Dataset, Dataset | None]]:
        """Responses ``(status, identifier)`` of one DIMSE request, with a lost association mapped to an error.

        If a reused association turns out to have died while idle (the PACS closed it and nothing of this request
        was answered yet), the request is sent once more on a fresh association; that is safe for C-FIND, C-GET and
        C-MOVE, which change nothing on the PACS.
        """
        for attempt in (1, 2):
            opened_before = self.associations_opened
            assoc = self.association()
            reused = self.associations_opened == opened_before
            answered = False
            responses = send(assoc)
            while True:
                try:
                    status, identifier = next(responses)
                except StopIteration:
                    return
                except ValueError as exc:  # pynetdicom: no accepted presentation context for this SOP class
                    raise RequestRejectedError(
                        f"{operation}: the PACS accepted no presentation context for it: {exc}",
                        source=self.source,
                        reference=reference,
                    ) from exc
                except RuntimeError as exc:  # pynetdicom: the association died between our check and the send
                    self.release()
                    raise TransientNetworkError(
                        f"{operation}: association lost", source=self.source, reference=reference
                    ) from exc
                if "Status" not in status:
                    if reused and not answered and attempt == 1 and not self._watch.we_aborted:
                        self.release()
                        break
                    raise self._lost(operation, reference)
                answered = True
                yield status, identifier

    def send_c_find(self, identifier: Dataset, model: str, reference: Any) -> Iterator[tuple[Dataset, Dataset | None]]:
        """C-FIND responses (PS3.7 9.1.2) on the shared association."""
        return self.request("C-FIND", lambda assoc: assoc.send_c_find(identifier, model), reference)

    def send_c_get(self, identifier: Dataset, model: str, reference: Any) -> Iterator[tuple[Dataset, Dataset | None]]:
        """C-GET responses (PS3.7 9.1.3); the instances arrive through the ``EVT_C_STORE`` handler."""
        return self.request("C-GET", lambda assoc: assoc.send_c_get(identifier, model), reference)

    def send_c_move(
        self, identifier: Dataset, destination: str, model: str, reference: Any
    ) -> Iterator[tuple[Dataset, Dataset | None]]:
        """C-MOVE responses (PS3.7 9.1.4); the instances go to ``destination``'s storage SCP."""
        return self.request("C-MOVE", lambda assoc: assoc.send_c_move(identifier, destination, model), reference)

    def find(self, identifier: Dataset, reference: Any) -> list[Dataset]:
        """The matches of one Study Root C-FIND (PS3.4 C.4.1); a failure status raises the mapped error."""
        matches: list[Dataset] = []
        for status, found in self.send_c_find(identifier, STUDY_ROOT_FIND, reference):
            code = int(status.Status)
            error = error_for_status(
                code, operation="C-FIND", source=self.source, reference=reference, comment=status.get("ErrorComment")
            )
            if error is not None:
                raise error
            if code_to_category(code) == STATUS_PENDING:
                if found is None:
                    raise PayloadInvalidError(
                        "C-FIND pending response without an identifier", source=self.source, reference=reference
                    )
                matches.append(found)
        return matches

    def release(self) -> None:
        """Release the association, if one is open. The next call opens a new one."""
        assoc, self._assoc = self._assoc, None
        if assoc is not None and assoc.is_established:
            assoc.release()

    def abort(self) -> None:
        """Abort the association (a request was left half-answered, so its state is unknown)."""
        assoc, self._assoc = self._assoc, None
        if assoc is not None and assoc.is_established:
            assoc.abort()

    close = release
