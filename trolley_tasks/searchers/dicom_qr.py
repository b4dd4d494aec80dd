"""DICOM Query/Retrieve search: Study Root C-FIND (PS3.4 Annex C) at the STUDY, SERIES and IMAGE levels.

The Study Root model is hierarchical (PS3.4 C.4.1.2): a SERIES query names its study, an IMAGE query its study and
series. A study searched to INSTANCE depth is therefore one STUDY C-FIND, one SERIES C-FIND per study and one IMAGE
C-FIND per series, and all of them run on **one association**
(:class:`~trolley_tasks.transports.dimse.AssociationManager`),
which stays open for the next call.

Matching follows PS3.4 C.2.2.2: ``*`` and ``?`` wildcards, date ranges ``YYYYMMDD-YYYYMMDD`` and single values; an
empty key is a return key. Every response identifier is kept whole in the object's ``.data``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from pydicom import Dataset
from pynetdicom import build_context

from trolley_tasks.core import ExtendedQuery, Query, QueryLevels, SeriesReference, Study, StudyReference
from trolley_tasks.fields import InstanceLevel, SeriesLevel, SeriesLevelPromotable, StudyLevel
from trolley_tasks.searchers.base import SearcherBase
from trolley_tasks.searchers.tree import TreeBuilder, dataset_uid
from trolley_tasks.transports.dimse import STUDY_ROOT_FIND, AssociationManager, DimseTLS

STUDY_RETURN_KEYS = (
    "StudyInstanceUID",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "ModalitiesInStudy",
)
"""Asked for at STUDY level on every query, so that a study always says whose it is and when."""

SERIES_RETURN_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription")
IMAGE_RETURN_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")
"""SOPClassUID lets the C-GET downloader propose exactly the storage contexts it needs."""


class DICOMQuery(ExtendedQuery):
    """A query that C-FIND can express: the standard :class:`~trolley_tasks.core.Query` plus Modality, ProtocolName
    and StudyID (dicomtrolley's ``DICOMQuery``), and :class:`~trolley_tasks.core.ExtendedQuery`'s keys.

    A lone ``min_study_date`` or ``max_study_date`` is an open-ended range (``20200301-``, PS3.4 C.2.2.2.5.1), as in
    dicomtrolley. Modality, ProtocolName, SeriesDescription and SeriesInstanceUID are series attributes. They select
    the series that a SERIES or INSTANCE query returns, and a study matches only when at least one of its series
    does (also at STUDY depth, where the series themselves are not returned).
    """

    Modality: str = ""
    ProtocolName: str = ""
    StudyID: str = ""

    open_ended_dates: ClassVar[bool] = True

    def series_filters(self) -> dict[str, str]:
        """The series-level matching keys that are set."""
        names = ("SeriesInstanceUID", "Modality", "ProtocolName", "SeriesDescription")
        return {name: getattr(self, name) for name in names if getattr(self, name)}

    def study_filters(self) -> dict[str, str]:
        """The study-level matching keys that are set (patient keys included: Study Root, PS3.4 C.6.2.1)."""
        out = {name: getattr(self, name) for name in _STUDY_MATCHING_KEYS if getattr(self, name)}
        out.update({k: v for k, v in self.extended_values().items() if k not in self.series_filters()})
        if self.min_study_date is not None or self.max_study_date is not None:
            low = f"{self.min_study_date:%Y%m%d}" if self.min_study_date else ""
            high = f"{self.max_study_date:%Y%m%d}" if self.max_study_date else ""
            out["StudyDate"] = f"{low}-{high}"
        return out


_STUDY_MATCHING_KEYS = (
    "StudyInstanceUID",
    "AccessionNumber",
    "PatientName",
    "PatientID",
    "ModalitiesInStudy",
    "StudyID",
)


def _level_of_field(keyword: str, query_level: QueryLevels) -> QueryLevels:
    """The Study Root level whose identifier carries ``keyword`` (fields.py lists what each level may return)."""
    if keyword in StudyLevel:
        return QueryLevels.STUDY
    if keyword in SeriesLevel or (keyword in SeriesLevelPromotable and query_level == QueryLevels.SERIES):
        return QueryLevels.SERIES
    if keyword in InstanceLevel:
        return QueryLevels.INSTANCE
    return query_level


class DICOMQR(SearcherBase):
    """Search a PACS with Study Root C-FIND.

    Parameters
    ----------
    host, port
        The PACS's DICOM address (``port`` may be a string, as in dicomtrolley's examples).
    aet
        Our calling AE title, as registered on the PACS; dicomtrolley's default ``DICOMTROLLEY``.
    aec
        The PACS's called AE title; dicomtrolley's default ``ANY-SCP`` (many PACS check it, so name yours).
    source
        A name for errors and logs; defaults to ``dicom://AEC@host:port``.
    timeout
        Seconds for the connect, the association answer, each C-FIND response and network idleness.
    tls
        DICOM TLS settings, or None for plain TCP.
    """

    def __init__(
        self,
        host: str,
        port: int | str,
        aet: str = "DICOMTROLLEY",
        aec: str = "ANY-SCP",
        *,
        source: str | None = None,
        timeout: float = 30.0,
        tls: DimseTLS | None = None,
    ) -> None:
        self.associations = AssociationManager(
            host,
            int(port),
            aet,
            aec,
            contexts=[build_context(STUDY_ROOT_FIND)],
            timeout=timeout,
            tls=tls,
            source=source,
        )
        self.source = self.associations.source

    def __repr__(self) -> str:
        return f"DICOMQR({self.associations!r})"

    def close(self) -> None:
        """Release the association."""
        self.associations.release()

    # ----------------------------------------------------------------------------------------------------------------

    def find_studies(self, query: Query) -> list[Study]:
        """Every study matching ``query``, filled to ``query.query_level``, on one reused association."""
        dquery = DICOMQuery.init_from_query(query)
        level = dquery.query_level
        series_filters = dquery.series_filters()
        builder = TreeBuilder(source=self.source)
        for study_ds in self.c_find(self._study_identifier(dquery), None):
            study_uid = dataset_uid(study_ds, "StudyInstanceUID", source=self.source)
            series_answers: list[Dataset] = []
            if level != QueryLevels.STUDY or series_filters:
                series_answers = self.c_find(self._series_identifier(dquery, study_uid), StudyReference(study_uid))
                if series_filters and not series_answers:
                    continue  # no series of this study matches the series-level keys
            builder.add(study_ds, QueryLevels.STUDY)
            if level == QueryLevels.STUDY:
                continue
            for series_ds in series_answers:
                series = builder.add(series_ds, QueryLevels.SERIES)
                if level == QueryLevels.INSTANCE:
                    identifier = self._image_identifier(dquery, study_uid, series.uid)
                    for image_ds in self.c_find(identifier, SeriesReference(study_uid, series.uid)):
                        builder.add(image_ds, QueryLevels.INSTANCE)
        return builder.studies()

    @staticmethod
    def parse_c_find_response(responses: Iterable[Dataset]) -> list[Study]:
        """C-FIND identifiers (of any levels, in any order) as the object tree, as dicomtrolley offers it.

        Each identifier is placed at its ``QueryRetrieveLevel`` (``IMAGE`` is INSTANCE); one without it at the
        deepest level whose UID it carries. :class:`~trolley_tasks.errors.PayloadInvalidError` if a UID is
        missing or invalid.
        """
        builder = TreeBuilder()
        for ds in responses:
            builder.add(ds, _answer_level(ds))
        return builder.studies()

    def c_find(self, identifier: Dataset, reference: object) -> list[Dataset]:
        """The matches of one C-FIND, without repeats (some PACS answer a study once per matching series)."""
        return _unique(self.associations.find(identifier, reference), identifier.QueryRetrieveLevel)

    # ----------------------------------------------------------------------------------------------------------------
    # Identifiers (PS3.4 C.6.2.1: Study Root keys per level)

    @staticmethod
    def _with_return_keys(ds: Dataset, keys: tuple[str, ...], query: DICOMQuery, level: QueryLevels) -> Dataset:
        wanted = list(keys) + [f for f in query.include_fields if _level_of_field(f, query.query_level) == level]
        for keyword in wanted:
            if keyword not in ds:
                setattr(ds, keyword, None)
        return ds

    def _study_identifier(self, query: DICOMQuery) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for keyword, value in query.study_filters().items():
            setattr(ds, keyword, value)
        return self._with_return_keys(ds, STUDY_RETURN_KEYS, query, QueryLevels.STUDY)

    def _series_identifier(self, query: DICOMQuery, study_uid: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        for keyword, value in query.series_filters().items():
            setattr(ds, keyword, value)
        return self._with_return_keys(ds, SERIES_RETURN_KEYS, query, QueryLevels.SERIES)

    def _image_identifier(self, query: DICOMQuery, study_uid: str, series_uid: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        return self._with_return_keys(ds, IMAGE_RETURN_KEYS, query, QueryLevels.INSTANCE)


def _answer_level(ds: Dataset) -> QueryLevels:
    level = str(ds.get("QueryRetrieveLevel", "")).upper()
    if level in _UNIQUE_KEY:
        return _LEVELS[level]
    for name, key in reversed(_UNIQUE_KEY.items()):
        if ds.get(key):
            return _LEVELS[name]
    return QueryLevels.STUDY  # no UID at all: TreeBuilder refuses it, naming StudyInstanceUID


_LEVELS = {"STUDY": QueryLevels.STUDY, "SERIES": QueryLevels.SERIES, "IMAGE": QueryLevels.INSTANCE}
_UNIQUE_KEY = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


def _unique(matches: list[Dataset], level: str) -> list[Dataset]:
    """Matches without repeats of the level's unique key."""
    key = _UNIQUE_KEY[level]
    seen: set[object] = set()
    out = []
    for ds in matches:
        uid = ds.get(key)
        if uid in seen:
            continue
        seen.add(uid)
        out.append(ds)
    return out
