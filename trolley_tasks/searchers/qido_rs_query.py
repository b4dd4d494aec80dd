"""QIDO-RS queries (PS3.18 10.6): the hierarchical and the relational form, and how a plain Query becomes one.

The two forms differ in the resource they call (PS3.18 table 10.6.1-2):

=================  ==============================================  =========================================
form               query level -> resource                         needs
=================  ==============================================  =========================================
HierarchicalQuery  STUDY    -> /studies                            nothing
                   SERIES   -> /studies/{study}/series             StudyInstanceUID
                   INSTANCE -> /studies/{study}/series/{s}/...     StudyInstanceUID and SeriesInstanceUID
RelationalQuery    SERIES   -> /series                             nothing (STUDY level is not relational)
                   INSTANCE -> /studies/{study}/instances          StudyInstanceUID, or
                            -> /instances                          nothing
=================  ==============================================  =========================================

Hierarchical calls are cheaper for the server; relational ones search more broadly, and not every server has them
(they are optional in PS3.18). The rules are plain functions (:func:`hierarchical_problems`,
:func:`relational_problems`) used both by the models' validators and by :func:`choose_query_type`, so converting a
plain Query is an explicit decision, never "try one and catch the ValidationError".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Self
from urllib.parse import quote

from pydantic import field_validator, model_validator
from pydicom.datadict import tag_for_keyword

from trolley_tasks.core import Query, QueryLevels
from trolley_tasks.errors import UnSupportedParameterError

INCLUDE_ALL = "all"
"""``includefield=all``: every attribute the server has for the matched objects (PS3.18 8.3.4.1)."""


def hierarchical_problems(query: Query) -> list[str]:
    """Why ``query`` cannot be a :class:`HierarchicalQuery`; empty when it can (dicomtrolley's rules)."""
    problems = []
    if query.SeriesInstanceUID and not query.StudyInstanceUID:
        problems.append("a SeriesInstanceUID needs its StudyInstanceUID (uids must be hierarchical)")
    if query.query_level in (QueryLevels.SERIES, QueryLevels.INSTANCE) and not query.StudyInstanceUID:
        problems.append(f"a {query.query_level.value}-level hierarchical query needs a StudyInstanceUID")
    if query.query_level == QueryLevels.INSTANCE and not query.SeriesInstanceUID:
        problems.append("an INSTANCE-level hierarchical query needs a SeriesInstanceUID")
    return problems


def relational_problems(query: Query) -> list[str]:
    """Why ``query`` cannot be a :class:`RelationalQuery`; empty when it can."""
    if query.query_level == QueryLevels.STUDY:
        return ["a relational query is for SERIES or INSTANCE level; use a HierarchicalQuery for studies"]
    return []


def _quote(value: str) -> str:
    """Percent-encode a query value, keeping the matching characters literal.

    ``*`` and ``?`` (wildcards, PS3.18 8.3.4.6.1), ``,`` (UID lists) and ``-`` (ranges) stay as they are: Orthanc's
    DICOMweb plugin 1.7 does not decode ``%2A`` and then matches nothing (measured; docs/decisions.md).
    """
    return quote(value, safe="*?,-.")


class QidoRSQueryBase(Query):
    """The query parameters of PS3.18 8.3.4 table 8.3.4-1, on top of :class:`~trolley_tasks.core.Query`.

    Parameters
    ----------
    limit
        Return at most this many results; 0 means all of them. The searcher pages to reach it.
    offset
        Skip this many results first.
    fuzzymatching
        Ask for fuzzy matching of person names (PS3.18 8.3.4.5). A server without it answers with literal
        matching and a Warning header.
    include_fields
        DICOM keywords, or ``["all"]``.
    """

    limit: int = 0
    offset: int = 0
    fuzzymatching: bool = False

    @field_validator("include_fields")
    @classmethod
    def _include_fields_are_keywords(cls, value: list[str]) -> list[str]:
        # Overrides Query's validator of the same name: QIDO-RS also knows "all".
        bad = [name for name in value if name != INCLUDE_ALL and tag_for_keyword(name) is None]
        if bad:
            raise ValueError(f"include_fields {bad} are neither DICOM keywords nor '{INCLUDE_ALL}'")
        return value

    @field_validator("limit", "offset")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("limit and offset cannot be negative")
        return value

    def uri_base(self) -> str:
        """The resource path, relative to the QIDO-RS root (PS3.18 table 10.6.1-2)."""
        raise NotImplementedError

    def _uids_in_path(self) -> set[str]:
        return set()

    def uri_search_params(self) -> dict[str, str | list[str]]:
        """The matching, includefield and fuzzymatching parameters, as dicomtrolley returns them: a dict, where a
        list value (``includefield``) is a parameter repeated; limit/offset are the pager's.

        UIDs already in the path are not repeated. Empty values are left out.
        """
        params: dict[str, str | list[str]] = {}
        in_path = self._uids_in_path()
        for name in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
            value = getattr(self, name)
            if value and name not in in_path:
                params[name] = value
        if self.ModalitiesInStudy:
            params["ModalitiesInStudy"] = self.ModalitiesInStudy
        if self.min_study_date and self.max_study_date:
            params["StudyDate"] = date_range_to_str(self.min_study_date, self.max_study_date)
        if self.include_fields:
            params["includefield"] = list(self.include_fields)
        if self.fuzzymatching:
            params["fuzzymatching"] = "true"
        return params


def date_range_to_str(min_date: datetime, max_date: datetime) -> str:
    """``YYYYMMDD-YYYYMMDD``, the DA range matching of PS3.4 C.2.2.2.5. One day is ``D-D``, which means the same."""
    return f"{min_date:%Y%m%d}-{max_date:%Y%m%d}"


def query_string(params: Mapping[str, str | list[str]] | Iterable[tuple[str, str]]) -> str:
    """``name=value&...`` with :func:`_quote`'s encoding (requests' ``params=`` would encode ``*``).

    ``params`` is pairs, or a dict as requests takes it, where a list value repeats its parameter.
    """
    pairs: Iterable[tuple[str, str | list[str]]] = params.items() if isinstance(params, Mapping) else params
    flat = [(name, item) for name, value in pairs for item in ([value] if isinstance(value, str) else value)]
    return "&".join(f"{quote(name, safe='')}={_quote(value)}" for name, value in flat)


class HierarchicalQuery(QidoRSQueryBase):
    """A QIDO-RS query along study -> series -> instance: ``/studies``, ``/studies/{s}/series``,
    ``/studies/{s}/series/{se}/instances``. Cheaper for the server; needs the parents' UIDs."""

    @model_validator(mode="after")
    def _hierarchical(self) -> Self:
        problems = hierarchical_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def uri_base(self) -> str:
        if self.query_level == QueryLevels.STUDY:
            return "/studies"
        if self.query_level == QueryLevels.SERIES:
            return f"/studies/{self.StudyInstanceUID}/series"
        return f"/studies/{self.StudyInstanceUID}/series/{self.SeriesInstanceUID}/instances"

    def _uids_in_path(self) -> set[str]:
        if self.query_level == QueryLevels.SERIES:
            return {"StudyInstanceUID"}
        if self.query_level == QueryLevels.INSTANCE:
            return {"StudyInstanceUID", "SeriesInstanceUID"}
        return set()


class RelationalQuery(QidoRSQueryBase):
    """A QIDO-RS query across the hierarchy: ``/series``, ``/instances``, ``/studies/{s}/instances``. Searches more
    broadly than :class:`HierarchicalQuery`; optional for servers."""

    @model_validator(mode="after")
    def _relational(self) -> Self:
        problems = relational_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def uri_base(self) -> str:
        if self.query_level == QueryLevels.SERIES:
            return "/series"
        if self.StudyInstanceUID:
            return f"/studies/{self.StudyInstanceUID}/instances"
        return "/instances"

    def _uids_in_path(self) -> set[str]:
        if self.query_level == QueryLevels.INSTANCE and self.StudyInstanceUID:
            return {"StudyInstanceUID"}
        return set()


def choose_query_type(query: Query, *, relational: bool = True) -> type[HierarchicalQuery] | type[RelationalQuery]:
    """The QIDO-RS form that expresses ``query``: hierarchical when it can (cheaper), else relational.

    Raises
    ------
    UnSupportedParameterError
        When neither form fits (relational queries disabled, or the query breaks both forms' rules).
    """
    h_problems = hierarchical_problems(query)
    if not h_problems:
        return HierarchicalQuery
    r_problems = relational_problems(query)
    if relational and not r_problems:
        return RelationalQuery
    reasons = h_problems + (r_problems if relational else ["relational queries are disabled for this server"])
    raise UnSupportedParameterError(f"no QIDO-RS form expresses {query.to_short_string()}: {'; '.join(reasons)}")


def to_qido_query(query: Query, *, relational: bool = True) -> QidoRSQueryBase:
    """``query`` as a QIDO-RS query: itself when it already is one, else converted by :func:`choose_query_type`."""
    if isinstance(query, QidoRSQueryBase):
        if isinstance(query, RelationalQuery) and not relational:
            raise UnSupportedParameterError(
                f"{query.to_short_string()} is relational, and relational queries are disabled for this server"
            )
        return query
    return choose_query_type(query, relational=relational).init_from_query(query)
