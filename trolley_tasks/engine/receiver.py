"""The C-MOVE receivers of a worker host: one Storage SCP per c-move profile, shared by every worker process, and
outliving any one of them.

A PACS knows one host and port per destination AE title (PS3.4 C.4.2), so the receiver belongs to the host, not to a
worker process. Every worker's main process keeps a :class:`HostReceivers` and calls :meth:`HostReceivers.ensure`
when it is ready and on every watchdog tick: the first to bind the port runs the receiver; the others find the port
taken and rely on it. When the worker holding it dies (SIGKILL, OOM, a deploy), the port is free again and the next
tick of any surviving worker on the host binds it, within ``[engine] sweep_interval`` seconds. A C-MOVE in flight
at that moment loses its sub-operations, fails as transient, and is retried by the policy.

The pool processes fetch with ``CMove(run_receiver=False, spool_dir=...)`` and pick their instances out of the
shared spool by SOPInstanceUID.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trolley_tasks.engine.context import default_spool
from trolley_tasks.engine.settings import Settings
from trolley_tasks.errors import ConfigurationError
from trolley_tasks.profiles import build_receiver
from trolley_tasks.transports.storage_scp import StorageReceiver

log = logging.getLogger("trolley.engine.receiver")


class HostReceivers:
    """The receivers this process runs for the host, started on demand (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: dict[str, StorageReceiver] = {}
        self._told: set[str] = set()

    def ensure(self) -> list[str]:
        """Start the receiver of every c-move profile whose port is free on this host; return the profiles started
        by this call."""
        started = []
        for name, profile in self.settings.sources.items():
            if name in self.running or profile.downloader != "c-move":
                continue
            if profile.move_destination is None or profile.receiver_port is None:
                continue
            spool = profile.spool_dir or default_spool(self.settings, name)
            try:
                receiver = build_receiver(profile, name, Path(spool))
                receiver.start()
            except ConfigurationError as exc:
                if name not in self._told:  # said once, not every tick
                    self._told.add(name)
                    log.info("%s; another worker on this host runs the receiver of %s (spool %s)", exc, name, spool)
                continue
            self.running[name] = receiver
            started.append(name)
            log.info("C-MOVE receiver of %s listening on %s:%s", name, receiver.host, receiver.port)
        for receiver in self.running.values():
            receiver.purge()  # stale spool files (at most once a minute)
        return started

    def stop(self) -> None:
        while self.running:
            _, receiver = self.running.popitem()
            receiver.stop()
