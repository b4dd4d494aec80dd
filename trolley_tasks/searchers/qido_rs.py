"""QIDO-RS, Query based on ID for DICOM Objects by RESTful Services (PS3.18 10.6), as a Searcher.

``QidoRS(session, url)`` answers every Query as the object tree. What it adds to one HTTP call per query:

- **Paging** until the answer is complete (:mod:`~trolley_tasks.searchers.qido_rs_paging`).
- **Counting.** A search deeper than STUDY is checked against the counts the server keeps itself
  (NumberOfStudyRelatedSeries, NumberOfSeriesRelatedInstances; PS3.4 C.3.4): a series with fewer instances than
  counted is fetched again on its own (``/studies/{s}/series/{se}/instances``), and raises
  :class:`~trolley_tasks.searchers.qido_rs_paging.IncompleteResultError` if it is still short. This catches servers
  that cut answers without saying so: Orthanc 1.10 with ``LimitFindInstances`` returns the first N+1 results, no
  Warning, and applies ``offset`` only inside them (measured; docs/decisions.md).
- **No relational calls** when ``relational=False``: a study's instances then come from one call per series.

Re-exports the query models, so ``from trolley_tasks.searchers.qido_rs import HierarchicalQuery`` works as in
dicomtrolley.
"""

from __future__ import annotations

from typing import Unpack

from pydicom import Dataset

from trolley_tasks.core import Query, QueryLevels, Study, StudyReference, validate_uid
from trolley_tasks.errors import StudyNotFoundError
from trolley_tasks.searchers.base import SearcherBase
from trolley_tasks.searchers.qido_rs_paging import IncompleteResultError, paged_search
from trolley_tasks.searchers.qido_rs_query import (
    HierarchicalQuery,
    QidoRSQueryBase,
    RelationalQuery,
    query_string,
    to_qido_query,
)
from trolley_tasks.searchers.tree import TreeBuilder, build_tree
from trolley_tasks.transports.http import EndpointOptions, HTTPEndpoint, SessionOrFactory

__all__ = ["HierarchicalQuery", "IncompleteResultError", "QidoRS", "QidoRSQueryBase", "RelationalQuery"]

