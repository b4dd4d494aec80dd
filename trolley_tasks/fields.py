"""Return fields that a query may ask for at each query level.

The four sets come from the Vitrea Connection 8.2.0.1 manual, as dicomtrolley's ``fields`` module names them. Other
PACS software may accept more; backends whose server is strict (MINT, and DICOM-QR by inheritance of
:class:`~trolley_tasks.core.ExtendedQuery`) validate ``include_fields`` against them.
"""

from __future__ import annotations

from collections.abc import Iterable

StudyLevel: frozenset[str] = frozenset(
    {
        "PatientID",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "PatientName",
        "PatientSex",
        "PatientBirthDate",
        "PatientBirthTime",
        "StudyInstanceUID",
        "AccessionNumber",
        "IssuerOfAccessionNumberSequence",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "RequestedProcedureID",
        "StudyDescription",
        "InstanceAvailability",
        "InstitutionName",
        "StudyStatusID",
        "ConfidentialityCode",
        "ProcedureCodeSequence",
        "ReasonForPerformedProcedureCodeSequence",
        "OtherPatientIDsSequence",
        "InstitutionalDepartmentName",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "SOPClassesInStudy",
        "CurrentPatientLocation",
        "SourceApplicationEntityTitle",
    }
)
"""May be returned at STUDY, SERIES or INSTANCE level. An attribute absent from the study is not returned."""

SeriesLevel: frozenset[str] = frozenset(
    {
        "SeriesInstanceUID",
        "Modality",
        "SeriesDate",
        "SeriesTime",
        "SeriesDescription",
        "Laterality",
        "AnatomicRegionSequence",
        "BodyPartExamined",
        "FrameOfReferenceUID",
        "PerformedProcedureStepDescription",
        "ProtocolName",
        "PerformingPhysicianName",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "OperatorsName",
        "PerformedProcedureStepStatus",
        "PresentationIntentType",
        "SeriesNumber",
        "SeriesType",
        "SmallestPixelValueInSeries",
        "SpatialResolution",
        "NumberOfSeriesRelatedInstances",
    }
)
"""May be returned at SERIES or INSTANCE level."""

SeriesLevelPromotable: frozenset[str] = frozenset(
    {
        "Manufacturer",
        "ManufacturerModelName",
        "CorrectedImage",
        "DeviceSerialNumber",
        "InstitutionAddress",
        "SoftwareVersions",
        "StationName",
        "DateOfLastCalibration",
        "TimeOfLastCalibration",
    }
)
"""Instance attributes a SERIES query may return when all instances of the series agree (slower on Vitrea)."""

InstanceLevel: frozenset[str] = frozenset(
    {
        "SOPInstanceUID",
        "SOPClassUID",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "BitsAllocated",
        "ContentDate",
        "ContentTime",
        "ObservationDateTime",
        "ConceptNameCodeSequence",
        "ContentLabel",
        "ContentDescription",
        "PresentationCreationDate",
        "PresentationCreationTime",
        "ContentCreatorName",
        "RetrieveURI",
        "TransferSyntaxUID",
        "InstanceNumber",
        "Manufacturer",
        "StationName",
        "ManufacturerModelName",
        "DeviceSerialNumber",
        "InstitutionAddress",
        "CorrectedImage",
        "SoftwareVersions",
        "DateOfLastCalibration",
        "TimeOfLastCalibration",
        "PixelPaddingValue",
    }
)
"""May be returned at INSTANCE level."""


def fields_for_level(level: str) -> frozenset[str]:
    """Every return field valid for a query at ``level`` (``"STUDY"``, ``"SERIES"`` or ``"INSTANCE"``).

    Levels are taken as their DICOM names (``QueryLevels`` is a ``StrEnum`` of them), so that this module imports
    nothing of the package: :mod:`trolley_tasks.core` builds on it, never the other way round.
    """
    if level == "STUDY":
        return StudyLevel
    if level == "SERIES":
        return StudyLevel | SeriesLevel | SeriesLevelPromotable
    return StudyLevel | SeriesLevel | InstanceLevel


def invalid_fields_for_level(include_fields: Iterable[str], level: str) -> list[str]:
    """The members of ``include_fields`` that a query at ``level`` may not ask for, in their given order."""
    valid = fields_for_level(level)
    return [name for name in include_fields if name not in valid]
