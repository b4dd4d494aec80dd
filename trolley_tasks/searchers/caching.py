"""A cache in front of any Searcher, as in dicomtrolley's usage page::

    searcher = CachedSearcher(searcher=a_searcher, cache=DICOMObjectCache(expiry_seconds=300))

- A query repeated within ``expiry_seconds`` returns the cached studies without asking the server.
- ``find_study_by_id(uid, level)`` is answered from the cache when the cached study was searched at ``level`` or
  deeper; a deeper request than what is cached goes to the server, and its answer replaces the cached study.
- Age is compared in total seconds. dicomtrolley compared ``timedelta.seconds``, the seconds *within* the last
  day, so an entry 1 day and 10 seconds old looked 10 seconds old and never expired.

Cached objects are returned as they are (not copied), so a caller that edits a returned tree edits the cache.
The cache lives in one process; the engine's workers each have their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from trolley_tasks.core import (
    DICOMObject,
    DICOMObjectReference,
    InstanceReference,
    Query,
    QueryLevels,
    SeriesReference,
    Study,
    validate_uid,
)
from trolley_tasks.errors import TrolleyError
from trolley_tasks.searchers.base import Searcher, SearcherBase


class NodeNotFound(TrolleyError, KeyError):
    """:meth:`DICOMObjectCache.retrieve` has nothing fresh for that reference (never cached, expired, or cached
    without that depth). A KeyError too, since it is a lookup miss, not a PACS failure."""


@dataclass
class _Entry:
    study: Study
    level: QueryLevels
    stored_at: float


class DICOMObjectCache:
    """Studies by StudyInstanceUID, with the depth they were searched at, and query answers, for a time.

    Parameters
    ----------
    initial_objects
        Objects to :meth:`add` at once (dicomtrolley's first parameter).
    expiry_seconds
        How long an entry is good for; None keeps entries for the life of the cache (as in dicomtrolley).
    clock
        Seconds from an arbitrary start (``time.monotonic``); tests pass their own.
    """

    def __init__(
        self,
        initial_objects: Iterable[DICOMObject] | None = None,
        expiry_seconds: float | None = 600,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if expiry_seconds is not None and expiry_seconds < 0:
            raise ValueError("expiry_seconds cannot be negative")
        self.expiry_seconds = float(expiry_seconds) if expiry_seconds is not None else None
        self.clock = clock
        self._studies: dict[str, _Entry] = {}
        self._queries: dict[str, tuple[list[str], float]] = {}
        self._lock = threading.Lock()
        for obj in initial_objects or ():
            self.add(obj)

    def _fresh(self, stored_at: float) -> bool:
        if self.expiry_seconds is None:
            return True
        return self.clock() - stored_at <= self.expiry_seconds  # whole seconds of age, days included

    def add(self, obj: DICOMObject) -> DICOMObject:
        """Cache the study ``obj`` belongs to, as deep as it is filled; returns ``obj`` (dicomtrolley's call).

        The whole study is cached, since its depth is what :meth:`get_study` answers for. A series or instance
        without a study parent cannot be found again by reference, so it raises ValueError.
        """
        study = obj.root()
        if not isinstance(study, Study):
            raise ValueError(f"{obj!r} has no study parent; only objects inside a study can be cached")
        self.add_study(study, QueryLevels.from_object_level(study.max_object_depth()))
        return obj

    def retrieve(self, reference: DICOMObjectReference) -> DICOMObject:
        """The cached study, series or instance ``reference`` names.

        Raises
        ------
        NodeNotFound
            Nothing fresh is cached for it (or its study was cached without that depth).
        """
        study = self.get_study(reference.study_uid, QueryLevels.STUDY)  # type: ignore[attr-defined]
        try:
            if study is None:
                raise KeyError(reference.study_uid)  # type: ignore[attr-defined]
            if isinstance(reference, SeriesReference | InstanceReference):
                series = study.get(reference.series_uid)
                return series.get(reference.instance_uid) if isinstance(reference, InstanceReference) else series
            return study
        except KeyError as exc:
            raise NodeNotFound(f"nothing cached for {reference}", reference=reference) from exc

    def add_study(self, study: Study, level: QueryLevels) -> None:
        """Remember ``study`` as searched at ``level``, unless a fresher deeper copy is already cached."""
        with self._lock:
            current = self._studies.get(study.uid)
            if current is not None and self._fresh(current.stored_at) and _deeper(current.level, level):
                return
            self._studies[study.uid] = _Entry(study, QueryLevels(level), self.clock())

    def get_study(self, study_uid: str, level: QueryLevels) -> Study | None:
        """The cached study when it is fresh and at least as deep as ``level``, else None."""
        with self._lock:
            entry = self._studies.get(study_uid)
            if entry is None:
                return None
            if not self._fresh(entry.stored_at):
                del self._studies[study_uid]
                return None
            return entry.study if (entry.level == level or _deeper(entry.level, level)) else None

    def add_query(self, key: str, studies: list[Study], level: QueryLevels) -> None:
        """Remember the answer to a query (as study UIDs; the studies themselves go to the study cache)."""
        for study in studies:
            self.add_study(study, level)
        with self._lock:
            self._queries[key] = ([study.uid for study in studies], self.clock())

    def get_query(self, key: str, level: QueryLevels) -> list[Study] | None:
        """The cached answer to a query, if fresh and every study in it is still cached deep enough."""
        with self._lock:
            cached = self._queries.get(key)
            if cached is None:
                return None
            uids, stored_at = cached
            if not self._fresh(stored_at):
                del self._queries[key]
                return None
        studies = [self.get_study(uid, level) for uid in uids]
        if any(study is None for study in studies):
            return None
        return [study for study in studies if study is not None]


def _deeper(a: QueryLevels, b: QueryLevels) -> bool:
    """True when level ``a`` goes deeper than ``b`` (INSTANCE is deeper than SERIES, SERIES than STUDY)."""
    return QueryLevels(a).to_object_level() < QueryLevels(b).to_object_level()


class CachedSearcher(SearcherBase):
    """A Searcher that answers from ``cache`` when it can and asks ``searcher`` otherwise."""

    def __init__(self, searcher: Searcher, cache: DICOMObjectCache) -> None:
        self.searcher = searcher
        self.cache = cache
        self.source = getattr(searcher, "source", None)

    def __repr__(self) -> str:
        return f"CachedSearcher({self.searcher!r})"

    def close(self) -> None:
        """Close the wrapped searcher; the cache stays usable by others."""
        self.searcher.close()

    def find_studies(self, query: Query) -> list[Study]:
        key = f"{type(query).__qualname__}:{query.model_dump_json()}"
        level = QueryLevels(query.query_level)
        cached = self.cache.get_query(key, level)
        if cached is not None:
            return cached
        studies = self.searcher.find_studies(query)
        self.cache.add_query(key, studies, level)
        return studies

    def find_study_by_id(self, study_uid: str, query_level: QueryLevels = QueryLevels.STUDY) -> Study:
        validate_uid(study_uid, "StudyInstanceUID")
        cached = self.cache.get_study(study_uid, query_level)
        if cached is not None:
            return cached
        study = self.searcher.find_study_by_id(study_uid, query_level)
        self.cache.add_study(study, query_level)
        return study
