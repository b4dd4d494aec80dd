"""De-identification profiles: ``[deid.NAME]`` tables, and the built-in ``basic``.

A profile is the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile (E.2) plus the options a
research export asks for (E.3), and what to leave out whole (pixels that may show a name):

- Retain Longitudinal Temporal Information with Modified Dates (E.3.6): dates shifted by a per-patient offset;
- Retain Patient Characteristics (E.3.7), Retain Device Identity (E.3.8), Clean Descriptors (E.3.5);
- Retain UIDs (E.3.9): off by default; UIDs are replaced by keyed pseudonyms;
- Retain Safe Private (E.3.10): only the private attributes named in ``safe_private`` survive;
- instances flagged ``BurnedInAnnotation = YES`` (PS3.3 C.7.6.1.1.7) and SOP classes whose pixels or content
  typically carry identifying text (secondary capture, encapsulated documents, SR) are excluded and reported.

The key is a secret like any other: the profile holds the *name* of an environment variable (``key_env``) or the
path of a file (``key_file``), never the key, so a profile may be printed, logged and stored in a job record.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom.uid import (
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedCDAStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)

from trolley_tasks.errors import ConfigurationError, MissingCredentialError
from trolley_tasks.transports.auth import read_secret

DEFAULT_KEY_ENV = "TROLLEY_DEID_KEY"
MIN_KEY_LENGTH = 16
"""Characters of key at least: a short key could be guessed by trying every value of a small identifier space."""

_SR = "structured report (free text, not cleaned: E.3.3 Clean Structured Content is not offered)"
PHI_IN_CONTENT_SOP_CLASSES: dict[str, str] = {
    SecondaryCaptureImageStorage: "secondary capture (screenshots carry names in pixels)",
    MultiFrameSingleBitSecondaryCaptureImageStorage: "secondary capture (screenshots carry names in pixels)",
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage: "secondary capture (screenshots carry names in pixels)",
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage: "secondary capture (screenshots carry names in pixels)",
    MultiFrameTrueColorSecondaryCaptureImageStorage: "secondary capture (screenshots carry names in pixels)",
    EncapsulatedPDFStorage: "encapsulated PDF (a document, not cleaned)",
    EncapsulatedCDAStorage: "encapsulated CDA (a document, not cleaned)",
    BasicTextSRStorage: _SR,
    EnhancedSRStorage: _SR,
    ComprehensiveSRStorage: _SR,
    XRayRadiationDoseSRStorage: _SR,
}
"""SOP classes excluded by default, with the reason the report gives (PS3.15 E.1.1: the profile covers attributes,
not identifying text burned into pixels or written into documents)."""


class DeidProfile(BaseModel):
    """One ``[deid.NAME]`` table. Every field has the ``basic`` profile's value as its default.

    Parameters
    ----------
    key_env, key_file
        Where the pseudonym key is: an environment variable's name (default ``TROLLEY_DEID_KEY``) or a file's path.
        ``key_file`` wins when both are set.
    retain_modified_dates
        Shift dates by a per-patient offset instead of removing them (E.3.6).
    retain_patient_characteristics, retain_device_identity, clean_descriptors, retain_uids
        The E.3 options of those names.
    safe_private
        Private attributes to keep, as ``"PRIVATE CREATOR:gggg,xxee"`` (the element's low byte ``ee``; E.3.10).
    exclude_burned_in
        Leave out instances with ``BurnedInAnnotation = YES``.
    exclude_sop_classes
        Leave out instances of these SOP classes (default: :data:`PHI_IN_CONTENT_SOP_CLASSES`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_env: str = DEFAULT_KEY_ENV
    key_file: Path | None = None
    retain_modified_dates: bool = True
    retain_patient_characteristics: bool = True
    retain_device_identity: bool = True
    clean_descriptors: bool = True
    retain_uids: bool = False
    safe_private: list[str] = []
    exclude_burned_in: bool = True
    exclude_sop_classes: list[str] = Field(default_factory=lambda: list(PHI_IN_CONTENT_SOP_CLASSES))

    @field_validator("safe_private")
    @classmethod
    def _private_names(cls, value: list[str]) -> list[str]:
        for item in value:
            creator, _, tag = item.rpartition(":")
            group, _, element = tag.partition(",")
            if not creator or len(group) != 4 or len(element) != 4:
                raise ValueError(f"{item!r}: write a safe private attribute as 'PRIVATE CREATOR:gggg,xxee'")
            int(group, 16), int(element, 16)
        return value

    def read_key(self, where: str = "[deid]") -> bytes:
        """The key, from the file or the variable the profile names.

        Raises
        ------
        MissingCredentialError
            Unset, unreadable or empty; the one-line message names the variable or file, never a value.
        ConfigurationError
            Shorter than :data:`MIN_KEY_LENGTH` characters.
        """
        if self.key_file is not None:
            value = read_secret(file=self.key_file, what=f"{where} de-identification key")
        else:
            value = read_secret(env=self.key_env, what=f"{where} de-identification key")
        if len(value) < MIN_KEY_LENGTH:
            raise ConfigurationError(f"{where} de-identification key: at least {MIN_KEY_LENGTH} characters, please")
        return value.encode()

    def exclusion(self, sop_class_uid: str | None, burned_in: str | None) -> str | None:
        """Why an instance of this SOP class (with this BurnedInAnnotation value) is left out, or None."""
        if self.exclude_burned_in and (burned_in or "").strip().upper() == "YES":
            return "deid: BurnedInAnnotation YES"
        if sop_class_uid and sop_class_uid in self.exclude_sop_classes:
            reason = PHI_IN_CONTENT_SOP_CLASSES.get(sop_class_uid, "SOP class excluded by the profile")
            return f"deid: {reason}"
        return None


BUILT_IN = {"basic": DeidProfile()}
"""Profiles that exist without configuration: ``basic`` needs nothing but its key."""

__all__ = ["BUILT_IN", "DEFAULT_KEY_ENV", "DeidProfile", "MissingCredentialError", "PHI_IN_CONTENT_SOP_CLASSES"]
