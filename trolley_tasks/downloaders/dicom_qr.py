"""DICOM Query/Retrieve downloads: Study Root C-GET and C-MOVE (PS3.4 C.4.2, C.4.3).

Both send one retrieve request per series (IMAGE level, with the asked SOPInstanceUIDs as a list of UIDs, PS3.4
C.4.2.2.1), or per series or study when given a series or study reference (C-GET only), on one association that is
reused across calls. Instances are handed on as they arrive, never decoded: C-GET's as DICOM Part 10 bytes with a file
meta header built from the C-STORE sub-operation (PS3.10 7.1); C-MOVE's as the spooled file itself
(:class:`~trolley_tasks.formats.part10.Part10File`), which storage renames into place.

Completeness is checked twice: the final response's sub-operation counts (completed, failed, warning) against what
actually arrived, and the UIDs asked for against the UIDs received. A retrieve that reports success while instances are
missing is an error. When a request fails as a whole with nothing sent (Orthanc answers 0xC000 when any one asked
instance is absent, and also for an unknown move destination), a C-FIND tells "not on the PACS" apart from "the PACS
refuses the request": the instances that exist are retrieved again, and the absent ones become one NotFoundError
raised after everything else was delivered (:class:`~trolley_tasks.downloaders.shortfall.Shortfall`).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.presentation import PresentationContext

from trolley_tasks.core import Downloadable, InstanceReference, is_valid_uid
from trolley_tasks.downloaders.base import DownloaderBase, RawPayload
from trolley_tasks.downloaders.dimse_retrieve import RetrieveLoop, RetrieveRequest, plan_requests
from trolley_tasks.errors import (
    ConfigurationError,
    RequestRejectedError,
    TrolleyError,
)
from trolley_tasks.formats.part10 import Part10File
from trolley_tasks.transports.dimse import (
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    AssociationManager,
    DimseTLS,
)
from trolley_tasks.transports.storage_scp import (
    DEFAULT_MAX_INSTANCE_BYTES,
    StorageReceiver,
    count_dataset_bytes,
    receive_datasets_on_disk,
    remove_partial_dataset,
    take_dataset,
)

__all__ = ["CGet", "CMove", "StorageReceiver"]

MAX_STORAGE_CONTEXTS = 126
"""128 presentation contexts per association (PS3.8 9.3.2.2), less the GET and FIND contexts."""

_BROAD_STORAGE = frozenset(str(cx.abstract_syntax) for cx in StoragePresentationContexts)
"""pynetdicom's 120 most common storage SOP classes: what C-GET proposes when the SOP classes are unknown."""


