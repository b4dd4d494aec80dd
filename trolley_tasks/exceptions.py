"""dicomtrolley's ``exceptions`` module under our package: the base error and those a script catches.

Every error is in :mod:`trolley_tasks.errors`, grouped by what a worker does with it.
"""

from trolley_tasks.errors import (
    DICOMTrolleyError,
    NoReferencesFoundError,
    StudyNotFoundError,
    UnSupportedParameterError,
)

NoQueryResultsError = StudyNotFoundError
"""dicomtrolley's name for "the search found nothing"."""

__all__ = [
    "DICOMTrolleyError",
    "NoQueryResultsError",
    "NoReferencesFoundError",
    "UnSupportedParameterError",
]
