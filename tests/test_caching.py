"""CachedSearcher and DICOMObjectCache, with a counting searcher and a hand-driven clock."""

from __future__ import annotations

from pydicom import Dataset

from trolley_tasks.core import Instance, Query, QueryLevels, Series, Study
from trolley_tasks.searchers.base import SearcherBase
from trolley_tasks.searchers.caching import CachedSearcher, DICOMObjectCache


class CountingSearcher(SearcherBase):
    """Answers one study to any depth, and counts how often it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, QueryLevels]] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def _study(self, level: QueryLevels) -> Study:
        data = Dataset()
        data.PatientID = "P1"
        study = Study("1.2.3", data=data)
        if level != QueryLevels.STUDY:
            series = study.add_series(Series("1.2.3.1"))
            if level == QueryLevels.INSTANCE:
                series.add_instance(Instance("1.2.3.1.1"))
        return study

    def find_studies(self, query: Query) -> list[Study]:
        self.calls.append(("find_studies", query.query_level))
        return [self._study(query.query_level)]

    def find_study_by_id(self, study_uid: str, query_level: QueryLevels = QueryLevels.STUDY) -> Study:
        self.calls.append(("find_study_by_id", query_level))
        return self._study(query_level)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[CachedSearcher, CountingSearcher, Clock]:
    inner, clock = CountingSearcher(), Clock()
    return CachedSearcher(inner, DICOMObjectCache(expiry_seconds=300, clock=clock)), inner, clock


def test_answers_every_searcher_call_and_closes_the_wrapped_one() -> None:
    """Behaviour, not ``isinstance``: each Searcher method answers through the cache, and close() reaches the
    searcher it wraps."""
    searcher, inner, _ = make()
    query = Query(PatientID="P1", query_level=QueryLevels.SERIES)
    assert [study.uid for study in searcher.find_studies(query)] == ["1.2.3"]
    assert searcher.find_study(query).uid == "1.2.3"
    assert searcher.find_study_by_id("1.2.3", QueryLevels.SERIES).uid == "1.2.3"
    assert inner.calls == [("find_studies", QueryLevels.SERIES)]  # the other two were answered from the cache
    searcher.close()
    assert inner.closed


def test_repeated_query_within_expiry_is_cached() -> None:
    searcher, inner, clock = make()
    first = searcher.find_studies(Query(PatientID="P1"))
    clock.now += 299
    again = searcher.find_studies(Query(PatientID="P1"))
    assert again[0] is first[0] and len(inner.calls) == 1
    assert searcher.find_study(Query(PatientID="P1")) is first[0] and len(inner.calls) == 1
    searcher.find_studies(Query(PatientID="P2"))
    assert len(inner.calls) == 2


def test_expiry_counts_whole_days() -> None:
    """dicomtrolley compared timedelta.seconds: 1 day + 10 s looked like 10 s and never expired."""
    searcher, inner, clock = make()
    searcher.find_studies(Query(PatientID="P1"))
    clock.now += 86_400 + 10
    searcher.find_study_by_id("1.2.3", QueryLevels.STUDY)
    searcher.find_studies(Query(PatientID="P1"))
    assert [call for call, _ in inner.calls] == ["find_studies", "find_study_by_id", "find_studies"]


def test_deeper_query_goes_to_the_server_shallower_is_served() -> None:
    searcher, inner, _ = make()
    searcher.find_study_by_id("1.2.3", QueryLevels.SERIES)
    deep = searcher.find_study_by_id("1.2.3", QueryLevels.INSTANCE)
    assert inner.calls == [("find_study_by_id", QueryLevels.SERIES), ("find_study_by_id", QueryLevels.INSTANCE)]
    assert len(deep.all_instances()) == 1
    assert searcher.find_study_by_id("1.2.3", QueryLevels.SERIES) is deep
    assert searcher.find_study_by_id("1.2.3", QueryLevels.STUDY) is deep
    assert len(inner.calls) == 2


def test_query_answer_feeds_find_study_by_id() -> None:
    searcher, inner, _ = make()
    (study,) = searcher.find_studies(Query(StudyInstanceUID="1.2.3", query_level=QueryLevels.INSTANCE))
    assert searcher.find_study_by_id("1.2.3", QueryLevels.INSTANCE) is study
    assert len(inner.calls) == 1
    # a shallower answer later does not replace the fresher deeper study
    searcher.find_studies(Query(PatientID="P1"))
    assert searcher.find_study_by_id("1.2.3", QueryLevels.INSTANCE) is study
    assert len(inner.calls) == 2
