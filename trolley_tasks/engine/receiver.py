"""The C-MOVE receiver of a worker host: one Storage SCP per c-move profile, shared by every worker process.

A PACS knows one host and port per destination AE title (PS3.4 C.4.2), so the receiver belongs to the host. The
worker's main process starts it when the worker is ready (:func:`start_host_receivers`); the pool processes fetch
with ``CMove(run_receiver=False, spool_dir=...)`` and pick their instances out of the shared spool by
SOPInstanceUID. When the port is taken, another worker on this host already runs the receiver with the same
configuration and spool, and this one relies on it.
"""

from __future__ import annotations

import logging

from trolley_tasks.engine.context import default_spool
from trolley_tasks.engine.settings import Settings
from trolley_tasks.errors import ConfigurationError
from trolley_tasks.transports.storage_scp import StorageReceiver

log = logging.getLogger("trolley.engine.receiver")


def start_host_receivers(settings: Settings) -> list[StorageReceiver]:
    """Start a receiver for every c-move profile whose port is free on this host; return those started."""
    started = []
    for name, profile in settings.sources.items():
        if profile.downloader != "c-move" or profile.move_destination is None or profile.receiver_port is None:
            continue
        spool = profile.spool_dir or default_spool(settings, name)
        receiver = StorageReceiver(profile.move_destination, profile.receiver_host, profile.receiver_port, spool)
        try:
            receiver.start()
        except ConfigurationError as exc:
            log.info("%s; assuming another worker on this host runs the receiver of %s (spool %s)", exc, name, spool)
            continue
        started.append(receiver)
    return started
