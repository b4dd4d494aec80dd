"""What a worker process (or the producer) holds between tasks: the ledger, the publisher and, per source profile,
one searcher, one downloader, one throttle and one retry policy.

Clients are built lazily, once per process, from the process's own configuration (``trolley_tasks.profiles``), and
reused by every task that process runs: HTTP keep-alive sessions and DIMSE associations stay open between batches
(DESIGN.md, "Workers"). A prefork worker builds them in each child after the fork, never in the parent, so no socket
is shared between processes.

Messages carry only the job id, the profile *name* and UIDs (:class:`~trolley_tasks.engine.messages.FetchMessage`),
never a URL or a secret.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from trolley_tasks.deid import Deidentifier, DeidProfile
from trolley_tasks.downloaders.base import Downloader
from trolley_tasks.downloaders.dimse_retrieve import RetrieveLoop
from trolley_tasks.downloaders.wado_uri import WadoURI
from trolley_tasks.engine.breaker import Breaker
from trolley_tasks.engine.deidentify import UID_TEXT, deidentifier_for, profile_of, scrub_uids
from trolley_tasks.engine.ledger import Ledger
from trolley_tasks.engine.messages import Publisher
from trolley_tasks.engine.policy import Policy, policy_with_overrides
from trolley_tasks.engine.scheduler import DeferringPublisher
from trolley_tasks.engine.settings import Settings
from trolley_tasks.engine.throttle import Throttle
from trolley_tasks.errors import TrolleyError
from trolley_tasks.profiles import SourceProfile
from trolley_tasks.searchers.base import Searcher
from trolley_tasks.searchers.dicom_qr import DICOMQR
from trolley_tasks.series_filter import SeriesFilter
from trolley_tasks.storage.disk import DcmStorageDir, DICOMDiskStorage, FlatDcmStorageDir, TemplateStorage

log = logging.getLogger("trolley.engine")

LAYOUTS = {"study-series": DcmStorageDir, "flat": FlatDcmStorageDir}
"""Named layouts; anything else given as a layout is a :class:`TemplateStorage` template."""


def storage_for_layout(layout: str) -> DICOMDiskStorage:
    """``study-series`` (the default), ``flat``, or a template such as ``{PatientID}/{SOPInstanceUID}.dcm``."""
    if layout in LAYOUTS:
        return LAYOUTS[layout]()
    return TemplateStorage(layout)


@dataclass
class SourceRuntime:
    """One profile's clients in this process."""

    name: str
    profile: SourceProfile
    throttle: Throttle
    breaker: Breaker
    policy: Policy
    build_searcher: Callable[[], Searcher]
    build_downloader: Callable[[], Downloader]
    _searcher: Searcher | None = None
    _downloader: Downloader | None = None

    @property
    def searcher(self) -> Searcher:
        if self._searcher is None:
            self._searcher = self.build_searcher()
            self._share_association()
        return self._searcher

    @property
    def downloader(self) -> Downloader:
        if self._downloader is None:
            self._downloader = self.build_downloader()
            if isinstance(self._downloader, WadoURI):
                # a batch keeps several requests in flight, each beyond the first on a slot of the source's
                # throttle: the PACS sees no more requests at once than max_concurrency, across every host
                self._downloader.max_in_flight = min(WADO_URI_IN_FLIGHT, self.profile.max_concurrency)
                self._downloader.request_gate = self.throttle
            self._share_association()
        return self._downloader

    def _share_association(self) -> None:
        """A C-FIND searcher and a C-GET or C-MOVE downloader of one profile reach one PACS as one AE, and the
        downloader's association proposes C-FIND too: once both exist, the searcher uses the downloader's association
        and releases its own. Each open association is a pynetdicom thread polling every millisecond (4 to 5% of a
        core, ``python -m bench.idle_associations``) and one more association the PACS counts; the searcher's sat
        idle between expansions. The downloader is never built for this (building it may need what only a worker
        has, such as the C-MOVE spool); a new downloader after :meth:`reset_downloader` is shared again."""
        searcher, downloader = self._searcher, self._downloader
        if not isinstance(searcher, DICOMQR) or not isinstance(downloader, RetrieveLoop):
            return
        if searcher.associations is not downloader.associations:
            searcher.associations.release()
            searcher.associations = downloader.associations

    def gate(self) -> tuple[float, bool]:
        """(seconds to hold, probe): how long work for this source must wait before it may start (a closed window,
        a held source, or, for C-MOVE, no receiver listening on this host), and whether this caller is the probe
        of a held source (:mod:`.breaker`)."""
        window = self.throttle.seconds_until_open()
        if window > 0:
            return window, False
        if self.receiver_missing():
            return RECEIVER_WAIT, False
        return self.breaker.gate()

    def receiver_missing(self) -> bool:
        """A C-MOVE profile whose receiver is not listening on this host right now: the worker that ran it died, and
        another takes the port over within a watchdog tick (:mod:`~trolley_tasks.engine.receiver`). A move sent
        meanwhile would fail for a reason that is ours, not the PACS's or the instance's."""
        port = self.profile.receiver_port
        return self.profile.downloader == "c-move" and port is not None and not port_in_use(port)

    @property
    def whole_series(self) -> bool:
        """The downloader fetches a whole series per request (WADO-RS): publish a series as one message."""
        return self.downloader.whole_series

    def reset_downloader(self) -> None:
        """Drop the downloader after a transport failure, so the next fetch opens fresh connections."""
        if self._downloader is not None:
            try:
                self._downloader.close()
            except Exception:  # closing a broken client must not hide the error that broke it
                log.debug("closing the downloader of %s failed", self.name, exc_info=True)
            self._downloader = None

    def close(self) -> None:
        self.reset_downloader()
        self._searcher = None


