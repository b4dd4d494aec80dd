"""The Searcher protocol and the behaviour all searchers share.

A searcher that silently returns a partial answer loses data, so every implementation must either return the whole
answer (paging where the server caps results) or raise.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from trolley_tasks.core import Query, QueryLevels, Study, validate_uid
from trolley_tasks.errors import AmbiguousResultError, StudyNotFoundError


@runtime_checkable
class Searcher(Protocol):
    """Something that finds studies and returns them as the object tree."""

    def find_studies(self, query: Query) -> list[Study]:
        """Every study matching ``query``, filled to ``query.query_level``; an empty list when nothing matches."""
        ...

    def find_study(self, query: Query) -> Study:
        """The one study matching ``query``; StudyNotFoundError or AmbiguousResultError otherwise."""
        ...

    def find_study_by_id(self, study_uid: str, query_level: QueryLevels = QueryLevels.STUDY) -> Study:
        """One study by StudyInstanceUID, with series and instances filled to ``query_level``."""
        ...

    def close(self) -> None:
        """Release what the searcher opened (a DICOM-QR association, its own HTTP session). A session the caller
        passed in stays open. The searcher may not be used afterwards."""
        ...


class SearcherBase:
    """``find_study`` and ``find_study_by_id`` in terms of ``find_studies``. Subclasses override where they can do
    better (for example one association or one relational call per study)."""

    source: str | None = None

    def find_studies(self, query: Query) -> list[Study]:
        raise NotImplementedError

    def find_study(self, query: Query) -> Study:
        studies = self.find_studies(query)
        if not studies:
            raise StudyNotFoundError(f"no study matches {query.to_short_string()}", source=self.source)
        if len(studies) > 1:
            raise AmbiguousResultError(
                f"{len(studies)} studies match {query.to_short_string()}; expected exactly one", source=self.source
            )
        return studies[0]

    def find_study_by_id(self, study_uid: str, query_level: QueryLevels = QueryLevels.STUDY) -> Study:
        validate_uid(study_uid, "StudyInstanceUID")
        return self.find_study(Query(StudyInstanceUID=study_uid, query_level=query_level))

    def close(self) -> None:
        """Nothing to release by default."""
