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

import os
import secrets
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from io import BytesIO
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
    NonInstanceParameterError,
    RequestRejectedError,
    TransientNetworkError,
)
from trolley_tasks.formats.part10 import Part10File
from trolley_tasks.transports.dimse import (
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    AssociationManager,
    DimseTLS,
)
from trolley_tasks.transports.storage_scp import StorageReceiver, spool_path

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
    ) -> None:
        self.sop_classes = frozenset(sop_classes or ())
        bad = sorted(uid for uid in self.sop_classes if not is_valid_uid(uid))
        if bad:
            raise ConfigurationError(f"sop_classes holds values that are not UIDs: {bad[:3]}")
        self._proposed: frozenset[str] = frozenset()
        self._arrivals: deque[tuple[InstanceReference, bytes]] = deque()
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
            handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        self.source = self.associations.source

    def __repr__(self) -> str:
        return f"CGet({self.associations!r})"

    def close(self) -> None:
        """Release the association."""
        self.associations.release()

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
        try:
            identifier = request.identifier()
            for status, _ in self.associations.send_c_get(identifier, STUDY_ROOT_GET, request.reference):
                yield status
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

    def _on_store(self, event: Any) -> int:
        """EVT_C_STORE on our association: queue the instance for the iterator (runs in pynetdicom's thread)."""
        request = self._current
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if request is None or not is_valid_uid(uid):
            return 0xC000  # unsolicited, or a UID that cannot name a file: refuse the sub-operation
        data = event.encoded_dataset(include_meta=True)
        series_uid = request.series_uid
        if series_uid is None:  # a study-level C-GET: read the series from the header, never the pixels
            header = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            series_uid = str(header.get("SeriesInstanceUID", ""))
            if not is_valid_uid(series_uid):
                return 0xC000
        self._arrivals.append((InstanceReference(request.study_uid, series_uid, uid), data))
        return 0x0000


class CMove(RetrieveLoop, DownloaderBase):
    """Download with C-MOVE: the PACS sends the instances to ``destination_aet``, whose storage SCP writes them to a
    spool folder, where we pick them up by SOPInstanceUID (PS3.4 C.4.2).

    A production PACS knows one destination per AE title, with one host and port, so the receiver belongs to the
    worker **host**: with ``run_receiver=False`` (the engine) a :class:`StorageReceiver` already runs on this host,
    writing to ``spool_dir``, and every worker process shares it. With ``run_receiver=True`` (a script or
    :class:`~trolley_tasks.trolley.Trolley` in one process) this downloader starts its own receiver on first use and
    stops it on :meth:`close`.

    Because arrivals are matched by SOPInstanceUID, C-MOVE needs instance references or objects searched at INSTANCE
    level; studies and series raise :class:`~trolley_tasks.errors.NonInstanceParameterError` (search them first).

    Parameters
    ----------
    destination_aet
        The AE title the PACS sends to; it must be registered on the PACS with this host and ``receiver_port``.
    receiver_port, receiver_host
        Where the receiver listens.
    spool_dir
        The receiver's folder; a private temporary folder (removed on close) when None and ``run_receiver`` is True.
    run_receiver
        Start a receiver in this process (True), or rely on one already running on this host (False).
    """

    operation = "C-MOVE"

    def __init__(
        self,
        host: str,
        port: int | str,
        aet: str,
        aec: str,
        *,
        destination_aet: str,
        receiver_port: int,
        receiver_host: str = "127.0.0.1",
        spool_dir: str | Path | None = None,
        run_receiver: bool = True,
        source: str | None = None,
        timeout: float = 30.0,
        tls: DimseTLS | None = None,
    ) -> None:
        if spool_dir is None and not run_receiver:
            raise ConfigurationError("CMove(run_receiver=False) needs the spool_dir of the host's receiver")
        self.destination_aet = destination_aet
        self.associations = AssociationManager(
            host,
            int(port),
            aet,
            aec,
            contexts=[build_context(STUDY_ROOT_MOVE), build_context(STUDY_ROOT_FIND)],
            timeout=timeout,
            tls=tls,
            source=source,
        )
        self.source = self.associations.source
        self._own_spool = spool_dir is None
        self.spool_dir = Path(spool_dir) if spool_dir is not None else Path(tempfile.mkdtemp(prefix="trolley-move-"))
        self.receiver = StorageReceiver(destination_aet, receiver_host, receiver_port, self.spool_dir)
        self.run_receiver = run_receiver

    def __repr__(self) -> str:
        return f"CMove({self.associations!r} -> {self.destination_aet}, {self.receiver!r})"

    def close(self) -> None:
        """Release the association, stop the receiver this downloader started, remove its private spool."""
        self.associations.release()
        if self.run_receiver:
            self.receiver.stop()
        if self._own_spool:
            shutil.rmtree(self.spool_dir, ignore_errors=True)

    def iter_raw(
        self, objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """Each instance of ``objects``, which must be instance references or objects searched to INSTANCE level."""
        requests, _ = plan_requests(objects)
        coarse = next((r for r in requests if r.level != "IMAGE"), None)
        if coarse is not None:
            raise NonInstanceParameterError(
                f"C-MOVE matches arrivals by SOPInstanceUID; search {coarse.reference} at INSTANCE level first",
                source=self.source,
                reference=coarse.reference,
            )
        if self.run_receiver:
            self.receiver.start()
        return self.run(requests)

    def send(self, request: RetrieveRequest) -> Iterator[Dataset]:
        responses = self.associations.send_c_move(
            request.identifier(), self.destination_aet, STUDY_ROOT_MOVE, request.reference
        )
        for status, _ in responses:
            yield status

    def collect(self, request: RetrieveRequest, delivered: set[str]) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """Claim the spool files of the instances asked for, and hand each on as a file, not as bytes: storage
        checks it in place and renames it into the output (:class:`~trolley_tasks.formats.part10.Part10File`).

        The claim is a rename, so that two processes sharing the spool never both take one file. A claimed file
        left behind (the consumer stopped) keeps its ``.claimed`` name and is never handed on twice.
        """
        assert request.series_uid is not None
        for uid in request.instance_uids:
            if uid in delivered:
                continue
            path = spool_path(self.spool_dir, uid)
            claimed = path.with_name(f".{path.name}.claimed-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                continue
            yield InstanceReference(request.study_uid, request.series_uid, uid), Part10File(claimed)

    def subop_failure_error(self, request: RetrieveRequest, failed: int) -> TransientNetworkError:
        """C-MOVE sub-operations fail most often on the way to the receiver (busy, restarting, unreachable), which
        a later attempt can get past."""
        return TransientNetworkError(
            f"C-MOVE: {failed} sub-operation(s) towards {self.destination_aet!r} failed",
            source=self.source,
            reference=request.reference,
        )

    def destination(self) -> str | None:
        return self.destination_aet
