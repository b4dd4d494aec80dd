"""The DICOM object model shared by searchers, downloaders, storage and the engine.

- :mod:`~trolley_tasks.core.objects`: :class:`DICOMObjectLevels` and :class:`QueryLevels`; UID validation; the
  frozen, hashable references (:class:`StudyReference`, :class:`SeriesReference`, :class:`InstanceReference`); the
  object tree that searchers return (:class:`Study`, :class:`Series`, :class:`Instance`); :func:`to_references` and
  its kin; :func:`group_by_series`.
- :mod:`~trolley_tasks.core.query`: :class:`Query`, the backend-agnostic query, and :class:`ExtendedQuery`, its base
  for strict backends.

Everything is importable from ``trolley_tasks.core``, as in dicomtrolley.
"""

from trolley_tasks.core.objects import (
    UID_MAX_LENGTH,
    DICOMObject,
    DICOMObjectLevels,
    DICOMObjectReference,
    Downloadable,
    Instance,
    InstanceReference,
    QueryLevels,
    Series,
    SeriesReference,
    Study,
    StudyReference,
    group_by_series,
    is_valid_uid,
    to_instance_refs,
    to_references,
    to_series_level_refs,
    validate_uid,
)
from trolley_tasks.core.query import ExtendedQuery, Query

__all__ = [
    "UID_MAX_LENGTH",
    "DICOMObject",
    "DICOMObjectLevels",
    "DICOMObjectReference",
    "Downloadable",
    "ExtendedQuery",
    "Instance",
    "InstanceReference",
    "Query",
    "QueryLevels",
    "Series",
    "SeriesReference",
    "Study",
    "StudyReference",
    "group_by_series",
    "is_valid_uid",
    "to_instance_refs",
    "to_references",
    "to_series_level_refs",
    "validate_uid",
]
