"""Fakes for the engine's plain-function tests: a searcher and a downloader over a generated cohort, a publisher
that records messages, and a context over the real test Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from testbed.cohort import GeneratedCohort
from trolley_tasks.core import Instance, InstanceReference, Query, QueryLevels, Series, Study, to_instance_refs
from trolley_tasks.downloaders.base import DownloaderBase, RawPayload
from trolley_tasks.engine.context import EngineContext
from trolley_tasks.engine.ledger import Ledger
from trolley_tasks.engine.messages import FetchMessage
from trolley_tasks.engine.report import finalize_job
from trolley_tasks.engine.settings import Settings
from trolley_tasks.errors import NotFoundError, StudyNotFoundError
from trolley_tasks.profiles import SourceProfile
from trolley_tasks.searchers.base import SearcherBase


def study_tree(cohort: GeneratedCohort, study_uid: str) -> Study:
    study = Study(study_uid)
    by_series: dict[str, Series] = {}
    for item in cohort.in_study(study_uid):
        if item.series_uid not in by_series:
            by_series[item.series_uid] = study.add_series(Series(item.series_uid))
        by_series[item.series_uid].add_instance(Instance(item.sop_instance_uid))
    return study


class FakeSearcher(SearcherBase):
    def __init__(self, cohort: GeneratedCohort) -> None:
        self.cohort = cohort
        self.calls = 0

    def find_studies(self, query: Query) -> list[Study]:
        self.calls += 1
        uids = sorted({i.study_uid for i in self.cohort if query.PatientID in ("", i.patient_id)})
        return [
            study_tree(self.cohort, uid) for uid in uids if not query.StudyInstanceUID or uid == query.StudyInstanceUID
        ]

    def find_study_by_id(self, study_uid: str, query_level: QueryLevels = QueryLevels.STUDY) -> Study:
        self.calls += 1
        if not self.cohort.in_study(study_uid):
            raise StudyNotFoundError(f"no study {study_uid}", source="pacs")
        return study_tree(self.cohort, study_uid)


class FakeDownloader(DownloaderBase):
    """Serves the cohort's bytes; ``fail`` decides, per call and instance, to raise instead of yielding.

    Like the real downloaders (downloaders/shortfall.py): a not-found is noted and raised after the rest was
    delivered; any other error is raised at once."""

    def __init__(
        self, cohort: GeneratedCohort, fail: Callable[[int, InstanceReference], Exception | None] | None = None
    ):
        self.cohort = cohort
        self.fail = fail
        self.calls = 0
        self.asked: list[str] = []
        self.items = {i.sop_instance_uid: i for i in cohort}

    def iter_raw(self, objects: Any) -> Iterator[tuple[InstanceReference, RawPayload]]:
        self.calls += 1
        call = self.calls
        not_found: NotFoundError | None = None
        for ref in to_instance_refs(objects):
            self.asked.append(ref.instance_uid)
            error = self.fail(call, ref) if self.fail else None
            if isinstance(error, NotFoundError):
                not_found = error
                continue
            if error is not None:
                raise error
            yield ref, self.cohort.encode(self.items[ref.instance_uid])
        if not_found is not None:
            raise not_found


@dataclass
class RecordingPublisher:
    fetches: list[tuple[FetchMessage, float]] = field(default_factory=list)
    expands: list[tuple[str, str, str, int, float]] = field(default_factory=list)
    finalizes: list[str] = field(default_factory=list)

    def fetch(self, message: FetchMessage, countdown: float = 0.0) -> None:
        self.fetches.append((message, countdown))

    def expand(self, job: str, source: str, row: str, attempt: int = 1, countdown: float = 0.0) -> None:
        self.expands.append((job, source, row, attempt, countdown))

    def finalize(self, job: str) -> None:
        self.finalizes.append(job)


def make_context(redis_url: str, searcher: Any, downloader: Any, **profile: Any) -> EngineContext:
    settings = Settings(sources={"pacs": SourceProfile(url="http://127.0.0.1:9/dicom-web", **profile)})
    return EngineContext(
        settings=settings,
        ledger=Ledger(redis.Redis.from_url(redis_url)),
        publisher=RecordingPublisher(),
        build_clients=lambda profile, name: (lambda: searcher, lambda: downloader),
    )


def drain(ctx: EngineContext, run_fetch: Callable[[FetchMessage], Any], limit: int = 1000) -> int:
    """Run every queued fetch message (countdowns ignored) until none is left, then every finalize request, as the
    ``trolley.finalize`` task would; return how many fetches ran."""
    publisher = ctx.publisher
    assert isinstance(publisher, RecordingPublisher)
    ran = 0
    while publisher.fetches and ran < limit:
        message, _ = publisher.fetches.pop(0)
        run_fetch(message)
        ran += 1
    while publisher.finalizes:
        finalize_job(ctx.ledger, publisher.finalizes.pop(0))
    return ran
