"""The one error tree of trolley-tasks.

Every error that a searcher, downloader or storage raises is a :class:`TrolleyError`. Errors are grouped by what a
worker should do with them, so the engine's retry policy is one table keyed on :class:`ErrorClass`
(``trolley_tasks.engine.policy``). Lower-level errors (requests, sockets, pynetdicom statuses, pydicom parse errors)
are translated in exactly one place per transport (``trolley_tasks.transports.http`` and
``trolley_tasks.transports.dimse``), with
``raise ... from exc``.

::

    TrolleyError (alias DICOMTrolleyError)               source, reference, retry_after on every error
    |
    +-- ConfigurationError ........... configuration    refuse to start; raised before anything is queued
    |   +-- MissingCredentialError                       a secret's env var or file is absent
    |
    +-- UsageError ................... request-rejected the call itself is wrong; retrying cannot help
    |   +-- InvalidUIDError (ValueError)                 not DICOM UID grammar (PS3.5 9.1)
    |   +-- UnSupportedParameterError                    a query value would be silently lost
    |   +-- NoReferencesFoundError                       an object holds no references of the asked level
    |   +-- NonSeriesParameterError                      a downloader needs series or instance references
    |   |   +-- NonInstanceParameterError                a downloader needs instance references
    |   +-- AmbiguousResultError                         find_study matched more than one study
    |   +-- UnsafePathError                              a storage path would escape the output directory
    |
    +-- RetrievalError                                   talking to the PACS went wrong
        +-- TransientNetworkError .... transient        refused, reset, DNS, DIMSE abort, rejected-transient
        |   +-- PacsTimeoutError ..... timeout          read timeout, ACSE/DIMSE timeout
        +-- ServerBusyError .......... server-busy      HTTP 429/503, DIMSE 0xA7xx; honour retry_after
        +-- ServerError .............. server-error     HTTP 500/502/504
        +-- PayloadInvalidError ...... payload-invalid  truncated multipart, not DICOM, UID mismatch
        +-- NotFoundError ............ not-found        HTTP 404/410, C-GET with nothing completed
        |   +-- StudyNotFoundError                       find_study matched nothing
        +-- AuthError ................ auth             HTTP 401/403, association rejected for our AE
        +-- RequestRejectedError ..... request-rejected HTTP 400/406/415, rejected-permanent, 0xA9xx, 0xC000

A subclass inherits its parent's :class:`ErrorClass` unless it sets its own, so a protocol module may add precise
errors (for example RAD-69's ``XDSMissingDocumentError`` under :class:`NotFoundError`) without touching the policy.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class ErrorClass(StrEnum):
    """What a worker does with an error: the key of the engine's retry table (DESIGN.md, "The error tree")."""

    TRANSIENT = "transient"
    TIMEOUT = "timeout"
    SERVER_BUSY = "server-busy"
    SERVER_ERROR = "server-error"
    PAYLOAD_INVALID = "payload-invalid"
    NOT_FOUND = "not-found"
    AUTH = "auth"
    REQUEST_REJECTED = "request-rejected"
    CONFIGURATION = "configuration"


class TrolleyError(Exception):
    """Base of every error this package raises on purpose.

    Parameters
    ----------
    message
        What went wrong, in one line, for a person.
    source
        The source profile or server the error concerns (a name or a URL without credentials), if known.
    reference
        The study, series or instance reference concerned, if known.
    retry_after
        Seconds the server asked us to wait (HTTP ``Retry-After``), if it said so.
    """

    error_class: ClassVar[ErrorClass] = ErrorClass.REQUEST_REJECTED

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        reference: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.reference = reference
        self.retry_after = retry_after

    def __str__(self) -> str:
        parts = [self.message]
        if self.source:
            parts.append(f"source={self.source}")
        if self.reference is not None:
            parts.append(f"ref={self.reference}")
        if self.retry_after is not None:
            parts.append(f"retry_after={self.retry_after:g}s")
        return " | ".join(parts)


DICOMTrolleyError = TrolleyError
"""dicomtrolley's name for the base error, kept so that its users feel at home."""


class ConfigurationError(TrolleyError):
    """The job cannot start: unknown source, bad URL, missing setting. Raised before anything is queued."""

    error_class = ErrorClass.CONFIGURATION


class MissingCredentialError(ConfigurationError):
    """A secret named in the configuration (an environment variable or a file) is not there."""


class UsageError(TrolleyError):
    """The call is wrong in itself (bad UID, lossy query, unsupported object level). Retrying cannot help."""

    error_class = ErrorClass.REQUEST_REJECTED


class InvalidUIDError(UsageError, ValueError):
    """A value that must be a DICOM UID is not one (PS3.5 section 9.1: digits and dots, at most 64 chars)."""


class UnSupportedParameterError(UsageError):
    """Converting a query to a backend's query type would lose a non-default value."""


class NoReferencesFoundError(UsageError):
    """An object could not be broken down into references of the requested level."""


class NonSeriesParameterError(UsageError):
    """A downloader needs series or instance references; expand the study with a searcher first."""


class NonInstanceParameterError(NonSeriesParameterError):
    """A downloader needs instance references; expand studies and series with a searcher first.

    This is dicomtrolley's "dance": the caller (Trolley, or the engine's expansion) catches it, queries the searcher
    for the instances, and calls the downloader again.
    """


class AmbiguousResultError(UsageError):
    """``find_study`` expected exactly one study and the query matched several."""


class UnsafePathError(UsageError):
    """A storage path built from DICOM values would escape the output directory, or holds a forbidden byte."""


class RetrievalError(TrolleyError):
    """Talking to the PACS went wrong. The subclass says how."""


class TransientNetworkError(RetrievalError):
    """Connection refused or reset, DNS failure, DIMSE abort, association rejected (transient)."""

    error_class = ErrorClass.TRANSIENT


class PacsTimeoutError(TransientNetworkError):
    """The server did not answer in time (HTTP read timeout, ACSE or DIMSE timeout)."""

    error_class = ErrorClass.TIMEOUT


class ServerBusyError(RetrievalError):
    """The server says it is overloaded (HTTP 429/503, DIMSE 0xA7xx). Honour ``retry_after``; ask less of it."""

    error_class = ErrorClass.SERVER_BUSY


class ServerError(RetrievalError):
    """The server failed on its side (HTTP 500, 502, 504)."""

    error_class = ErrorClass.SERVER_ERROR


class PayloadInvalidError(RetrievalError):
    """The answer arrived but is wrong: truncated multipart, not DICOM, SOPInstanceUID mismatch, bad XML/JSON."""

    error_class = ErrorClass.PAYLOAD_INVALID


class NotFoundError(RetrievalError):
    """The server does not have the object (HTTP 404/410, C-GET with zero completed sub-operations)."""

    error_class = ErrorClass.NOT_FOUND


class StudyNotFoundError(NotFoundError):
    """``find_study`` or ``find_study_by_id`` matched no study."""


class AuthError(RetrievalError):
    """The server refuses who we are (HTTP 401/403, association rejected for the calling AE)."""

    error_class = ErrorClass.AUTH


class RequestRejectedError(RetrievalError):
    """The server refuses what we asked (HTTP 400/406/415, rejected-permanent, DIMSE 0xA9xx or 0xC000)."""

    error_class = ErrorClass.REQUEST_REJECTED


def error_class_of(exc: BaseException) -> ErrorClass | None:
    """The :class:`ErrorClass` of an exception, or None when it is not one of ours (a bug, not a PACS failure)."""
    if isinstance(exc, TrolleyError):
        return exc.error_class
    return None
