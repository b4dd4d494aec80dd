"""What the profile does to each attribute: PS3.15 Table E.1-1, Basic Profile column, plus the chosen options.

The Basic Profile column comes from ``dicom-anonymizer`` (KitwareMedical), which generates it from the standard's
own table for each edition (``dicomfields_2026c``): we read it, we do not copy it. Its action codes (PS3.15 E.1.1):
``D`` dummy value, ``Z`` zero length (or a dummy), ``X`` remove, ``U`` UID replaced consistently, ``K`` keep, and the
"unless needed for conformance" combinations. A combination is resolved towards a value that keeps the file valid
(``X/Z`` -> Z, ``X/D``, ``X/Z/D``, ``Z/D`` -> D, ``X/Z/U*`` -> U), since we do not know each IOD's attribute types.

The option columns are not in any library that works with pydicom 3 (idiscore carries them, but its 1.1 cannot be
imported with pydicom 3 and its 1.2 requires pydicom < 3; see docs/decisions.md). The three option lists below are
therefore ours, short, and each keyword is checked against pydicom's dictionary by the tests:

- Retain Patient Characteristics (E.3.7): the attributes whose action in that column is K;
- Retain Device Identity (E.3.8): the same;
- Clean Descriptors (E.3.5): free-text descriptors kept after cleaning (:func:`clean_text`).

Modified Dates (E.3.6) is a rule, not a list: every DA and DT value the Basic Profile would touch is shifted.
"""

from __future__ import annotations

import functools
import re
from enum import StrEnum

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as annex_e
from pydicom.datadict import tag_for_keyword

from trolley_tasks.deid.profile import DeidProfile


class Action(StrEnum):
    DUMMY = "D"
    EMPTY = "Z"
    REMOVE = "X"
    UID = "U"
    KEEP = "K"
    CLEAN = "C"
    SHIFT = "S"
    """Modified Dates: a date moved by the patient's offset (E.3.6)."""
    PSEUDONYM = "P"
    """PatientID, AccessionNumber: a keyed pseudonym (a dummy in E.1.1's sense, consistent across files)."""


_BASIC: tuple[tuple[str, Action], ...] = (
    ("D_TAGS", Action.DUMMY),
    ("Z_TAGS", Action.EMPTY),
    ("X_TAGS", Action.REMOVE),
    ("U_TAGS", Action.UID),
    ("X_Z_TAGS", Action.EMPTY),
    ("X_D_TAGS", Action.DUMMY),
    ("X_Z_D_TAGS", Action.DUMMY),
    ("Z_D_TAGS", Action.DUMMY),
    ("X_Z_U_STAR_TAGS", Action.UID),
)

PATIENT_CHARACTERISTICS = (
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "SmokingStatus", "PregnancyStatus",
    "PatientSexNeutered", "PatientSpeciesDescription", "PatientBreedDescription",
)  # fmt: skip
DEVICE_IDENTITY = (
    "DeviceSerialNumber", "StationName", "DeviceUID", "DetectorID", "GantryID", "PlateID", "CassetteID",
    "GeneratorID", "SourceSerialNumber", "DeviceDescription", "DeviceLabel",
)  # fmt: skip
DESCRIPTORS = (
    "StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments", "DerivationDescription",
    "AcquisitionDeviceProcessingDescription", "PerformedProcedureStepDescription", "RequestedProcedureDescription",
    "ScheduledProcedureStepDescription", "ContrastBolusAgent",
)  # fmt: skip
PSEUDONYMIZED = ("PatientID", "AccessionNumber")


def _tags(keywords: tuple[str, ...]) -> list[int]:
    return [tag for keyword in keywords if (tag := tag_for_keyword(keyword)) is not None]


@functools.cache
def _basic_profile() -> dict[int, Action]:
    table: dict[int, Action] = {}
    for category, action in _BASIC:
        for entry in getattr(annex_e, category):
            if len(entry) == 2:
                table[(entry[0] << 16) | entry[1]] = action
    return table


@functools.cache
def repeating_groups() -> tuple[tuple[int, int, Action], ...]:
    """(value, mask, action) of the table's repeating groups (curves 50xx, overlays 60xx: PS3.5 7.6)."""
    found = []
    for category, action in _BASIC:
        for entry in getattr(annex_e, category):
            if len(entry) == 4:
                group, element, group_mask, element_mask = entry
                found.append(((group << 16) | element, (group_mask << 16) | element_mask, action))
    return tuple(found)


def lookup(table: dict[int, Action], tag: int) -> Action:
    """The action for ``tag``: the table's, a repeating group's, or KEEP (not an identifying attribute)."""
    action = table.get(tag)
    if action is not None:
        return action
    for value, mask, masked in repeating_groups():
        if tag & mask == value:
            return masked
    return Action.KEEP


def action_table(profile: DeidProfile) -> dict[int, Action]:
    """tag -> action for ``profile``; a tag not in the table is kept (E.1.1: the table lists what identifies)."""
    table = dict(_basic_profile())
    if profile.retain_patient_characteristics:
        table.update(dict.fromkeys(_tags(PATIENT_CHARACTERISTICS), Action.KEEP))
    if profile.retain_device_identity:
        table.update(dict.fromkeys(_tags(DEVICE_IDENTITY), Action.KEEP))
    if profile.clean_descriptors:
        table.update(dict.fromkeys(_tags(DESCRIPTORS), Action.CLEAN))
    if profile.retain_uids:
        table.update({tag: Action.KEEP for tag, action in table.items() if action is Action.UID})
    table.update(dict.fromkeys(_tags(PSEUDONYMIZED), Action.PSEUDONYM))
    return table


def clean_text(text: str, identifying: list[str]) -> str:
    """``text`` without any of the ``identifying`` values (names and their components, IDs, institution), matched
    as whole words, ignoring case. What is left is a descriptor ("CT CHEST", "AXIAL 1") or nothing."""
    cleaned = text
    for value in sorted({v for v in identifying if len(v) >= 2}, key=len, reverse=True):
        cleaned = re.sub(rf"(?i)\b{re.escape(value)}\b", "", cleaned)
    return re.sub(r"\s{2,}", " ", cleaned).strip()
