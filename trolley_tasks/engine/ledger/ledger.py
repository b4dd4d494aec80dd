"""The ledger: per-job and per-instance state in Redis. The instance is the unit of state.

Keys (``{J}`` is the job id in braces, a Redis Cluster hash tag, so one job's keys live on one shard and every Lua
script touches a single slot):

================================  =========  ========================================================================
key                               type       content
================================  =========  ========================================================================
``trolley:jobs``                  zset       job id -> creation time (list of jobs)
``trolley:{J}:job``               hash       counters ``expected done failed skipped bytes rows expanded
                                             failed_rows bad_rows``, ``state``, ``created_at finished_at
                                             updated_at paused_at paused_seconds``, ``source output layout
                                             batch_size cohort pause_reason producer_done``
``trolley:{J}:series``            set        SeriesInstanceUIDs of the job
``trolley:{J}:s:<series uid>``    hash       ``#st`` study uid, ``#e #d #f`` expected/done/failed, and one field
                                             per SOPInstanceUID: ``state|attempts|redeliveries|lease|busy|size|path``
``trolley:{J}:failures``          hash       SOPInstanceUID -> JSON failure record
``trolley:{J}:rowfail``           hash       row key -> JSON failure record of a row that could not be expanded
``trolley:{J}:rows``              set        keys of the cohort rows queued for expansion (canonical JSON)
``trolley:{J}:expanded``          set        keys of the rows whose expansion finished
``trolley:{J}:badrows``           list       JSON of rows left out by ``skip_bad_rows``
================================  =========  ========================================================================

Every transition is a Lua script (:mod:`trolley_tasks.engine.ledger.lua`), so duplicates never double-count and
exactly one caller finalizes a job. When a job ends, its keys get an expiry (``instance_ttl`` for the per-instance
hashes, ``job_ttl`` for the rest); reopening the job (retry-failed, re-run) removes it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from trolley_tasks.engine.ledger import lua
from trolley_tasks.engine.models import (
    STATE_CODES,
    Failure,
    InstanceRecord,
    JobState,
    JobStatus,
    SeriesProgress,
    status_from_fields,
)

JOBS_KEY = "trolley:jobs"
DAY = 24 * 3600


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Settled:
    """One instance's outcome of a fetch, for :meth:`Ledger.settle`."""

    instance_uid: str
    outcome: str
    """``d`` done, ``s`` skipped (was on disk), ``f`` failed, ``p`` back to pending."""
    attempts: int
    busy_counted_at: float = 0.0
    size: int = 0
    path: str = ""
    failure: Failure | None = None


@dataclass(frozen=True)
class Claim:
    """The ledger's answer to a fetch that wants to work on some instances."""

    job_state: str
    finalized: bool
    codes: dict[str, tuple[str, int, float]]
    """uid -> (code, attempts so far, busy_counted_at); codes: c claimed, t terminal, h held, x poison, u unknown."""

    def with_code(self, code: str) -> list[str]:
        return [uid for uid, (c, _, _) in self.codes.items() if c == code]


