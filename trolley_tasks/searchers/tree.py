"""Build the Study -> Series -> Instance tree from the flat datasets a server answers with.

QIDO-RS, C-FIND, MINT and WADO-RS metadata all answer with one dataset per object found, at the query's level, each
carrying the UIDs of its parents (PS3.18 10.6.3, PS3.4 C.6). :func:`build_tree` groups them by those UIDs, so every
searcher shares one way of getting the tree right:

- each object appears once, however many datasets name it (an instance repeated across pages is not doubled);
- the object at a dataset's own level keeps everything the server returned for it in ``.data``; its parents get
  the attributes of their own level (``fields.StudyLevel``, ``fields.SeriesLevel``) that they do not have yet, so
  a study built from instance answers still knows its PatientID;
- studies, series and instances keep the server's order of first appearance.

A UID in an answer that is missing or not DICOM UID grammar is the server's fault, so it raises
:class:`~trolley_tasks.errors.PayloadInvalidError` (retryable, quarantined), not ``InvalidUIDError`` (a usage error).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from pydicom import Dataset

from trolley_tasks.core import DICOMObject, Instance, QueryLevels, Series, Study, is_valid_uid
from trolley_tasks.errors import PayloadInvalidError
from trolley_tasks.fields import SeriesLevel, StudyLevel

_STUDY_KEYWORDS = StudyLevel | {"SpecificCharacterSet"}
_SERIES_KEYWORDS = SeriesLevel | {"SpecificCharacterSet", "StudyInstanceUID"}


def dataset_uid(ds: Dataset, keyword: str, *, source: str | None = None) -> str:
    """The UID ``keyword`` of a dataset from a server answer.

    Raises
    ------
    PayloadInvalidError
        If the attribute is absent, multi-valued or not a valid DICOM UID (PS3.5 9.1).
    """
    value = ds.get(keyword)
    if value is None or value == "":
        raise PayloadInvalidError(f"the server's answer holds an object without {keyword}", source=source)
    text = str(value) if isinstance(value, str) else None
    if text is None or not is_valid_uid(text):
        shown = repr(value)[:100]
        raise PayloadInvalidError(f"the server's answer holds an invalid {keyword} {shown}", source=source)
    return text


def _merge(target: Dataset, ds: Dataset, keywords: frozenset[str] | set[str] | None) -> None:
    """Copy into ``target`` the elements of ``ds`` it lacks; only those named in ``keywords`` unless None."""
    for elem in ds:
        if elem.tag in target:
            continue
        if keywords is not None and elem.keyword not in keywords:
            continue
        target.add(copy.deepcopy(elem))


class TreeBuilder:
    """Accumulates datasets of any level into one tree. :func:`build_tree` is the one-call form.

    Searchers that collect an answer in several calls (a study, then its series, then each series' instances) add
    each answer at its own level, and get one consistent tree. ``study_class`` lets a protocol return its own kind
    of study (MINT's :class:`~trolley_tasks.searchers.mint.MintStudy`, which also carries MINT's own ids).
    """

    def __init__(self, *, source: str | None = None, study_class: type[Study] = Study) -> None:
        self.source = source
        self.study_class = study_class
        self._studies: dict[str, Study] = {}
        self._series: dict[tuple[str, str], Series] = {}
        self._instances: dict[tuple[str, str, str], Instance] = {}

    def add(self, ds: Dataset, level: QueryLevels) -> DICOMObject:
        """Place ``ds``, an answer at ``level``, in the tree; return the object it describes."""
        level = QueryLevels(level)
        study_uid = dataset_uid(ds, "StudyInstanceUID", source=self.source)
        study = self._studies.get(study_uid)
        if study is None:
            study = self._studies[study_uid] = self.study_class(study_uid, data=Dataset())
        if level == QueryLevels.STUDY:
            _merge(study.data, ds, None)
            return study
        _merge(study.data, ds, _STUDY_KEYWORDS)

        series_uid = dataset_uid(ds, "SeriesInstanceUID", source=self.source)
        series = self._series.get((study_uid, series_uid))
        if series is None:
            series = self._series[(study_uid, series_uid)] = study.add_series(Series(series_uid, data=Dataset()))
        if level == QueryLevels.SERIES:
            _merge(series.data, ds, None)
            return series
        _merge(series.data, ds, _SERIES_KEYWORDS)

        instance_uid = dataset_uid(ds, "SOPInstanceUID", source=self.source)
        key = (study_uid, series_uid, instance_uid)
        instance = self._instances.get(key)
        if instance is None:
            instance = self._instances[key] = series.add_instance(Instance(instance_uid, data=Dataset()))
        _merge(instance.data, ds, None)
        return instance

    def studies(self) -> list[Study]:
        """The studies built so far, in order of first appearance."""
        return list(self._studies.values())


def build_tree(datasets: Iterable[Dataset], level: QueryLevels, *, source: str | None = None) -> list[Study]:
    """Group ``datasets``, each an answer at ``level``, into studies with their series and instances.

    >>> studies = build_tree(qido_instance_answers, QueryLevels.INSTANCE)
    >>> studies[0].series[0].instances[0].data.SOPInstanceUID
    """
    builder = TreeBuilder(source=source)
    for ds in datasets:
        builder.add(ds, level)
    return builder.studies()


def prune_to_level(studies: Iterable[Study], level: QueryLevels) -> list[Study]:
    """Drop what lies deeper than ``level``, for a source that always answers in full (WADO-RS metadata).

    A study asked for at STUDY depth then looks the same from every searcher, and does not pretend to a depth the
    caller did not ask to be checked.
    """
    out = list(studies)
    for study in out:
        if level == QueryLevels.STUDY:
            study.series = []
        elif level == QueryLevels.SERIES:
            for series in study.series:
                series.instances = []
    return out
