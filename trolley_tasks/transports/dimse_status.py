"""DIMSE outcomes to the error tree: association rejections (PS3.8 9.3.4) and final statuses (PS3.4 C.4, PS3.7 C).

pynetdicom names the status categories (:func:`pynetdicom.status.code_to_category`: success, pending, warning,
cancel, failure); which *error class* a failure is -- and so what a worker does with it -- is ours, in
:func:`error_for_status`, most specific code first.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.status import STATUS_CANCEL, STATUS_PENDING, STATUS_SUCCESS, STATUS_WARNING, Status, code_to_category

from trolley_tasks.errors import (
    AuthError,
    ConfigurationError,
    RequestRejectedError,
    RetrievalError,
    ServerBusyError,
    ServerError,
    TransientNetworkError,
    TrolleyError,
)

MOVE_DESTINATION_UNKNOWN = int(Status.MOVE_DESTINATION_UNKNOWN)
_NO_ERROR = frozenset({STATUS_SUCCESS, STATUS_PENDING, STATUS_WARNING})


class DimseCancelledError(TransientNetworkError):
    """The PACS ended a request with status 0xFE00 (cancelled). We never send C-CANCEL, so someone else (an operator,
    a gateway) stopped it; it is worth trying again later."""


def error_for_rejection(result: int, result_source: int, diagnostic: int, *, source: str | None) -> RetrievalError:
    """The error an A-ASSOCIATE-RJ means (PS3.8 section 9.3.4, table 9-21).

    - rejected-permanent by the service user for "calling AE title not recognised" (source 1, reason 3): the PACS
      does not know us, which is an :class:`AuthError` (pause the job until someone registers our AE);
    - rejected-transient for "local limit exceeded" or "temporary congestion" (source 3, reasons 1-2): the PACS has
      too many associations, which is :class:`ServerBusyError` so that the engine lowers its concurrency;
    - any other rejected-transient: :class:`TransientNetworkError`;
    - any other rejected-permanent (unknown called AE, unsupported application context or protocol version):
      :class:`RequestRejectedError`.
    """
    text = f"association rejected (result {result}, source {result_source}, reason {diagnostic})"
    if result == 0x01 and result_source == 0x01 and diagnostic == 0x03:
        return AuthError(f"{text}: the PACS does not recognise our calling AE title", source=source)
    if result == 0x02 and result_source == 0x03 and diagnostic in (0x01, 0x02):
        return ServerBusyError(f"{text}: the PACS is congested or at its association limit", source=source)
    if result == 0x02:
        return TransientNetworkError(f"{text}: transient, try again later", source=source)
    if result == 0x01 and result_source == 0x01 and diagnostic == 0x07:
        return RequestRejectedError(f"{text}: the PACS does not recognise the called AE title", source=source)
    return RequestRejectedError(f"{text}: permanent", source=source)


def error_for_status(
    status: int,
    *,
    operation: str,
    source: str | None,
    reference: Any = None,
    destination: str | None = None,
    comment: str | None = None,
) -> TrolleyError | None:
    """The error a final DIMSE status means, or None for success, pending and warnings (PS3.4 C.4, PS3.7 C).

    Warnings (0x0001, 0x0107, 0x0116, 0xBxxx) return None: for C-GET and C-MOVE the caller compares the sub-operation
    counts with what arrived, which is the only trustworthy measure of a partial answer.

    Orthanc answers 0xC000 to a C-MOVE towards a destination it does not know, where the standard says 0xA801; the
    caller first rules out missing instances (with a C-FIND) and then asks for ``operation="C-MOVE"`` with
    ``destination`` set, which maps 0xC000 to the same :class:`ConfigurationError` as 0xA801.
    """
    category = code_to_category(status)
    if category in _NO_ERROR:
        return None
    text = f"{operation} failed with status 0x{status:04X}"
    if comment:
        text += f" ({comment})"
    kwargs: dict[str, Any] = {"source": source, "reference": reference}
    if category == STATUS_CANCEL:
        return DimseCancelledError(f"{text}: the request was cancelled on the PACS side", **kwargs)
    if 0xA700 <= status <= 0xA7FF or status == 0x0213:
        return ServerBusyError(f"{text}: the PACS is out of resources", **kwargs)
    if operation == "C-MOVE" and destination is not None and (status == MOVE_DESTINATION_UNKNOWN or status == 0xC000):
        return ConfigurationError(
            f"{text}: the PACS does not know or cannot reach the move destination AE {destination!r}; register it on "
            "the PACS with this host's address and receiver port",
            **kwargs,
        )
    if status == 0x0124:
        return AuthError(f"{text}: not authorised", **kwargs)
    if status == 0x0110:
        return ServerError(f"{text}: processing failure on the PACS", **kwargs)
    if 0xA900 <= status <= 0xA9FF:
        return RequestRejectedError(f"{text}: the identifier does not match the SOP class", **kwargs)
    if 0xC000 <= status <= 0xCFFF or status == MOVE_DESTINATION_UNKNOWN or status in (0x0122, 0x0211, 0x0212):
        return RequestRejectedError(f"{text}: the PACS cannot process this request", **kwargs)
    return ServerError(f"{text}: unknown failure status", **kwargs)
