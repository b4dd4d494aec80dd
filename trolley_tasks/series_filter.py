"""Series filters: which series of a study an export takes, decided from what the search already returned.

A research export rarely wants every series: scouts and localizers, dose reports, a two-slice test series. The
filter is applied to the object tree a searcher built at INSTANCE depth (:mod:`trolley_tasks.core`), before anything
is recorded or fetched, so a series it excludes costs one search and no transfer. Every rule reads attributes that
QIDO-RS returns by default (PS3.18 Table 10.6.3-5: Modality and SeriesDescription at the series level, SOPClassUID
at the instance level) and that DICOM-QR asks for (C-FIND return keys), so no extra request is needed.

The first rule that excludes a series names it: ``exclusion()`` returns a short text such as
``exclude-series-description 'scout|localizer'``, which the ledger and the report keep with the series.

>>> keep_ct = SeriesFilter(include_modality=["CT"], exclude_series_description="scout|localizer", min_instances=20)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trolley_tasks.core import Series


class SeriesFilter(BaseModel):
    """What to keep, as a ``[filters.NAME]`` table or the export's ``--include-modality`` (and so on) options.

    Parameters
    ----------
    include_modality
        Keep only series whose Modality (0008,0060) is one of these (case-insensitive); empty: any modality.
    exclude_modality
        Drop series whose Modality is one of these.
    include_series_description
        A regular expression; keep only series whose SeriesDescription (0008,103E) matches it (search, ignoring
        case). A series without a description does not match.
    exclude_series_description
        A regular expression; drop series whose SeriesDescription matches it.
    min_instances
        Drop series with fewer instances than this (after SOP class exclusions).
    exclude_sop_class
        SOP Class UIDs (PS3.4 Annex B) whose instances are left out; a series left with none is dropped.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    include_modality: list[str] = []
    exclude_modality: list[str] = []
    include_series_description: str = ""
    exclude_series_description: str = ""
    min_instances: int = Field(default=0, ge=0)
    exclude_sop_class: list[str] = []

    @field_validator("include_series_description", "exclude_series_description")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {value!r} ({exc})") from None
        return value

    @field_validator("include_modality", "exclude_modality")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [item.strip().upper() for item in value if item.strip()]

    @property
    def active(self) -> bool:
        """True when any rule is set: an empty filter keeps everything."""
        return self != SeriesFilter()

    def keep_instance(self, sop_class_uid: str | None) -> bool:
        """False for an instance of an excluded SOP class."""
        return not (sop_class_uid and sop_class_uid in self.exclude_sop_class)

    def exclusion(self, series: Series) -> str | None:
        """The rule that excludes ``series``, or None when it is kept."""
        modality = str(series.data.get("Modality", "") or "").upper()
        description = str(series.data.get("SeriesDescription", "") or "")
        if self.include_modality and modality not in self.include_modality:
            return f"include-modality {','.join(self.include_modality)} (series is {modality or 'without modality'})"
        if modality and modality in self.exclude_modality:
            return f"exclude-modality {modality}"
        pattern = self.include_series_description
        if pattern and not re.search(pattern, description, re.IGNORECASE):
            return f"include-series-description {pattern!r}"
        pattern = self.exclude_series_description
        if pattern and re.search(pattern, description, re.IGNORECASE):
            return f"exclude-series-description {pattern!r}"
        kept = self.kept_instances(series)
        if self.exclude_sop_class and not kept:
            return "exclude-sop-class (every instance)"
        if len(kept) < self.min_instances:
            return f"min-instances {self.min_instances} (series has {len(kept)})"
        return None

    def kept_instances(self, series: Series) -> list[str]:
        """SOPInstanceUIDs of ``series`` that no SOP class rule leaves out."""
        return [i.uid for i in series.instances if self.keep_instance(_sop_class(i.data))]


def _sop_class(data: object) -> str | None:
    value = getattr(data, "get", lambda *_: None)("SOPClassUID")
    return str(value) if value else None


def merge_filters(base: SeriesFilter | None, **overrides: Iterable[str] | str | int | None) -> SeriesFilter:
    """``base`` (a named ``[filters.NAME]``, or none) with the options given on the command line on top: a list
    option given replaces the named one, a scalar given (not empty, not None) replaces it."""
    values = (base or SeriesFilter()).model_dump()
    for key, value in overrides.items():
        if value is None or value == "" or (isinstance(value, list | tuple) and not value):
            continue
        values[key] = list(value) if isinstance(value, list | tuple) else value
    return SeriesFilter.model_validate(values)
