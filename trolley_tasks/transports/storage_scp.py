"""A Storage SCP (PS3.4 Annex B) that C-MOVE sends to, and that trusts no one else.

A C-MOVE (PS3.4 C.4.2) makes the PACS open its *own* association to a destination AE and C-STORE the instances
there. A production PACS knows one destination per AE title, each with one host and port, so the receiver belongs to
the **worker host**, not to a worker process: several Celery processes on one host share one receiver and its spool
(:class:`~trolley_tasks.transports.move_spool.MoveSpool`), and each picks out the instances it asked for.

Anyone who can reach the port can open an association, so the receiver accepts, in this order:

1. associations from the allowed peer addresses only (checked at ``EVT_REQUESTED``, before negotiation; rejected
   permanent, "no reason given", PS3.8 9.3.4), calling the allowed AE titles only (``require_calling_aet``: rejected
   "calling AE title not recognised") and calling our own AE title (``require_called_aet``: "called AE title not
   recognised");
2. per association, at most ``max_association_bytes`` of data and, per instance, ``max_instance_bytes``: counted as
   the P-DATA-TF PDUs arrive (PS3.8 9.3.5, E.2), so that an oversize dataset is cut off by an A-ABORT while it
   streams, never after it was received whole;
3. per C-STORE, a SOP Instance UID that a fetch of this host registered as outstanding (a C-MOVE it sent); any other
   gets the failure status 0x0124 "Refused: Not Authorised" (PS3.7 C.5) and is not stored.

Datasets are never held in memory: pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` writes each arriving fragment to a
temporary file (under the system temporary directory, ``TMPDIR``), which the C-STORE handler then moves into the
spool as ``<UID>.<token>.dcm``: a DICOM Part 10 file with a file meta header (PS3.10 7.1) built from the request.
That option is process-wide: :func:`receive_datasets_on_disk` sets it, and C-GET works with it too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer

from trolley_tasks.errors import ConfigurationError, UnsafePathError
from trolley_tasks.storage.durable import replace, write_file
from trolley_tasks.transports.move_spool import MoveSpool

logger = logging.getLogger("trolley.dimse")

STATUS_SUCCESS = int(Status.SUCCESS)
STATUS_NOT_AUTHORISED = 0x0124
"""General status "Refused: Not Authorised" (PS3.7 C.5): an instance no outstanding move asked for."""
STATUS_OUT_OF_RESOURCES = 0xA700
"""C-STORE "Refused: Out of Resources" (PS3.4 B.2.3); pynetdicom's ``STORAGE_SERVICE_CLASS_STATUS`` lists it."""
STATUS_CANNOT_UNDERSTAND = 0xC000
"""C-STORE "Error: Cannot understand" (PS3.4 B.2.3)."""

DEFAULT_MAX_INSTANCE_BYTES = 4 * 1024**3
DEFAULT_MAX_ASSOCIATION_BYTES = 64 * 1024**3
MAX_ASSOCIATIONS = 8
"""Concurrent associations; peers are already filtered, so this only bounds what one PACS may open at once."""


def receive_datasets_on_disk() -> None:
    """Make pynetdicom write every received C-STORE dataset to a temporary file as it arrives (process-wide)."""
    _config.STORE_RECV_CHUNKED_DATASET = True


