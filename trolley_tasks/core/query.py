"""The backend-agnostic :class:`Query` and :class:`ExtendedQuery`, the base of the strict backends' queries."""

from __future__ import annotations

from datetime import date, datetime
from enum import Enum
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

from trolley_tasks.core.objects import QueryLevels
from trolley_tasks.errors import UnSupportedParameterError
from trolley_tasks.fields import invalid_fields_for_level


class Query(BaseModel):
    """A query every searcher accepts.

    DICOM attributes keep their DICOM keyword (CamelCase); meta-parameters are snake_case. A searcher with its own
    query type converts a plain Query with :meth:`init_from_query`, which refuses to drop information.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    StudyInstanceUID: str = ""
    AccessionNumber: str = ""
    PatientName: str = ""
    PatientID: str = ""
    ModalitiesInStudy: str = ""
    SeriesInstanceUID: str = ""
    query_level: QueryLevels = QueryLevels.STUDY
    min_study_date: datetime | None = None
    max_study_date: datetime | None = None
    include_fields: list[str] = []

    open_ended_dates: ClassVar[bool] = False
    """True for a backend that can send a one-sided date range (C-FIND ``20200301-``, PS3.4 C.2.2.2.5). Elsewhere
    a lone date is refused rather than guessed at: MINT needs both, and a silent "until today" is a choice the
    caller should make."""

    @field_validator("include_fields")
    @classmethod
    def _include_fields_are_keywords(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if tag_for_keyword(name) is None]
        if bad:
            raise ValueError(f"include_fields {bad} are not DICOM keywords (for example 'PatientBirthDate')")
        return value

    @model_validator(mode="after")
    def _study_dates_both_or_neither(self) -> Self:
        if not self.open_ended_dates and (self.min_study_date is None) != (self.max_study_date is None):
            raise ValueError("give both min_study_date and max_study_date, or neither")
        if self.min_study_date and self.max_study_date and self.min_study_date > self.max_study_date:
            raise ValueError("min_study_date is after max_study_date")
        return self

    def non_default_values(self) -> dict[str, Any]:
        """The fields set to something other than their default."""
        out: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value != info.get_default(call_default_factory=True):
                out[name] = value
        return out

    @classmethod
    def init_from_query(cls, query: Query) -> Self:
        """A ``cls`` query holding every non-default value of ``query``.

        Raises
        ------
        UnSupportedParameterError
            If ``query`` has a non-default value for a field that ``cls`` does not have.
        """
        if type(query) is cls:
            return query
        values = query.non_default_values()
        lost = sorted(set(values) - set(cls.model_fields))
        if lost:
            raise UnSupportedParameterError(
                f"{cls.__name__} cannot express {', '.join(lost)} of {type(query).__name__}; these values would be lost"
            )
        return cls(**values)

    def to_short_string(self) -> str:
        """A dense one-line form for people and logs: only the non-default values."""
        parts = []
        for name, value in self.non_default_values().items():
            if isinstance(value, date):
                value = value.strftime("%Y-%m-%d")
            elif isinstance(value, Enum):
                value = value.value
            parts.append(f"{name}={value}")
        return f"{type(self).__name__}({', '.join(parts)})"


class ExtendedQuery(Query):
    """Base of the queries of strict backends (MINT, DICOM-QR), with dicomtrolley's extra matching keys.

    The extra keys are matched by the server: MINT sends them as parameters, DICOM-QR puts each in the identifier of
    its Study Root level (``trolley_tasks.fields``). ``PatientBirthDate`` is a date, sent as ``YYYYMMDD``.
    ``include_fields`` must be valid return fields for the query level, as :mod:`trolley_tasks.fields` lists them,
    so that a server never silently ignores a requested field.
    """

    InstitutionName: str = ""
    PatientSex: str = ""
    StudyDescription: str = ""
    SeriesDescription: str = ""
    InstitutionalDepartmentName: str = ""
    PatientBirthDate: date | None = None

    EXTENDED_KEYS: ClassVar[tuple[str, ...]] = (
        "InstitutionName",
        "PatientSex",
        "StudyDescription",
        "SeriesDescription",
        "InstitutionalDepartmentName",
        "PatientBirthDate",
    )

    def extended_values(self) -> dict[str, str]:
        """The extra matching keys that are set, as DICOM text (a date as ``YYYYMMDD``)."""
        out: dict[str, str] = {}
        for name in self.EXTENDED_KEYS:
            value = getattr(self, name)
            if value:
                out[name] = value.strftime("%Y%m%d") if isinstance(value, date) else value
        return out

    @model_validator(mode="after")
    def _include_fields_valid_for_level(self) -> Self:
        bad = invalid_fields_for_level(self.include_fields, self.query_level)
        if bad:
            raise ValueError(
                f"include_fields {bad} cannot be returned at query_level {self.query_level.value}; "
                "see trolley_tasks.fields"
            )
        return self
