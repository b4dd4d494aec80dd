"""A Storage SCP (PS3.4 Annex B) that C-MOVE sends to: it writes each arriving instance to a spool folder.

A C-MOVE (PS3.4 C.4.2) makes the PACS open its *own* association to a destination AE and C-STORE the instances
there. A production PACS knows one destination per AE title, each with one host and port, so the receiver belongs to
the **worker host**, not to a worker process: several Celery processes on one host share one receiver and its spool,
and each picks out the instances it asked for by SOPInstanceUID (:class:`~trolley_tasks.downloaders.dicom_qr.CMove`).

Each instance is written as ``<spool_dir>/<SOPInstanceUID>.dcm``, a DICOM Part 10 file with the file meta header
(PS3.10 7.1) built from the C-STORE request, through the one atomic writer
(:func:`trolley_tasks.storage.durable.write_file`: temp file, fsync, rename), so a reader never sees a half-written
file under the final name and a claimed arrival can be renamed straight into the output. The name comes from the
request's Affected SOP Instance UID, validated against the UID grammar before it touches a path.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer

from trolley_tasks.core import is_valid_uid
from trolley_tasks.errors import ConfigurationError
from trolley_tasks.storage.durable import write_file

logger = logging.getLogger("trolley.dimse")

STATUS_SUCCESS = int(Status.SUCCESS)
STATUS_OUT_OF_RESOURCES = 0xA700
"""C-STORE "Refused: Out of Resources" (PS3.4 B.2.3); pynetdicom's ``STORAGE_SERVICE_CLASS_STATUS`` lists it."""
STATUS_CANNOT_UNDERSTAND = 0xC000
"""C-STORE "Error: Cannot understand" (PS3.4 B.2.3)."""


def spool_path(spool_dir: Path, sop_instance_uid: str) -> Path:
    """Where the receiver puts one instance."""
    return spool_dir / f"{sop_instance_uid}.dcm"


class StorageReceiver:
    """A C-STORE SCP in a background thread, writing what arrives to ``spool_dir``.

    Parameters
    ----------
    aet
        The AE title the PACS knows as the move destination.
    host, port
        Where to listen; the PACS must be configured with this host's address and this port for ``aet``.
    spool_dir
        The folder shared with every CMove downloader of this host. Created if missing.

    Examples
    --------
    >>> with StorageReceiver("TROLLEY", "0.0.0.0", 11113, Path("/var/spool/trolley")):
    ...     ...  # run workers whose CMove has run_receiver=False and the same spool_dir
    """

    def __init__(self, aet: str, host: str, port: int, spool_dir: str | Path) -> None:
        self.aet = aet
        self.host = host
        self.port = int(port)
        self.spool_dir = Path(spool_dir)
        self.received = 0
        """Instances written so far (for logs and tests)."""
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"StorageReceiver({self.aet}@{self.host}:{self.port}, spool={str(self.spool_dir)!r}, {state})"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> StorageReceiver:
        """Listen in a background thread; ConfigurationError when the address cannot be bound."""
        if self._server is not None:
            return self
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.aet)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.maximum_associations = 16
        try:
            self._server = ae.start_server(
                (self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
            )
        except OSError as exc:
            raise ConfigurationError(
                f"the C-MOVE receiver cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                source=f"receiver {self.aet}",
            ) from exc
        logger.info("C-MOVE receiver %s listening on %s:%s, spool %s", self.aet, self.host, self.port, self.spool_dir)
        return self

    def stop(self) -> None:
        """Stop listening; instances already written stay in the spool."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def __enter__(self) -> StorageReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_store(self, event: Any) -> int:
        """Write one C-STORE to the spool. Answers 0xC000 for an unusable UID, 0xA700 when the disk fails."""
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if not is_valid_uid(uid):
            logger.warning("receiver %s refused an instance with SOPInstanceUID %r", self.aet, uid[:80])
            return STATUS_CANNOT_UNDERSTAND
        try:
            write_file(spool_path(self.spool_dir, uid), event.encoded_dataset(include_meta=True))
        except OSError as exc:
            logger.error("receiver %s could not write %s: %s", self.aet, uid, exc)
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            self.received += 1
        return STATUS_SUCCESS
