"""WADO-RS metadata (PS3.18 10.4.1.1.2) as a Searcher: the instance tree of a study named by its UID.

dicomtrolley's *downloader* of the same protocol, ``WadoRSMetaData`` (capital D), is
:mod:`trolley_tasks.downloaders.wado_rs_metadata`.

``GET {url}/studies/{study}/metadata`` (or ``.../series/{series}/metadata``) answers the full header of every
instance, as DICOM JSON, bulk data by URI (never fetched here, see :mod:`trolley_tasks.formats.dicom_json`). It is a
cheap
way to expand a study on servers whose QIDO-RS is weak, but it cannot search: only queries that name a
StudyInstanceUID are answered, the others raise UnSupportedParameterError.

Unlike dicomtrolley, the HTTP status is checked: a 404 (Orthanc's answer for an unknown study) or a 204 is "no such
study", and every other failure maps to the error tree through :mod:`trolley_tasks.transports.http`.
"""

from __future__ import annotations

from trolley_tasks.core import Query, QueryLevels, Study, StudyReference, validate_uid
from trolley_tasks.errors import StudyNotFoundError, UnSupportedParameterError
from trolley_tasks.searchers.base import SearcherBase
from trolley_tasks.searchers.tree import build_tree, prune_to_level
from trolley_tasks.transports.http import HTTPEndpoint, get_dicom_json, redact_url

_ANSWERABLE = {"StudyInstanceUID", "SeriesInstanceUID", "query_level", "include_fields"}


class WadoRSMetadata(HTTPEndpoint, SearcherBase):
    """Study expansion through WADO-RS metadata.

    Parameters
    ----------
    session, source, timeout
        As for every HTTP client (:class:`~trolley_tasks.transports.http.HTTPEndpoint`).
    url
        The WADO-RS root, for example ``http://server:8042/dicom-web``.
    """

    def find_studies(self, query: Query) -> list[Study]:
        """The study ``query.StudyInstanceUID`` (limited to ``query.SeriesInstanceUID`` if given), or ``[]``.

        Metadata holds every attribute, so any ``include_fields`` are in ``.data`` already.

        Raises
        ------
        UnSupportedParameterError
            If the query has no StudyInstanceUID, a wildcard or list in it, or any other matching value.
        """
        values = query.non_default_values()
        extra = sorted(set(values) - _ANSWERABLE)
        uid = query.StudyInstanceUID
        if extra or not uid or any(ch in uid for ch in "*?,\\"):
            raise UnSupportedParameterError(
                f"WadoRSMetadata cannot search ({query.to_short_string()}): it reads the metadata of one study "
                "named by an exact StudyInstanceUID; use QidoRS or DICOMQR to search by other values",
                source=self.source,
            )
        try:
            return [self._study(uid, query.SeriesInstanceUID, QueryLevels(query.query_level))]
        except StudyNotFoundError:
            return []

    def find_study_by_id(self, study_uid: str, query_level: QueryLevels = QueryLevels.STUDY) -> Study:
        """The study with its series and instances to ``query_level``; StudyNotFoundError if the server lacks it."""
        validate_uid(study_uid, "StudyInstanceUID")
        return self._study(study_uid, "", QueryLevels(query_level))

    def _study(self, study_uid: str, series_uid: str, level: QueryLevels) -> Study:
        validate_uid(study_uid, "StudyInstanceUID")
        path = f"/studies/{study_uid}"
        if series_uid:
            validate_uid(series_uid, "SeriesInstanceUID")
            path += f"/series/{series_uid}"
        url = f"{self.url}{path}/metadata"
        reference = StudyReference(study_uid)
        datasets = get_dicom_json(self, url, reference)
        if datasets is None:
            raise self._missing(reference, url)
        studies = [s for s in build_tree(datasets, QueryLevels.INSTANCE, source=self.source) if s.uid == study_uid]
        if not studies:
            raise self._missing(reference, url)
        return prune_to_level(studies, level)[0]

    def _missing(self, reference: StudyReference, url: str) -> StudyNotFoundError:
        return StudyNotFoundError(
            f"no study {reference.study_uid} at {redact_url(url)}", source=self.source, reference=reference
        )
