"""C-MOVE downloads (PS3.4 C.4.2): the PACS sends the asked instances to our Storage SCP, which stores only what
this host's fetches registered as outstanding (:mod:`trolley_tasks.transports.move_spool`).

Split from :mod:`trolley_tasks.downloaders.dicom_qr` (which re-exports :class:`CMove`, its public home) along the
seam between the two retrieve styles: C-GET receives on its own association, C-MOVE through the host's receiver.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydicom import Dataset
from pynetdicom import build_context

from trolley_tasks.core import Downloadable, InstanceReference
from trolley_tasks.downloaders.base import DownloaderBase, RawPayload
from trolley_tasks.downloaders.dimse_retrieve import RetrieveLoop, RetrieveRequest, plan_requests
from trolley_tasks.errors import (
    ConfigurationError,
    NonInstanceParameterError,
    TransientNetworkError,
    UnsafePathError,
)
from trolley_tasks.formats.part10 import Part10File
from trolley_tasks.transports.dimse import (
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
    AssociationManager,
    DimseTLS,
)
from trolley_tasks.transports.move_spool import MoveSpool
from trolley_tasks.transports.storage_scp import (
    DEFAULT_MAX_ASSOCIATION_BYTES,
    DEFAULT_MAX_INSTANCE_BYTES,
    StorageReceiver,
    route_address,
)


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

    Only what the receiver stored for an outstanding request of this downloader is handed on: before each C-MOVE
    the asked UIDs are registered in the spool (:class:`~trolley_tasks.transports.move_spool.MoveSpool`), the
    receiver refuses any other instance, and :meth:`collect` takes only the files stored under this request's secret
    tokens, never a file merely named after a UID.

    Parameters
    ----------
    destination_aet
        The AE title the PACS sends to; it must be registered on the PACS with this host and ``receiver_port``.
    receiver_port, receiver_host
        Where the receiver listens. ``receiver_host`` None: the local address of the route to the PACS
        (127.0.0.1 when the PACS runs on this host), never every interface.
    spool_dir
        The receiver's folder; a private temporary folder (removed on close) when None and ``run_receiver`` is True.
    run_receiver
        Start a receiver in this process (True), or rely on one already running on this host (False).
    receiver_allowed_aets, receiver_allowed_hosts
        Calling AE titles and peer addresses the receiver this downloader runs accepts; default the PACS's own
        (``aec`` and ``host``).
    max_instance_bytes, max_association_bytes
        Caps of the receiver this downloader runs (see :class:`StorageReceiver`).
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
        receiver_host: str | None = None,
        spool_dir: str | Path | None = None,
        run_receiver: bool = True,
        source: str | None = None,
        timeout: float = 30.0,
        tls: DimseTLS | None = None,
        receiver_allowed_aets: Iterable[str] | None = None,
        receiver_allowed_hosts: Iterable[str] | None = None,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
        max_association_bytes: int = DEFAULT_MAX_ASSOCIATION_BYTES,
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
        self.spool = MoveSpool(self.spool_dir)
        self._tokens: dict[str, str] = {}
        if receiver_host is None:  # the host's receiver (run_receiver=False) has its own address: no lookup
            receiver_host = route_address(host, int(port)) if run_receiver else "(the host's receiver)"
        self.receiver = StorageReceiver(
            destination_aet,
            receiver_host,
            receiver_port,
            self.spool_dir,
            allowed_aets=receiver_allowed_aets if receiver_allowed_aets is not None else [aec],
            allowed_hosts=receiver_allowed_hosts if receiver_allowed_hosts is not None else [host],
            max_instance_bytes=max_instance_bytes,
            max_association_bytes=max_association_bytes,
        )
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
        else:
            try:
                self.spool.prepare()
            except UnsafePathError as exc:
                raise ConfigurationError(f"C-MOVE spool: {exc.message}", source=self.source) from exc
        return self.run(requests)

    def send(self, request: RetrieveRequest) -> Iterator[Dataset]:
        """The C-MOVE, with its instances registered as expected first and forgotten once it is over."""
        self._tokens = self.spool.expect(request.instance_uids)
        try:
            responses = self.associations.send_c_move(
                request.identifier(), self.destination_aet, STUDY_ROOT_MOVE, request.reference
            )
            for status, _ in responses:
                yield status
        finally:
            self.spool.forget(request.instance_uids)

    def collect(self, request: RetrieveRequest, delivered: set[str]) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """Claim the spool files the receiver stored for this request's tokens, and hand each on as a file, not as
        bytes: storage checks it in place and renames it into the output
        (:class:`~trolley_tasks.formats.part10.Part10File`).

        The claim is a rename, so that two processes sharing the spool never both take one file. A claimed file
        left behind (the consumer stopped) keeps its ``.claimed`` name and is never handed on twice.

        Called after every response of the move (one per instance sent). It lists the spool once and takes the
        arrivals that carry this request's tokens; it used to try a rename for every instance not yet delivered,
        which is quadratic in the request's size: about 1,250 failed renames for a 50-instance batch and 125,000
        for a request of 500.
        """
        assert request.series_uid is not None
        outstanding = {uid: self._tokens.get(uid) for uid in request.instance_uids if uid not in delivered}
        if not any(outstanding.values()):
            return
        for uid, token, path in self.spool.arrivals():
            if outstanding.get(uid) != token:  # another request's, or this UID's arrival for an older expectation
                continue
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