class CGet(RetrieveLoop, DownloaderBase):
    """Download with C-GET: the PACS sends the instances back on our own association (PS3.4 C.4.3).

    The association proposes, besides the GET and FIND contexts, one storage context per SOP class we expect, each
    with an SCP/SCU role selection item that makes us the storage SCP (PS3.7 D.3.3.4); without it the PACS may not
    send. The SOP classes come from ``sop_classes``, and from ``.data.SOPClassUID`` of Instance objects found by a
    searcher; when neither says, pynetdicom's 120 most common storage classes are proposed. Each storage context
    offers every transfer syntax pynetdicom knows, so the PACS can send what it stores without transcoding.

    Parameters
    ----------
    host, port, aet, aec
        The PACS's DICOM address, our calling AE title and the PACS's called AE title.
    source
        A name for errors and logs; defaults to ``dicom://AEC@host:port``.
    timeout
        Seconds for the connect, the association answer, each DIMSE response and network idleness.
    tls
        DICOM TLS settings, or None for plain TCP.
    sop_classes
        Storage SOP class UIDs to propose always (for example when the searcher returns none).
    max_instance_bytes
        The largest instance accepted: counted as its P-DATA arrive; a larger one aborts the association and fails
        the request as request-rejected (the same instance would be as large next time).

    Arrivals never wait in memory: pynetdicom writes each dataset to a temporary file as it arrives
    (:func:`~trolley_tasks.transports.storage_scp.receive_datasets_on_disk`), the C-STORE handler moves it into a
    private folder of this downloader, and the instance is handed on as that file
    (:class:`~trolley_tasks.formats.part10.Part10File`), which storage renames into place.
    """

    operation = "C-GET"

    def __init__(
        self,
        host: str,
        port: int | str,
        aet: str,
        aec: str,
        *,
        source: str | None = None,
        timeout: float = 30.0,
        tls: DimseTLS | None = None,
        sop_classes: Iterable[str] | None = None,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    ) -> None:
        self.sop_classes = frozenset(sop_classes or ())
        self.max_instance_bytes = int(max_instance_bytes)
        self._counts = [0, 0]
        self._oversize = False
        self._arrival_dir: Path | None = None
        receive_datasets_on_disk()
        bad = sorted(uid for uid in self.sop_classes if not is_valid_uid(uid))
        if bad:
            raise ConfigurationError(f"sop_classes holds values that are not UIDs: {bad[:3]}")
        self._proposed: frozenset[str] = frozenset()
        self._arrivals: deque[tuple[InstanceReference, Part10File]] = deque()
        self._current: RetrieveRequest | None = None
        contexts, roles = self._negotiation(self.sop_classes)
        self.associations = AssociationManager(
            host,
            int(port),
            aet,
            aec,
            contexts=contexts,
            roles=roles,
            timeout=timeout,
            tls=tls,
            source=source,
            handlers=[
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_PDU_RECV, self._on_pdu),
                (evt.EVT_CONN_CLOSE, lambda event: remove_partial_dataset(event.assoc)),
            ],
        )
        self.source = self.associations.source

    def __repr__(self) -> str:
        return f"CGet({self.associations!r})"

    def close(self) -> None:
        """Release the association; remove arrivals nobody took."""
        self.associations.release()
        if self._arrival_dir is not None:
            shutil.rmtree(self._arrival_dir, ignore_errors=True)
            self._arrival_dir = None

    def iter_raw(
        self, objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """Each instance of ``objects`` (studies, series or instances, references or searched objects)."""
        requests, sop_classes = plan_requests(objects)
        needed = self.sop_classes | sop_classes
        if not self._covers(needed):
            self.associations.propose(*self._negotiation(needed))
        return self.run(requests)

    # ----------------------------------------------------------------------------------------------------------------

    def _covers(self, sop_classes: frozenset[str]) -> bool:
        """Whether the current proposal offers a storage context for each of ``sop_classes`` (the broad set when
        they are unknown)."""
        if not sop_classes:
            return self._proposed == _BROAD_STORAGE
        return sop_classes <= self._proposed

    def _negotiation(self, sop_classes: frozenset[str]) -> tuple[list[PresentationContext], list[Any]]:
        """GET and FIND contexts, one storage context with an SCP role item per SOP class (the broad set when none
        is known); remembered as the current proposal."""
        if len(sop_classes) > MAX_STORAGE_CONTEXTS:
            raise ConfigurationError(
                f"{len(sop_classes)} storage SOP classes do not fit in one association "
                f"(at most {MAX_STORAGE_CONTEXTS}); download fewer series at a time"
            )
        self._proposed = sop_classes or _BROAD_STORAGE
        storage = sorted(self._proposed)
        contexts = [build_context(STUDY_ROOT_GET), build_context(STUDY_ROOT_FIND)]
        contexts += [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in storage]
        roles = [build_role(uid, scp_role=True) for uid in storage]
        return contexts, roles

    def send(self, request: RetrieveRequest) -> Iterator[Dataset]:
        self._arrivals.clear()
        self._current = request
        self._counts[:] = [0, 0]
        self._oversize = False
        try:
            identifier = request.identifier()
            for status, _ in self.associations.send_c_get(identifier, STUDY_ROOT_GET, request.reference):
                yield status
        except TrolleyError as exc:
            if self._oversize:  # we aborted the association ourselves: say why
                raise RequestRejectedError(
                    f"C-GET: an instance is larger than {self.max_instance_bytes} bytes, the most accepted "
                    "(max_instance_bytes); the association was aborted",
                    source=self.source,
                    reference=request.reference,
                ) from exc
            raise
        finally:
            self._current = None

    def collect(self, request: RetrieveRequest, delivered: set[str]) -> Iterator[tuple[InstanceReference, RawPayload]]:
        while self._arrivals:
            yield self._arrivals.popleft()

    def subop_failure_error(self, request: RetrieveRequest, failed: int) -> RequestRejectedError:
        """C-GET sub-operations fail most often because the instance's SOP class had no storage context on our
        association, which retrying does not change: fail now, and say how to fix it."""
        return RequestRejectedError(
            f"C-GET: {failed} sub-operation(s) failed; if their SOP classes were not proposed, pass them as "
            "CGet(sop_classes=...) or search at INSTANCE level first so that SOPClassUID is known",
            source=self.source,
            reference=request.reference,
        )

    def _on_pdu(self, event: Any) -> None:
        """EVT_PDU_RECV: an instance past ``max_instance_bytes`` aborts the association while it streams."""
        counted = count_dataset_bytes(event.pdu, self._counts)
        if counted and self._counts[0] > self.max_instance_bytes and not self._oversize:
            self._oversize = True
            event.assoc.abort(block=False)

    def _on_store(self, event: Any) -> int:
        """EVT_C_STORE on our association: move the instance's file into our folder and queue it for the iterator
        (runs in pynetdicom's thread)."""
        request = self._current
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if request is None or not is_valid_uid(uid):
            return 0xC000  # unsolicited, or a UID that cannot name a file: refuse the sub-operation
        if self._arrival_dir is None:
            self._arrival_dir = Path(tempfile.mkdtemp(prefix="trolley-get-"))
        path = self._arrival_dir / f"{uid}.{secrets.token_hex(4)}.dcm"
        try:
            take_dataset(event, path)
        except OSError:
            return 0xA700  # out of resources (PS3.4 B.2.3): our disk failed
        series_uid = request.series_uid
        if series_uid is None:  # a study-level C-GET: read the series from the header, never the pixels
            header = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            series_uid = str(header.get("SeriesInstanceUID", ""))
            if not is_valid_uid(series_uid):
                path.unlink(missing_ok=True)
                return 0xC000
        self._arrivals.append((InstanceReference(request.study_uid, series_uid, uid), Part10File(path)))
        return 0x0000


# C-MOVE lives in its own module; this module stays its public home (dicomtrolley's import path).
from trolley_tasks.downloaders.dicom_qr_move import CMove  # noqa: E402
