"""The read side of the ledger: key names and queries that change nothing (status, records, failures, rows).

:class:`~trolley_tasks.engine.ledger.ledger.Ledger` adds the transitions (Lua scripts) on top; everything here is
safe to call from any process at any time, the CLI's ``status`` included.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from trolley_tasks.cohort import CohortRow
from trolley_tasks.engine.models import (
    STATE_CODES,
    Exclusion,
    Failure,
    InstanceRecord,
    JobStatus,
    SeriesProgress,
    status_from_fields,
)

JOBS_KEY = "trolley:jobs"
BATCH = 1000
"""Keys a read asks for per round trip (SSCAN hint, pipelined reads)."""


def _batches(values: Iterable[Any], size: int = BATCH) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for value in values:
        batch.append(value)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def as_text(value: Any) -> str:
    """Redis answers bytes or str depending on the client's ``decode_responses``; the ledger speaks str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class LedgerReader:
    """Key names and read-only queries over one Redis (see :mod:`~trolley_tasks.engine.ledger.ledger` for the keys)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    @staticmethod
    def key(job_id: str, suffix: str) -> str:
        return f"trolley:{{{job_id}}}:{suffix}"

    def series_key(self, job_id: str, series_uid: str) -> str:
        """A digest of the SeriesInstanceUID names the key, never the UID itself: a key name is what ``redis-cli
        --scan``, ``MONITOR`` and every Redis dashboard show, and a de-identified export must not show originals."""
        return self.key(job_id, "s:" + hashlib.sha256(series_uid.encode()).hexdigest()[:24])

    def job_fields(self, job_id: str) -> dict[str, str]:
        return {as_text(k): as_text(v) for k, v in self.r.hgetall(self.key(job_id, "job")).items()}

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self.key(job_id, "job")))

    def state(self, job_id: str) -> str | None:
        value = self.r.hget(self.key(job_id, "job"), "state")
        return as_text(value) if value is not None else None

    def job_ids(self) -> list[str]:
        """Known jobs, oldest first; ids whose record expired are dropped from the index."""
        ids = [as_text(v) for v in self.r.zrange(JOBS_KEY, 0, -1)]
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.exists(self.key(job_id, "job"))
        alive = pipe.execute()
        gone = [job_id for job_id, ok in zip(ids, alive, strict=True) if not ok]
        if gone:
            self.r.zrem(JOBS_KEY, *gone)
        return [job_id for job_id, ok in zip(ids, alive, strict=True) if ok]

    def rows(self, job_id: str) -> Iterator[str]:
        """Every row id of the job: the cohort's, and the studies its searches found. Streams."""
        for value in self.r.sscan_iter(self.key(job_id, "rows"), count=500):
            yield as_text(value)

    def bad_rows(self, job_id: str) -> list[str]:
        return [as_text(v) for v in self.r.lrange(self.key(job_id, "badrows"), 0, -1)]

    def row(self, job_id: str, row_id: str) -> CohortRow | None:
        """The row a message names by its id, from the job's row store (None for an unknown or expired job)."""
        record = self.r.hget(self.key(job_id, "rowdata"), row_id)
        return CohortRow.from_record(as_text(record)) if record is not None else None

    def unexpanded_rows(self, job_id: str) -> Iterator[str]:
        """Row keys queued but not expanded yet (to re-queue after a pause). One round trip per batch of rows."""
        expanded = self.key(job_id, "expanded")
        for batch in _batches(self.r.sscan_iter(self.key(job_id, "rows"), count=BATCH)):
            pipe = self.r.pipeline(transaction=False)
            for value in batch:
                pipe.sismember(expanded, value)
            for value, member in zip(batch, pipe.execute(), strict=True):
                if not member:
                    yield as_text(value)

    def series_uids(self, job_id: str) -> Iterator[str]:
        for value in self.r.sscan_iter(self.key(job_id, "series"), count=BATCH):
            yield as_text(value)

    def iter_series_records(self, job_id: str, series_uid: str) -> tuple[str, Iterator[tuple[str, list[str]]]]:
        """The series' study uid and its instances as (uid, record fields)."""
        key = self.series_key(job_id, series_uid)
        study = as_text(self.r.hget(key, "#st") or b"")

        def records() -> Iterator[tuple[str, list[str]]]:
            for field, value in self.r.hscan_iter(key, count=1000):
                name = as_text(field)
                if not name.startswith("#"):
                    yield name, as_text(value).split("|", 6)

        return study, records()

    def instances(self, job_id: str) -> Iterator[InstanceRecord]:
        """Every instance of the job with its state, for reports and completeness checks. Streams."""
        failures_key, excluded_key = self.key(job_id, "failures"), self.key(job_id, "excluded")
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
                elif state.value == "excluded":
                    raw = self.r.hget(excluded_key, f"{series_uid}/{uid}")
                    message = Exclusion.model_validate_json(raw).rule if raw else ""
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
            yield as_text(key), Failure.model_validate_json(value)

    def linked(self, job_id: str) -> Iterator[tuple[str, dict[str, str]]]:
        """(original StudyInstanceUID, {"PatientID": ..., "AccessionNumber": ...}) kept by ``Ledger.link``."""
        for study_uid, value in self.r.hscan_iter(self.key(job_id, "link"), count=500):
            yield as_text(study_uid), json.loads(value)

    def series_progress(self, job_id: str) -> Iterator[SeriesProgress]:
        """Every series' counts. One round trip per :data:`BATCH` series: the progress display asks for all of
        them, and one HMGET each took 3 s per look at 20,000 series (a million instances), over and over."""
        for batch in _batches(self.series_uids(job_id)):
            pipe = self.r.pipeline(transaction=False)
            for series_uid in batch:
                pipe.hmget(self.series_key(job_id, series_uid), "#st", "#e", "#d", "#f")
            for series_uid, (st, e, d, f) in zip(batch, pipe.execute(), strict=True):
                yield SeriesProgress(
                    study_uid=as_text(st or b""),
                    series_uid=series_uid,
                    expected=int(e or 0),
                    done=int(d or 0),
                    failed=int(f or 0),
                )

    def status(self, job_id: str, *, excluded: bool = True) -> JobStatus | None:
        """The job's counts and state; with ``excluded=False`` its ``excluded`` list stays empty (a poll's view: the
        list is one record per series left out, read and parsed whole)."""
        fields = self.job_fields(job_id)
        if not fields:
            return None
        by_class = {as_text(k): int(v) for k, v in self.r.hgetall(self.key(job_id, "failclass")).items()}
        exclusions = list(self.exclusions(job_id)) if excluded else []
        return status_from_fields(job_id, fields, by_class, float(self.r.time()[0]), exclusions)

    def exclusions(self, job_id: str) -> Iterator[Exclusion]:
        """The series the job's filter left out, with the rule that excluded each (see ``Ledger.exclude``)."""
        for _, value in self.r.hscan_iter(self.key(job_id, "excluded"), count=500):
            yield Exclusion.model_validate_json(value)
