"""The ledger: per-job and per-instance state in Redis. The instance is the unit of state.

Keys (``{J}`` is the job id in braces, a Redis Cluster hash tag, so one job's keys live on one shard and every Lua
script touches a single slot):

================================  =========  ========================================================================
key                               type       content
================================  =========  ========================================================================
``trolley:jobs``                  zset       job id -> creation time (list of jobs)
``trolley:{J}:job``               hash       counters ``expected done failed skipped bytes rows expanded
                                             failed_rows bad_rows``, ``state``, ``created_at started_at
                                             finished_at reported_at paused_at paused_seconds``, ``updated_at``
                                             (last claim, heartbeat, settle or expansion: the watchdog's clock),
                                             ``wait_until`` (deferred work is due by then), ``source output layout
                                             batch_size cohort pause_reason producer_done``
``trolley:{J}:series``            set        SeriesInstanceUIDs of the job
``trolley:{J}:s:<series digest>`` hash       ``#st`` study uid, ``#e #d #f`` expected/done/failed, and one field
                                             per SOPInstanceUID: ``state|attempts|redeliveries|lease|busy|size|path``
``trolley:{J}:excluded``          hash       SeriesInstanceUID (``series/instance`` for one instance) -> JSON
                                             exclusion (rule, instances): left out on purpose
``trolley:{J}:failures``          hash       SOPInstanceUID -> JSON failure record
``trolley:{J}:rowfail``           hash       row id -> JSON failure record of a row that could not be expanded
``trolley:{J}:failclass``         hash       error class -> how many failure records (instances and rows) have it:
                                             what a status reads, instead of every record
``trolley:{J}:rows``              set        ids of the cohort rows queued for expansion (digests of the rows)
``trolley:{J}:rowdata``           hash       row id -> the row (canonical JSON and cohort line): the ONE place that
                                             holds a search row's values (PatientID, AccessionNumber, dates)
``trolley:{J}:expanded``          set        ids of the rows whose expansion finished
``trolley:{J}:link``              hash       StudyInstanceUID -> JSON of its PatientID and AccessionNumber, kept only
                                             for a de-identified export with a linking table (``--link-table``)
``trolley:{J}:badrows``           list       JSON of rows left out by ``skip_bad_rows``
``trolley:staging:<token>[:rows]`` set, hash ids and rows of a cohort being read (a day's expiry)
``trolley:delayed``               zset       deferred messages (retries, holds) -> due time (:mod:`.scheduler`)
``trolley:breaker:<source>``      hash       the source's circuit breaker (:mod:`~trolley_tasks.engine.breaker`)
``trolley:throttle:<source>:*``   various    concurrency slots, token bucket, AIMD (:mod:`.throttle`)
================================  =========  ========================================================================

Every transition is a Lua script (:mod:`trolley_tasks.engine.ledger.lua`), so duplicates never double-count and
exactly one caller finalizes a job. When a job ends, all of its keys get ONE expiry (``ttl``, 30 days); reopening
the job (retry-failed, re-run) removes it again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis

from trolley_tasks.cohort import CohortRow
from trolley_tasks.engine.ledger import lua
from trolley_tasks.engine.ledger.reading import JOBS_KEY, LedgerReader, as_text
from trolley_tasks.engine.ledger.transitions import Claim, ClaimCode, Expansion, Settled, Stored
from trolley_tasks.engine.models import (
    Exclusion,
    Failure,
    JobState,
)

DAY = 24 * 3600
JOB_KEY_SUFFIXES = (
    "series",
    "excluded",
    "failures",
    "rowfail",
    "failclass",
    "rows",
    "rowdata",
    "expanded",
    "badrows",
    "link",
)
"""A job's keys besides its series hashes (the table above): every one of them gets the job's one expiry."""


class Ledger(LedgerReader):
    """Job and instance state in one Redis. Cheap to build; share one per process.

    Parameters
    ----------
    client
        A redis-py client (``decode_responses`` either way).
    ttl
        Seconds every key of a job lives after the job ends: ONE expiry for all of them, so that a re-run finds
        either the whole job or nothing (a re-run after expiry is a new job that counts the files on disk as done).
    """

    def __init__(self, client: redis.Redis, *, ttl: int = 30 * DAY) -> None:
        super().__init__(client)
        self.ttl = ttl
        self._scripts = {
            name: client.register_script(getattr(lua, name))
            for name in (
                "EXPAND",
                "ROW_DONE",
                "PRODUCER_DONE",
                "CLAIM",
                "RENEW",
                "SETTLE",
                "WAIT_UNTIL",
                "TOUCH",
                "PAUSE",
                "RESUME",
                "CANCEL",
                "REOPEN",
                "CHECK",
                "UNFAIL",
                "UNFAIL_ROW",
                "UNSTORE",
            )
        }

    def _classes(self, job_id: str) -> str:
        """The job's failures by error class, kept by every script that writes or removes a failure record."""
        return self.key(job_id, "failclass")

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=list(keys), args=list(args))

    # -- jobs ------------------------------------------------------------------------------------------------------

    def create_job(self, job_id: str, fields: dict[str, Any]) -> bool:
        """Create the job record unless it exists. Returns True when created."""
        job = self.key(job_id, "job")
        if not self.r.hsetnx(job, "state", JobState.EXPANDING.value):
            return False
        now = float(self.r.time()[0])
        defaults: dict[str, Any] = {
            "expected": 0,
            "done": 0,
            "failed": 0,
            "skipped": 0,
            "bytes": 0,
            "rows": 0,
            "expanded": 0,
        }
        defaults.update({"failed_rows": 0, "bad_rows": 0, "producer_done": 0, "created_at": now, "finished_at": ""})
        defaults.update(fields)
        pipe = self.r.pipeline()
        pipe.hset(job, mapping={k: str(v) for k, v in defaults.items()})
        pipe.zadd(JOBS_KEY, {job_id: now})
        pipe.execute()
        return True

    # -- producer and expansion ------------------------------------------------------------------------------------

    @staticmethod
    def _staging_key(token: str) -> str:
        return f"trolley:staging:{token}"

    def stage_rows(self, token: str, rows: Sequence[CohortRow]) -> None:
        """Hold a cohort's rows under a temporary key while the producer reads the rest of the file (a day's
        expiry: a producer that dies mid-file leaves nothing behind for long). Ids in a set, rows in a hash."""
        if rows:
            ids, data = self._staging_key(token), self._staging_key(token) + ":rows"
            pipe = self.r.pipeline()
            pipe.sadd(ids, *(row.row_id() for row in rows))
            pipe.hset(data, mapping={row.row_id(): row.record() for row in rows})
            pipe.expire(ids, DAY)
            pipe.expire(data, DAY)
            pipe.execute()

    def staged_count(self, token: str) -> int:
        return int(self.r.scard(self._staging_key(token)))

    def drop_staged_rows(self, token: str) -> None:
        self.r.delete(self._staging_key(token), self._staging_key(token) + ":rows")

    def adopt_staged_rows(self, job_id: str, token: str) -> None:
        """The staged rows become rows of the job (a re-run adds any new ones), and ``rows`` counts them all."""
        ids, data = self._staging_key(token), self._staging_key(token) + ":rows"
        rows, store = self.key(job_id, "rows"), self.key(job_id, "rowdata")
        page: dict[Any, Any] = {}
        for row_id, record in self.r.hscan_iter(data, count=1000):  # in pages: a cohort may have a million rows
            page[row_id] = record
            if len(page) >= 1000:
                self.r.hset(store, mapping=page)
                page = {}
        if page:
            self.r.hset(store, mapping=page)
        pipe = self.r.pipeline()
        pipe.sunionstore(rows, [rows, ids])
        pipe.delete(ids, data)
        pipe.scard(rows)
        count = pipe.execute()[-1]
        self.r.hset(self.key(job_id, "job"), "rows", count)

    def add_row(self, job_id: str, row: CohortRow) -> bool:
        """Register a row found while expanding (a study a search found); False when the job already had it."""
        row_id = row.row_id()
        self.r.hsetnx(self.key(job_id, "rowdata"), row_id, row.record())
        if self.r.sadd(self.key(job_id, "rows"), row_id):
            self.r.hincrby(self.key(job_id, "job"), "rows", 1)
            return True
        return False

    def record_bad_row(self, job_id: str, description: str) -> None:
        pipe = self.r.pipeline()
        pipe.rpush(self.key(job_id, "badrows"), description)
        pipe.hincrby(self.key(job_id, "job"), "bad_rows", 1)
        pipe.execute()

    def clear_bad_rows(self, job_id: str) -> None:
        """Forget the rows a previous run left out (a re-run validates the cohort again)."""
        pipe = self.r.pipeline()
        pipe.delete(self.key(job_id, "badrows"))
        pipe.hset(self.key(job_id, "job"), "bad_rows", 0)
        pipe.execute()

    def producer_done(self, job_id: str) -> bool:
        """Every row is queued. Returns True when this call finalized the job (a cohort with nothing to do)."""
        return bool(self._run("PRODUCER_DONE", [self.key(job_id, "job")], []))

    def expand(self, job_id: str, study_uid: str, series_uid: str, instance_uids: Sequence[str]) -> Expansion:
        """Record a series' instances as expected (once); say which to publish now and which are stored already."""
        keys = [self.key(job_id, "job"), self.series_key(job_id, series_uid), self.key(job_id, "series")]
        publish, stored = self._run("EXPAND", keys, [study_uid, series_uid, *instance_uids])
        flat = [as_text(v) for v in stored]
        return Expansion(
            publish=[as_text(v) for v in publish],
            stored=[Stored(flat[i], int(flat[i + 1] or 0), flat[i + 2]) for i in range(0, len(flat), 3)],
        )

    def unstore(self, job_id: str, series_uid: str, gone: Sequence[Stored]) -> list[str]:
        """Put done instances whose files left the output back to pending (see ``UNSTORE``); returns those moved,
        for the caller to publish."""
        if not gone:
            return []
        keys = [self.key(job_id, "job"), self.series_key(job_id, series_uid)]
        args = [value for item in gone for value in (item.instance_uid, item.path)]
        return [as_text(v) for v in self._run("UNSTORE", keys, args)]

    def exclude(self, job_id: str, exclusion: Exclusion) -> None:
        """Record a series (or one instance) the job's filter or de-identification profile left out, once: it is
        never expected, and the status and the report list it with its rule."""
        self.r.hsetnx(self.key(job_id, "excluded"), exclusion.field(), exclusion.model_dump_json())

    def link(self, job_id: str, identifiers: dict[str, dict[str, str]]) -> None:
        """Keep, per original StudyInstanceUID, the study's original PatientID and AccessionNumber, for the linking
        table of a de-identified export that asked for one (the first seen wins; they are the same for a study)."""
        if identifiers:
            pipe = self.r.pipeline(transaction=False)
            for study_uid, values in identifiers.items():
                pipe.hsetnx(self.key(job_id, "link"), study_uid, json.dumps(values, sort_keys=True))
            pipe.execute()

    def row_done(self, job_id: str, row_key: str, failure: Failure | None = None) -> bool:
        """A row's expansion finished (or failed for good). Returns True when this call finalized the job."""
        keys = [
            self.key(job_id, "job"),
            self.key(job_id, "expanded"),
            self.key(job_id, "rowfail"),
            self._classes(job_id),
        ]
        return bool(self._run("ROW_DONE", keys, [row_key, failure.model_dump_json() if failure else ""]))

    # -- fetches ---------------------------------------------------------------------------------------------------

    def claim(
        self,
        job_id: str,
        series_uid: str,
        instance_uids: Sequence[str],
        *,
        redelivered: bool,
        lease_seconds: float,
        max_redeliveries: int,
    ) -> Claim:
        keys = [
            self.key(job_id, "job"),
            self.series_key(job_id, series_uid),
            self.key(job_id, "failures"),
            self._classes(job_id),
        ]
        args = [series_uid, int(redelivered), lease_seconds, max_redeliveries, *instance_uids]
        raw = self._run("CLAIM", keys, args)
        codes: dict[str, tuple[ClaimCode, int, float]] = {}
        for i, uid in enumerate(instance_uids):
            base = 3 + 3 * i
            if base + 2 < len(raw):
                codes[uid] = (ClaimCode(as_text(raw[base])), int(raw[base + 1]), float(as_text(raw[base + 2]) or 0))
        return Claim(as_text(raw[0]), bool(int(raw[1])), as_text(raw[2]), codes)

    def renew(
        self, job_id: str, series_uid: str, lease: str, instance_uids: Sequence[str], lease_seconds: float
    ) -> tuple[str, bool]:
        """Renew the lease of a claim's running instances. Returns (new token, True when every one was still ours)."""
        keys = [self.key(job_id, "job"), self.series_key(job_id, series_uid)]
        token, renewed = self._run("RENEW", keys, [lease, lease_seconds, *instance_uids])
        return as_text(token), int(renewed) == len(instance_uids)

    def touch(self, job_id: str) -> None:
        """The job is alive (a heartbeat with no claims: an expansion, a producer): move its activity clock."""
        self._run("TOUCH", [self.key(job_id, "job")], [])

    def wait_until(self, job_id: str, when: float) -> None:
        """Some work of the job is deferred until ``when`` (epoch seconds): it is not stalled before then."""
        self._run("WAIT_UNTIL", [self.key(job_id, "job")], [when])

    def settle(self, job_id: str, series_uid: str, results: Iterable[Settled]) -> bool:
        """Record the outcome of a fetch for each instance. Returns True when this call finalized the job."""
        args: list[Any] = [series_uid]
        for item in results:
            record = item.failure or item.exclusion
            failure = record.model_dump_json() if record is not None else ""
            args += [
                item.instance_uid,
                item.outcome,
                item.attempts,
                item.busy_counted_at,
                item.size,
                item.path,
                failure,
            ]
        if len(args) == 1:
            return False
        keys = [
            self.key(job_id, "job"),
            self.series_key(job_id, series_uid),
            self.key(job_id, "failures"),
            self.key(job_id, "excluded"),
            self._classes(job_id),
        ]
        return bool(self._run("SETTLE", keys, args))

    # -- control ---------------------------------------------------------------------------------------------------

    def pause(self, job_id: str, reason: str) -> bool:
        return bool(self._run("PAUSE", [self.key(job_id, "job")], [reason]))

    def resume(self, job_id: str) -> tuple[bool, bool]:
        """Returns (resumed, finalized)."""
        resumed, finalized = self._run("RESUME", [self.key(job_id, "job")], [])
        return bool(resumed), bool(finalized)

    def cancel(self, job_id: str) -> bool:
        return bool(self._run("CANCEL", [self.key(job_id, "job")], []))

    def reopen(self, job_id: str, state: JobState) -> str:
        """Make a job active again: ``expanding`` for a re-run (any job; every row expands again), ``running`` for
        retry-failed (an ended job). Returns the state after the call."""
        keys = [
            self.key(job_id, "job"),
            self.key(job_id, "expanded"),
            self.key(job_id, "rowfail"),
            self._classes(job_id),
        ]
        result = as_text(self._run("REOPEN", keys, [state.value]) or "")
        self._persist(job_id)
        return result

    def check(self, job_id: str) -> bool:
        """Finalize the job if it is complete; True when this call did."""
        return bool(self._run("CHECK", [self.key(job_id, "job")], []))

    def unfail(self, job_id: str, series_uid: str, instance_uids: Sequence[str]) -> list[str]:
        keys = [
            self.key(job_id, "job"),
            self.series_key(job_id, series_uid),
            self.key(job_id, "failures"),
            self._classes(job_id),
        ]
        return [as_text(v) for v in self._run("UNFAIL", keys, list(instance_uids))]

    def unfail_row(self, job_id: str, row_key: str) -> bool:
        keys = [
            self.key(job_id, "job"),
            self.key(job_id, "expanded"),
            self.key(job_id, "rowfail"),
            self._classes(job_id),
        ]
        return bool(self._run("UNFAIL_ROW", keys, [row_key]))

    # -- expiry ----------------------------------------------------------------------------------------------------

    def _job_keys(self, job_id: str) -> Iterator[str]:
        for series_uid in self.series_uids(job_id):
            yield self.series_key(job_id, series_uid)
        for suffix in (*JOB_KEY_SUFFIXES, "job"):
            yield self.key(job_id, suffix)

    def asked_to_finalize(self, job_id: str) -> None:
        """The watchdog asked for the report again (``finalize_asked_at``), so it waits before asking once more."""
        seconds, micros = self.r.time()
        self.r.hset(self.key(job_id, "job"), "finalize_asked_at", str(seconds + micros / 1e6))

    def mark_reported(self, job_id: str) -> None:
        """Record when the end-of-job report reached the disk (``reported_at``)."""
        self.r.hset(self.key(job_id, "job"), "reported_at", str(float(self.r.time()[0])))

    def expire_job(self, job_id: str) -> None:
        """Give an ended job's keys their expiry (called by the finalizer)."""
        pipe = self.r.pipeline(transaction=False)
        for key in self._job_keys(job_id):
            pipe.expire(key, self.ttl)
        pipe.execute()

    def _persist(self, job_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        for key in self._job_keys(job_id):
            pipe.persist(key)
        pipe.execute()