class Ledger:
    """Job and instance state in one Redis. Cheap to build; share one per process.

    Parameters
    ----------
    client
        A redis-py client (``decode_responses`` either way).
    instance_ttl, job_ttl
        Seconds the per-instance records and the job record live after the job ends.
    """

    def __init__(self, client: redis.Redis, *, instance_ttl: int = 7 * DAY, job_ttl: int = 30 * DAY) -> None:
        self.r = client
        self.instance_ttl = instance_ttl
        self.job_ttl = job_ttl
        self._scripts = {
            name: client.register_script(getattr(lua, name))
            for name in (
                "EXPAND",
                "ROW_DONE",
                "PRODUCER_DONE",
                "CLAIM",
                "SETTLE",
                "PAUSE",
                "RESUME",
                "CANCEL",
                "REOPEN",
                "CHECK",
                "UNFAIL",
                "UNFAIL_ROW",
            )
        }

    # -- keys ------------------------------------------------------------------------------------------------------

    @staticmethod
    def key(job_id: str, suffix: str) -> str:
        return f"trolley:{{{job_id}}}:{suffix}"

    def series_key(self, job_id: str, series_uid: str) -> str:
        return self.key(job_id, f"s:{series_uid}")

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

    def job_fields(self, job_id: str) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.r.hgetall(self.key(job_id, "job")).items()}

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self.key(job_id, "job")))

    def state(self, job_id: str) -> str | None:
        value = self.r.hget(self.key(job_id, "job"), "state")
        return _s(value) if value is not None else None

    def job_ids(self) -> list[str]:
        """Known jobs, oldest first; ids whose record expired are dropped from the index."""
        ids = [_s(v) for v in self.r.zrange(JOBS_KEY, 0, -1)]
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.exists(self.key(job_id, "job"))
        alive = pipe.execute()
        gone = [job_id for job_id, ok in zip(ids, alive, strict=True) if not ok]
        if gone:
            self.r.zrem(JOBS_KEY, *gone)
        return [job_id for job_id, ok in zip(ids, alive, strict=True) if ok]

    # -- producer and expansion ------------------------------------------------------------------------------------

    def add_row(self, job_id: str, row_key: str) -> bool:
        """Register a cohort row for expansion; False when the job already had it (a re-run)."""
        if self.r.sadd(self.key(job_id, "rows"), row_key):
            self.r.hincrby(self.key(job_id, "job"), "rows", 1)
            return True
        return False

    def record_bad_row(self, job_id: str, description: str) -> None:
        pipe = self.r.pipeline()
        pipe.rpush(self.key(job_id, "badrows"), description)
        pipe.hincrby(self.key(job_id, "job"), "bad_rows", 1)
        pipe.execute()

    def bad_rows(self, job_id: str) -> list[str]:
        return [_s(v) for v in self.r.lrange(self.key(job_id, "badrows"), 0, -1)]

    def producer_done(self, job_id: str) -> bool:
        """Every row is queued. Returns True when this call finalized the job (a cohort with nothing to do)."""
        return bool(self._run("PRODUCER_DONE", [self.key(job_id, "job")], []))

    def expand(self, job_id: str, study_uid: str, series_uid: str, instance_uids: Sequence[str]) -> list[str]:
        """Record a series' instances as expected (once); return those to publish now."""
        keys = [self.key(job_id, "job"), self.series_key(job_id, series_uid), self.key(job_id, "series")]
        return [_s(v) for v in self._run("EXPAND", keys, [study_uid, series_uid, *instance_uids])]

    def row_done(self, job_id: str, row_key: str, failure: Failure | None = None) -> bool:
        """A row's expansion finished (or failed for good). Returns True when this call finalized the job."""
        keys = [self.key(job_id, "job"), self.key(job_id, "expanded"), self.key(job_id, "rowfail")]
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
        keys = [self.key(job_id, "job"), self.series_key(job_id, series_uid), self.key(job_id, "failures")]
        args = [series_uid, int(redelivered), lease_seconds, max_redeliveries, *instance_uids]
        raw = self._run("CLAIM", keys, args)
        codes: dict[str, tuple[str, int, float]] = {}
        for i, uid in enumerate(instance_uids):
            base = 2 + 3 * i
            if base + 2 < len(raw):
                codes[uid] = (_s(raw[base]), int(raw[base + 1]), float(_s(raw[base + 2]) or 0))
        return Claim(_s(raw[0]), bool(int(raw[1])), codes)

    def settle(self, job_id: str, series_uid: str, results: Iterable[Settled]) -> bool:
        """Record the outcome of a fetch for each instance. Returns True when this call finalized the job."""
        args: list[Any] = [series_uid]
        for item in results:
            failure = item.failure.model_dump_json() if item.failure else ""
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
        keys = [self.key(job_id, "job"), self.series_key(job_id, series_uid), self.key(job_id, "failures")]
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
        keys = [self.key(job_id, "job"), self.key(job_id, "expanded"), self.key(job_id, "rowfail")]
        result = _s(self._run("REOPEN", keys, [state.value]) or "")
        self._persist(job_id)
        return result

    def check(self, job_id: str) -> bool:
        """Finalize the job if it is complete; True when this call did."""
        return bool(self._run("CHECK", [self.key(job_id, "job")], []))

    def unfail(self, job_id: str, series_uid: str, instance_uids: Sequence[str]) -> list[str]:
        keys = [self.key(job_id, "job"), self.series_key(job_id, series_uid), self.key(job_id, "failures")]
        return [_s(v) for v in self._run("UNFAIL", keys, list(instance_uids))]

    def unfail_row(self, job_id: str, row_key: str) -> bool:
        keys = [self.key(job_id, "job"), self.key(job_id, "expanded"), self.key(job_id, "rowfail")]
        return bool(self._run("UNFAIL_ROW", keys, [row_key]))

    def unexpanded_rows(self, job_id: str) -> Iterator[str]:
        """Row keys queued but not expanded yet (to re-queue after a pause)."""
        expanded = self.key(job_id, "expanded")
        for value in self.r.sscan_iter(self.key(job_id, "rows"), count=500):
            if not self.r.sismember(expanded, value):
                yield _s(value)

    # -- reading ---------------------------------------------------------------------------------------------------

    def series_uids(self, job_id: str) -> Iterator[str]:
        for value in self.r.sscan_iter(self.key(job_id, "series"), count=500):
            yield _s(value)

    def iter_series_records(self, job_id: str, series_uid: str) -> tuple[str, Iterator[tuple[str, list[str]]]]:
        """The series' study uid and its instances as (uid, record fields)."""
        key = self.series_key(job_id, series_uid)
        study = _s(self.r.hget(key, "#st") or b"")

        def records() -> Iterator[tuple[str, list[str]]]:
            for field, value in self.r.hscan_iter(key, count=1000):
                name = _s(field)
                if not name.startswith("#"):
                    yield name, _s(value).split("|", 6)

        return study, records()

    def instances(self, job_id: str) -> Iterator[InstanceRecord]:
        """Every instance of the job with its state, for reports and completeness checks. Streams."""
        failures_key = self.key(job_id, "failures")
        for series_uid in self.series_uids(job_id):
            study, records = self.iter_series_records(job_id, series_uid)
            for uid, rec in records:
                state = STATE_CODES[rec[0]]
                error_class = message = ""
                if state.value == "failed":
                    raw = self.r.hget(failures_key, uid)
                    if raw:
                        failure = Failure.model_validate_json(raw)
                        error_class, message = failure.error_class, failure.message
                yield InstanceRecord(
                    study_uid=study,
                    series_uid=series_uid,
                    instance_uid=uid,
                    state=state,
                    attempts=int(rec[1]),
                    redeliveries=int(rec[2]),
                    size=int(rec[5] or 0),
                    path=rec[6] if len(rec) > 6 else "",
                    error_class=error_class,
                    message=message,
                )

    def pending(self, job_id: str) -> Iterator[tuple[str, str, list[str]]]:
        """(study, series, instance uids) still to fetch: pending, or running under a lapsed lease."""
        now = float(self.r.time()[0])
        for series_uid in self.series_uids(job_id):
            study, records = self.iter_series_records(job_id, series_uid)
            uids = [uid for uid, rec in records if rec[0] == "p" or (rec[0] == "r" and float(rec[3]) < now)]
            if uids:
                yield study, series_uid, uids

    def failed(self, job_id: str) -> Iterator[tuple[str, str, list[str]]]:
        """(study, series, instance uids) in the failed state."""
        for series_uid in self.series_uids(job_id):
            study, records = self.iter_series_records(job_id, series_uid)
            uids = [uid for uid, rec in records if rec[0] == "f"]
            if uids:
                yield study, series_uid, uids

    def failures(self, job_id: str) -> Iterator[Failure]:
        """Failed rows first, then failed instances."""
        for _, value in self.r.hscan_iter(self.key(job_id, "rowfail"), count=500):
            yield Failure.model_validate_json(value)
        for _, value in self.r.hscan_iter(self.key(job_id, "failures"), count=500):
            yield Failure.model_validate_json(value)

    def row_failures(self, job_id: str) -> Iterator[tuple[str, Failure]]:
        """(row key, failure) for each row whose expansion failed."""
        for key, value in self.r.hscan_iter(self.key(job_id, "rowfail"), count=500):
            yield _s(key), Failure.model_validate_json(value)

    def series_progress(self, job_id: str) -> Iterator[SeriesProgress]:
        for series_uid in self.series_uids(job_id):
            st, e, d, f = self.r.hmget(self.series_key(job_id, series_uid), "#st", "#e", "#d", "#f")
            yield SeriesProgress(
                study_uid=_s(st or b""),
                series_uid=series_uid,
                expected=int(e or 0),
                done=int(d or 0),
                failed=int(f or 0),
            )

    def status(self, job_id: str) -> JobStatus | None:
        fields = self.job_fields(job_id)
        if not fields:
            return None
        by_class: dict[str, int] = {}
        if int(fields.get("failed", 0) or 0) or int(fields.get("failed_rows", 0) or 0):
            for failure in self.failures(job_id):
                by_class[failure.error_class] = by_class.get(failure.error_class, 0) + 1
        return status_from_fields(job_id, fields, by_class, float(self.r.time()[0]))

    # -- expiry ----------------------------------------------------------------------------------------------------

    def _job_keys(self, job_id: str) -> Iterator[tuple[str, int]]:
        for series_uid in self.series_uids(job_id):
            yield self.series_key(job_id, series_uid), self.instance_ttl
        for suffix in ("series", "failures", "rowfail", "rows", "expanded", "badrows", "job"):
            yield self.key(job_id, suffix), self.job_ttl

    def expire_job(self, job_id: str) -> None:
        """Give an ended job's keys their expiry (called by the finalizer)."""
        pipe = self.r.pipeline(transaction=False)
        for key, ttl in self._job_keys(job_id):
            pipe.expire(key, ttl)
        pipe.execute()

    def _persist(self, job_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        for key, _ in self._job_keys(job_id):
            pipe.persist(key)
        pipe.execute()

    def delete_job(self, job_id: str) -> None:
        """Forget a job entirely (a new job over the same output replaces it)."""
        keys = [key for key, _ in self._job_keys(job_id)]
        pipe = self.r.pipeline(transaction=False)
        for start in range(0, len(keys), 500):
            pipe.delete(*keys[start : start + 500])
        pipe.zrem(JOBS_KEY, job_id)
        pipe.execute()