_KEY_FOR_LEVEL = {
    QueryLevels.STUDY: "StudyInstanceUID",
    QueryLevels.SERIES: "SeriesInstanceUID",
    QueryLevels.INSTANCE: "SOPInstanceUID",
}
_STUDY_COUNTS = ["NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
_SERIES_COUNTS = ["NumberOfSeriesRelatedInstances"]


def _count(ds: Dataset, keyword: str) -> int | None:
    """A NumberOf...Related... count from an answer, or None when absent or unreadable (then nothing is checked)."""
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class QidoRS(HTTPEndpoint, SearcherBase):
    """A QIDO-RS server.

    Parameters
    ----------
    session, source, timeout
        As for every HTTP client (:class:`~trolley_tasks.transports.http.HTTPEndpoint`).
    url
        The QIDO-RS root, for example ``http://server:8042/dicom-web``.
    page_size
        Ask for at most this many results per call and page with ``offset``; None lets the server decide.
    relational
        False for servers without the optional relational resources (``/series``, ``/instances``).
    """

    def __init__(
        self,
        session: SessionOrFactory,
        url: str,
        *,
        page_size: int | None = None,
        relational: bool = True,
        **endpoint: Unpack[EndpointOptions],
    ) -> None:
        if page_size is not None and page_size < 1:
            raise ValueError("page_size must be at least 1, or None")
        super().__init__(session, url, **endpoint)
        self.page_size = page_size
        self.relational = relational

    def ensure_query_type(self, query: Query) -> QidoRSQueryBase:
        """``query`` as a Hierarchical or Relational query; see :func:`~.qido_rs_query.to_qido_query`."""
        return to_qido_query(query, relational=self.relational)

    def search(self, query: QidoRSQueryBase, *, expected: int | None = None) -> list[Dataset]:
        """The flat answer of one QIDO-RS search, every page of it, one Dataset per object found."""
        return paged_search(
            self.session,
            self.url + query.uri_base(),
            query_string(query.uri_search_params()),
            key=_KEY_FOR_LEVEL[query.query_level],
            limit=query.limit,
            offset=query.offset,
            page_size=self.page_size,
            expected=expected,
            source=self.source,
            timeout=self.timeout,
            tries=self.request_tries,
            max_bytes=self.max_answer_bytes,
        )

    def find_studies(self, query: Query) -> list[Study]:
        """Every study matching ``query``, filled to its query level and checked against the server's counts.

        A plain Query deeper than STUDY first finds the studies (``/studies``, or ``/series`` when it names a
        series without its study), then expands each one as :meth:`find_study_by_id` does: a broad ``/instances``
        search that a server cuts would lose whole studies without a trace. A Hierarchical or RelationalQuery is
        sent as given; the studies it finds are then completed the same way, unless it asks for a slice
        (``limit``/``offset``).
        """
        level = QueryLevels(query.query_level)
        if isinstance(query, QidoRSQueryBase):
            finder: QidoRSQueryBase = query
            if query.limit or query.offset:
                return self._tree(self.search(query), level)
        elif level == QueryLevels.STUDY:
            finder = self.ensure_query_type(query)
        else:
            values = query.non_default_values()
            if query.SeriesInstanceUID and not query.StudyInstanceUID:
                values["query_level"] = QueryLevels.SERIES  # /series?SeriesInstanceUID= finds its study
            else:  # the series filter is applied by the expansion: /studies?SeriesInstanceUID= matches nothing
                values.update(query_level=QueryLevels.STUDY, SeriesInstanceUID="")
            finder = self.ensure_query_type(type(query).model_construct(**values))
        found = self._tree(self.search(finder), finder.query_level)
        if level == QueryLevels.STUDY:
            return found
        expanded = [
            self._expand(
                study.uid, level, series_uid=query.SeriesInstanceUID, include_fields=query.include_fields, found=study
            )
            for study in found
        ]
        return [study for study in expanded if study.series or not query.SeriesInstanceUID]

    def find_study_by_id(self, study_uid: str, query_level: QueryLevels = QueryLevels.STUDY) -> Study:
        """One study with its series and instances to ``query_level``, complete as the server counts it.

        At INSTANCE depth: ``/studies/{uid}/instances`` (relational), or one call per series when
        ``relational=False`` or when the relational answer falls short of the count.
        """
        validate_uid(study_uid, "StudyInstanceUID")
        return self._expand(study_uid, QueryLevels(query_level))

    # ----------------------------------------------------------------------------------------------------------------

    def _tree(self, datasets: list[Dataset], level: QueryLevels) -> list[Study]:
        """The tree of our own answer's datasets, adopted rather than copied (:mod:`~trolley_tasks.searchers.tree`)."""
        return build_tree(datasets, level, source=self.source, adopt=True)

    def _study_dataset(self, study_uid: str, include_fields: list[str]) -> Dataset:
        query = HierarchicalQuery(StudyInstanceUID=study_uid, include_fields=_with(include_fields, _STUDY_COUNTS))
        for ds in self.search(query):
            if str(ds.get("StudyInstanceUID", "")) == study_uid:
                return ds
        raise StudyNotFoundError(f"no study {study_uid}", source=self.source, reference=StudyReference(study_uid))

    def _expand(
        self,
        study_uid: str,
        level: QueryLevels,
        *,
        series_uid: str = "",
        include_fields: list[str] | None = None,
        found: Study | None = None,
    ) -> Study:
        """Study ``study_uid`` to ``level``, from what ``found`` already holds plus what is missing, checked against
        the server's counts. ``series_uid`` limits it to one series, as the query that found it did."""
        include = list(include_fields or [])
        builder = TreeBuilder(source=self.source, adopt=True)
        if found is not None:
            builder.add(found.data, QueryLevels.STUDY)
            for series in found.series:
                builder.add(series.data, QueryLevels.SERIES)
        study_ds = self._study_dataset(study_uid, include)
        study = builder.add(study_ds, QueryLevels.STUDY)
        assert isinstance(study, Study)
        if level == QueryLevels.STUDY:
            return study

        expected_series = None if series_uid else _count(study_ds, "NumberOfStudyRelatedSeries")
        listing_query = HierarchicalQuery(
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series_uid,
            query_level=QueryLevels.SERIES,
            include_fields=_with(include, _SERIES_COUNTS),
        )
        listing = self.search(listing_query, expected=expected_series)
        if expected_series is not None and len(listing) < expected_series:
            raise IncompleteResultError(
                f"{self.source} lists {len(listing)} of the {expected_series} series it counts in study {study_uid}",
                source=self.source,
                reference=StudyReference(study_uid),
            )
        for ds in listing:
            builder.add(ds, QueryLevels.SERIES)
        if level == QueryLevels.SERIES:
            return study

        if found is None and self.relational:
            relational = RelationalQuery(
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid,
                query_level=QueryLevels.INSTANCE,
                include_fields=include,
            )
            expected = None if series_uid else _count(study_ds, "NumberOfStudyRelatedInstances")
            found = (
                self._tree(self.search(relational, expected=expected), QueryLevels.INSTANCE)[0]
                if expected != 0
                else None
            )
        for series_ds in listing:
            self._fill_series(builder, study, series_ds, found, include)
        if found is not None:  # series that appeared after the listing: keep what we have of them
            for series in found.series:
                for instance in series.instances:
                    builder.add(instance.data, QueryLevels.INSTANCE)
        return study

    def _fill_series(
        self, builder: TreeBuilder, study: Study, series_ds: Dataset, found: Study | None, include: list[str]
    ) -> None:
        """Add one listed series' instances: from ``found`` when it holds as many as counted, else by one
        hierarchical call for the series; raise when still short."""
        series_uid = str(series_ds.get("SeriesInstanceUID", ""))
        expected = _count(series_ds, "NumberOfSeriesRelatedInstances")
        datasets: list[Dataset] = []
        if found is not None:
            try:
                datasets = [instance.data for instance in found.get(series_uid).instances]
            except KeyError:
                datasets = []
        if not datasets or (expected is not None and len(datasets) < expected):
            query = HierarchicalQuery(
                StudyInstanceUID=study.uid,
                SeriesInstanceUID=series_uid,
                query_level=QueryLevels.INSTANCE,
                include_fields=include,
            )
            datasets = self.search(query, expected=expected)
        for ds in datasets:
            builder.add(ds, QueryLevels.INSTANCE)
        have = len(study.get(series_uid).instances)
        if expected is not None and have < expected:
            raise IncompleteResultError(
                f"{self.source} returned {have} of the {expected} instances it counts in series {series_uid}; "
                "its result limit cuts the answer and paging could not get past it",
                source=self.source,
                reference=study.get(series_uid).reference(),
            )


def _with(include_fields: list[str], extra: list[str]) -> list[str]:
    """``include_fields`` plus ``extra`` (the counts we check), without duplicates; ``all`` already has them."""
    if "all" in include_fields:
        return list(include_fields)
    return list(dict.fromkeys([*include_fields, *extra]))