def route_address(host: str, port: int) -> str:
    """The local address this host uses to reach ``host``: the interface the PACS can send back to.

    No packet is sent (a UDP socket is only connected). 127.0.0.1 when the PACS is on this host.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except (OSError, IndexError) as exc:
        raise ConfigurationError(f"cannot resolve the PACS host {host!r} to choose the receiver's address") from exc
    with socket.socket(family[0], socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(family[4])
            return str(probe.getsockname()[0])
        except OSError as exc:
            raise ConfigurationError(f"no route to the PACS host {host!r}: set receiver_host") from exc


def resolve_addresses(hosts: Iterable[str]) -> frozenset[str]:
    """Every IP address of ``hosts`` (names are resolved once, when the receiver starts)."""
    addresses: set[str] = set()
    for host in hosts:
        with contextlib.suppress(ValueError):
            addresses.add(str(ipaddress.ip_address(host)))
            continue
        try:
            addresses.update(str(info[4][0]) for info in socket.getaddrinfo(host, None))
        except OSError as exc:
            raise ConfigurationError(f"cannot resolve the allowed receiver peer {host!r}") from exc
    return frozenset(addresses)


def count_dataset_bytes(pdu: Any, counts: list[int]) -> bool:
    """Add a P-DATA-TF PDU's dataset bytes to ``counts[0]`` (this message) and ``counts[1]`` (all); False for any
    other PDU.

    A P-DATA-TF PDU holds presentation data values whose first byte is the message control header (PS3.8 E.2):
    bit 0 set for a command fragment, bit 1 for the last fragment. A last command fragment starts a new message, so
    the per-message count restarts there.
    """
    items = getattr(pdu, "presentation_data_value_items", None)
    if not items:
        return False
    for item in items:
        value = item.presentation_data_value
        if value[0] & 1:
            if value[0] & 2:
                counts[0] = 0
            continue
        counts[0] += len(value) - 1
        counts[1] += len(value) - 1
    return True


def take_dataset(event: Any, target: Path) -> None:
    """Put the dataset of an EVT_C_STORE event at ``target`` as a Part 10 file, in one step: moved from pynetdicom's
    temporary file (:func:`receive_datasets_on_disk`), or written from memory if that option was turned off.

    Atomic, not durable: ``target`` is a hand-off (a C-GET's arrival folder, the C-MOVE spool), and storage syncs
    the file before it renames it into the output (:class:`~trolley_tasks.storage.durable.Committer`). A power cut
    loses at most an arrival that no ledger counted yet, which the next run fetches again; a C-MOVE arrival's name
    holds its expectation's token, so one left empty by a crash is never claimed, and the spool's purge removes it.
    Two fsyncs here (file and folder) were a second and third journal commit per instance on the C-GET and C-MOVE
    paths."""
    if _config.STORE_RECV_CHUNKED_DATASET:
        replace(Path(event.dataset_path), target)
    else:
        write_file(target, event.encoded_dataset(include_meta=True), sync=False)


def remove_partial_dataset(assoc: Any) -> None:
    """Remove the temporary file of a dataset cut off mid-way on ``assoc`` (pynetdicom removes it only after a
    complete C-STORE was handled, so an abort or a dropped connection would leave it in TMPDIR)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is not None:
        with contextlib.suppress(OSError):
            partial.close()
            os.unlink(partial.name)


class StorageReceiver:
    """A C-STORE SCP in a background thread, storing into ``spool_dir`` what outstanding moves asked for.

    Parameters
    ----------
    aet
        The AE title the PACS knows as the move destination; stores addressed to another called AE are refused.
    host, port
        Where to listen; the PACS must be configured with this address and port for ``aet``. Never ``0.0.0.0``
        unless you mean every interface (see docs/security.md).
    spool_dir
        The folder shared with every CMove downloader of this host; made private (mode 0700) if missing.
    allowed_aets
        Calling AE titles accepted (the PACS's own); empty refuses every peer.
    allowed_hosts
        Peer addresses or host names accepted (the PACS's); empty refuses every peer.
    max_instance_bytes, max_association_bytes
        Data accepted per instance and per association; more is cut off with an A-ABORT.

    Examples
    --------
    >>> with StorageReceiver("TROLLEY", "10.0.0.5", 11113, Path("/var/spool/trolley"),
    ...                      allowed_aets=["PACS"], allowed_hosts=["10.0.0.9"]):
    ...     ...  # run workers whose CMove has run_receiver=False and the same spool_dir
    """

    def __init__(
        self,
        aet: str,
        host: str,
        port: int,
        spool_dir: str | Path,
        *,
        allowed_aets: Iterable[str],
        allowed_hosts: Iterable[str],
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
        max_association_bytes: int = DEFAULT_MAX_ASSOCIATION_BYTES,
    ) -> None:
        self.aet = aet
        self.host = host
        self.port = int(port)
        self.spool = MoveSpool(spool_dir)
        self.spool_dir = self.spool.directory
        self.allowed_aets = tuple(allowed_aets)
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_instance_bytes = int(max_instance_bytes)
        self.max_association_bytes = int(max_association_bytes)
        self.received = 0
        """Instances stored so far (for logs and tests)."""
        self.refused = 0
        """C-STOREs refused, associations rejected and associations cut off (for logs and tests)."""
        self._addresses: frozenset[str] = frozenset()
        self._counts: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"StorageReceiver({self.aet}@{self.host}:{self.port}, spool={str(self.spool_dir)!r}, {state})"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> StorageReceiver:
        """Listen in a background thread; ConfigurationError when the address cannot be bound or the spool is
        unsafe."""
        if self._server is not None:
            return self
        try:
            self.spool.prepare()
        except UnsafePathError as exc:
            raise ConfigurationError(f"C-MOVE spool: {exc.message}", source=f"receiver {self.aet}") from exc
        self.spool.purge(force=True)
        self._addresses = resolve_addresses(self.allowed_hosts)
        receive_datasets_on_disk()
        ae = AE(ae_title=self.aet)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.allowed_aets) or ["\\"]  # a backslash is no AE title: nobody matches
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_C_STORE, self._on_store),
        ]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise ConfigurationError(
                f"the C-MOVE receiver cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                source=f"receiver {self.aet}",
            ) from exc
        if self.host in ("0.0.0.0", "::", ""):
            logger.warning("SECURITY: C-MOVE receiver %s listens on every interface (%r)", self.aet, self.host)
        logger.info("C-MOVE receiver %s listening on %s:%s, spool %s", self.aet, self.host, self.port, self.spool_dir)
        return self

    def stop(self) -> None:
        """Stop listening; instances already stored stay in the spool."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def purge(self) -> int:
        """Remove stale spool files (at most once a minute); see :meth:`MoveSpool.purge`."""
        return self.spool.purge()

    def __enter__(self) -> StorageReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ event handlers

    def _refuse(self, what: str, *args: object) -> None:
        with self._lock:
            self.refused += 1
        logger.warning("receiver %s refused " + what, self.aet, *args)

    def _on_requested(self, event: Any) -> None:
        """EVT_REQUESTED: an A-ASSOCIATE-RQ from an address that is not the PACS's is rejected before negotiation."""
        address = str(event.assoc.requestor.address)
        if address not in self._addresses:
            self._refuse("an association from %s (not an allowed peer)", address)
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)

    def _on_rejected(self, event: Any) -> None:
        """EVT_REJECTED: pynetdicom refused a calling or called AE title that is not ours to accept."""
        requestor = event.assoc.requestor
        self._refuse(
            "an association from %s calling as %r (not an allowed AE title)", requestor.address, requestor.ae_title
        )

    def _on_pdu(self, event: Any) -> None:
        """EVT_PDU_RECV: count dataset bytes per instance and per association; cut off what exceeds a cap."""
        counts = self._counts.setdefault(id(event.assoc), [0, 0, 0])  # this instance, this association, cut off
        if counts[2] or not count_dataset_bytes(event.pdu, counts):
            return
        if counts[0] > self.max_instance_bytes or counts[1] > self.max_association_bytes:
            counts[2] = 1
            self._refuse(
                "an association from %s: over %s bytes per instance or %s per association",
                event.assoc.requestor.address,
                self.max_instance_bytes,
                self.max_association_bytes,
            )
            event.assoc.abort(block=False)

    def _on_close(self, event: Any) -> None:
        """EVT_CONN_CLOSE: forget the counts; remove the temporary file of a dataset cut off mid-way (pynetdicom
        removes it only after a complete C-STORE was handled)."""
        self._counts.pop(id(event.assoc), None)
        remove_partial_dataset(event.assoc)

    def _on_store(self, event: Any) -> int:
        """EVT_C_STORE: store an expected instance in the spool; refuse any other (see the module docstring)."""
        uid = str(event.request.AffectedSOPInstanceUID or "")
        token = self.spool.token(uid)
        if token is None:
            address = event.assoc.requestor.address
            self._refuse("SOPInstanceUID %r from %s: no outstanding move asked for it", uid[:80], address)
            return STATUS_NOT_AUTHORISED
        try:
            take_dataset(event, self.spool.arrival(uid, token))
        except OSError as exc:
            logger.error("receiver %s could not store %s: %s", self.aet, uid, exc)
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            self.received += 1
        return STATUS_SUCCESS