@dataclass(frozen=True)
class JobMeta:
    """A job's fixed facts, cached per process (they never change during a job)."""

    source: str
    output: str
    layout: str
    batch_size: int
    filters: SeriesFilter | None = None
    """The job's series filter, from the job record (the one place workers learn it: never a message argument)."""
    deid: DeidProfile | None = None
    """The job's de-identification profile (``--deid``), from the job record; None for a byte-identical export."""
    link_table: bool = False
    """The export asked for a linking table: expansion (from the search's answer) and the fetch (from the header)
    keep each study's original PatientID and AccessionNumber, whichever sees them first."""


@dataclass
class EngineContext:
    """The per-process state every engine function receives.

    Parameters
    ----------
    settings
        This process's configuration (profiles, broker).
    ledger
        The ledger over the ledger Redis.
    publisher
        Where follow-up tasks go.
    max_redeliveries
        Worker-lost redeliveries of one instance before it is failed as poison.
    lease_seconds
        How long a claimed instance stays "running" without a heartbeat; the running fetch renews it every third of
        it (:mod:`~trolley_tasks.engine.heartbeat`), so only a dead holder's claim lapses (``[engine]``).
    """

    settings: Settings
    ledger: Ledger
    publisher: Publisher
    max_redeliveries: int = 3
    lease_seconds: float = 90.0
    sources: dict[str, SourceRuntime] = field(default_factory=dict)
    storages: dict[str, DICOMDiskStorage] = field(default_factory=dict)
    jobs: dict[str, JobMeta] = field(default_factory=dict)
    deidentifiers: dict[str, Deidentifier | None] = field(default_factory=dict)
    build_clients: Callable[[SourceProfile, str], tuple[Callable[[], Searcher], Callable[[], Downloader]]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def source(self, name: str) -> SourceRuntime:
        with self._lock:
            runtime = self.sources.get(name)
            if runtime is None:
                profile = self.settings.source(name)
                if profile.downloader == "c-move" and profile.spool_dir is None:
                    profile = profile.model_copy(update={"spool_dir": default_spool(self.settings, name)})
                builders = (self.build_clients or default_clients)(profile, name)
                runtime = SourceRuntime(
                    name=name,
                    profile=profile,
                    throttle=Throttle(
                        self.ledger.r,
                        name,
                        max_concurrency=profile.max_concurrency,
                        rate_limit=profile.rate_limit,
                        window=profile.window,
                        lease_seconds=self.lease_seconds,
                    ),
                    breaker=Breaker(
                        self.ledger.r,
                        name,
                        threshold=profile.breaker_threshold,
                        max_hold=profile.breaker_max_hold,
                        probe_seconds=self.lease_seconds,
                    ),
                    policy=policy_with_overrides(profile.retry, where=f"[sources.{name}.retry]"),
                    build_searcher=builders[0],
                    build_downloader=builders[1],
                )
                self.sources[name] = runtime
            return runtime

    def storage(self, layout: str) -> DICOMDiskStorage:
        if layout not in self.storages:
            self.storages[layout] = storage_for_layout(layout)
        return self.storages[layout]

    def job(self, job_id: str) -> JobMeta | None:
        meta = self.jobs.get(job_id)
        if meta is None:
            fields = self.ledger.job_fields(job_id)
            if not fields:
                return None
            filters = SeriesFilter.model_validate_json(fields["filters"]) if fields.get("filters") else None
            deid = profile_of(fields)
            meta = JobMeta(
                fields["source"],
                fields["output"],
                fields["layout"],
                int(fields["batch_size"]),
                filters,
                deid[1] if deid is not None else None,
                bool(fields.get("link_table")),
            )
            self.jobs[job_id] = meta
        return meta

    def deidentifier(self, job_id: str) -> Deidentifier | None:
        """The job's Deidentifier under this host's key (cached), or None for a byte-identical export. Raises
        ConfigurationError when the key is missing here or is another key (see :mod:`.deidentify`)."""
        if job_id not in self.deidentifiers:
            self.deidentifiers[job_id] = deidentifier_for(self.ledger.job_fields(job_id))
        return self.deidentifiers[job_id]

    def redact(self, job_id: str, text: str) -> str:
        """``text`` for a log line: in a de-identified export every UID in it becomes its pseudonym (on a host
        without the key, a digest), so that worker logs carry no original identifier; unchanged otherwise."""
        try:
            deid = self.deidentifier(job_id)
        except TrolleyError:
            return UID_TEXT.sub(lambda uid: "uid#" + hashlib.sha256(uid.group(0).encode()).hexdigest()[:12], text)
        return scrub_uids(text, deid)

    def close(self) -> None:
        for runtime in self.sources.values():
            runtime.close()
        self.sources.clear()


def default_clients(profile: SourceProfile, name: str) -> tuple[Callable[[], Searcher], Callable[[], Downloader]]:
    """Builders over ``trolley_tasks.profiles``. C-MOVE downloaders rely on the host's receiver (see
    :mod:`trolley_tasks.engine.receiver`) instead of running one each."""
    from trolley_tasks.profiles import build_downloader, build_searcher

    def searcher() -> Searcher:
        return build_searcher(profile, name)

    def downloader() -> Downloader:
        if profile.downloader == "c-move":
            return build_downloader(profile, name, run_receiver=False)
        return build_downloader(profile, name)

    return searcher, downloader


WADO_URI_IN_FLIGHT = 4
"""WADO-URI requests one batch keeps in flight at most (per-instance requests are latency-bound; issue 12)."""

RECEIVER_WAIT = 2.0
"""Seconds a C-MOVE batch waits when this host's receiver is not listening (its worker died): well within the
watchdog tick in which a surviving worker binds the port again."""


def port_in_use(port: int) -> bool:
    """True when a socket on this host listens on ``port``.

    A test bind, closed at once: no association is opened with the receiver. ``SO_REUSEADDR`` lets the bind ignore
    connections of a dead receiver lingering in TIME_WAIT (which would otherwise look like a live one), while a
    socket in LISTEN, on any address, still refuses it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))  # noqa: S104 - never listened on
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def default_spool(settings: Settings, name: str) -> Path:
    """Where the host's C-MOVE receiver of profile ``name`` writes when the profile names no ``spool_dir``."""
    return Path(settings.state_dir) / "spool" / name


def redis_client(url: str) -> redis.Redis:
    """A redis-py client for a ``redis://``, ``rediss://``, ``unix://`` or kombu-style ``redis+socket://`` URL."""
    if url.startswith("redis+socket://"):
        path, _, query = url.removeprefix("redis+socket://").partition("?")
        url = f"unix://{path}" + (f"?{query}" if query else "")
    return redis.Redis.from_url(url, health_check_interval=30)


def build_context(settings: Settings, publisher: Publisher) -> EngineContext:
    """An :class:`EngineContext` over the ledger this configuration names. Deferred work (a countdown) goes to the
    ledger's Redis, never to the broker as an ETA task (:mod:`~trolley_tasks.engine.scheduler`)."""
    client = redis_client(settings.broker.ledger())
    ledger = Ledger(client)
    return EngineContext(
        settings=settings,
        ledger=ledger,
        publisher=DeferringPublisher(publisher, client, ledger.wait_until),
        lease_seconds=settings.engine.lease_seconds,
    )
