"""What C-GET and C-MOVE share: planning the retrieve requests, and judging each one's outcome.

A retrieve request (PS3.4 C.4.2.1.4, C.4.3.1.3) names a study, a series, or a list of instances of one series. The
final response says how many sub-operations completed, failed or ended with a warning; those counts and the UIDs that
actually arrived decide whether the request delivered everything. The rules, most specific first:

1. a failure status with nothing delivered: a C-FIND asks the PACS what it holds. Instances it does not hold are
   not found (and the others are retrieved once more without them, since Orthanc fails a whole list for one absent
   UID); if it holds everything, the status's own error stands (for C-MOVE, 0xA801 or Orthanc's 0xC000 is a
   configuration error naming the destination);
2. any other failure status: its mapped error, after delivering what arrived;
3. failed sub-operations with instances missing: the downloader's own error (C-GET: request rejected; C-MOVE:
   transient);
4. the PACS counts as sent more than arrived: payload invalid (the PACS says it sent them; they did not come here);
5. instances neither sent nor failed: not found.

Not-found outcomes are collected and raised once at the end (:class:`Shortfall`), so one absent instance does not
stop the rest of the download; every other error stops it at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import ClassVar

from pydicom import Dataset

from trolley_tasks.core import (
    DICOMObject,
    DICOMObjectReference,
    Downloadable,
    Instance,
    InstanceReference,
    Series,
    SeriesReference,
    Study,
    StudyReference,
)
from trolley_tasks.downloaders.base import RawPayload
from trolley_tasks.downloaders.shortfall import Shortfall
from trolley_tasks.errors import NotFoundError, PayloadInvalidError, TrolleyError
from trolley_tasks.transports.dimse import AssociationManager, error_for_status

MAX_UIDS_PER_REQUEST = 500
"""A list of UIDs longer than this is split: 500 UIDs make a 32 KB identifier, which every PACS we know accepts."""

_LEVEL_KEYS = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


@dataclass(frozen=True)
class RetrieveRequest:
    """One C-GET or C-MOVE request: a study, a series, or some instances of one series."""

    level: str
    study_uid: str
    series_uid: str | None = None
    instance_uids: tuple[str, ...] = ()

    @property
    def reference(self) -> DICOMObjectReference:
        if self.level == "STUDY" or self.series_uid is None:
            return StudyReference(self.study_uid)
        if self.level == "IMAGE" and len(self.instance_uids) == 1:
            return InstanceReference(self.study_uid, self.series_uid, self.instance_uids[0])
        return SeriesReference(self.study_uid, self.series_uid)

    def expected(self) -> frozenset[str] | None:
        """The SOPInstanceUIDs asked for, or None when the request asks for a whole series or study."""
        return frozenset(self.instance_uids) if self.level == "IMAGE" else None

    def only(self, uids: Iterable[str]) -> RetrieveRequest:
        keep = set(uids)
        return replace(self, instance_uids=tuple(uid for uid in self.instance_uids if uid in keep))

    def identifier(self) -> Dataset:
        """The retrieve identifier: the unique keys down to the level (PS3.4 C.4.2.2.1)."""
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        ds.StudyInstanceUID = self.study_uid
        if self.level in ("SERIES", "IMAGE"):
            ds.SeriesInstanceUID = self.series_uid
        if self.level == "IMAGE":
            ds.SOPInstanceUID = list(self.instance_uids) if len(self.instance_uids) > 1 else self.instance_uids[0]
        return ds

    def probe(self) -> Dataset:
        """A C-FIND identifier that lists what the PACS holds of this request, at its level."""
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        ds.StudyInstanceUID = self.study_uid
        if self.level in ("SERIES", "IMAGE"):
            ds.SeriesInstanceUID = self.series_uid
        if self.level == "IMAGE":
            ds.SOPInstanceUID = None
        return ds


def plan_requests(objects: Downloadable | Iterable[Downloadable]) -> tuple[list[RetrieveRequest], frozenset[str]]:
    """Retrieve requests for ``objects`` at the deepest level each one is known, and the SOP classes they name.

    A searched object is broken down as far as its search went (a study searched to INSTANCE depth becomes instance
    lists per series, which also carry SOPClassUID). Requests covered by a larger one are dropped, so nothing is
    delivered twice; instance lists keep the order of first appearance and are split at MAX_UIDS_PER_REQUEST.
    """
    items: Iterable[Downloadable] = (objects,) if isinstance(objects, DICOMObject | DICOMObjectReference) else objects
    refs: list[DICOMObjectReference] = []
    sop_classes: set[str] = set()

    def walk(obj: Downloadable) -> None:
        if isinstance(obj, Study | Series) and obj.children():
            for child in obj.children():
                walk(child)
        elif isinstance(obj, DICOMObject):
            if isinstance(obj, Instance) and obj.data.get("SOPClassUID"):
                sop_classes.add(str(obj.data.SOPClassUID))
            refs.append(obj.reference())
        else:
            refs.append(obj)

    for item in items:
        walk(item)
    studies = {r.study_uid for r in refs if isinstance(r, StudyReference)}
    series = {
        (r.study_uid, r.series_uid) for r in refs if isinstance(r, SeriesReference) and r.study_uid not in studies
    }
    requests: list[RetrieveRequest] = []
    by_series: dict[tuple[str, str], list[str]] = {}
    for ref in refs:
        if isinstance(ref, StudyReference):
            request = RetrieveRequest("STUDY", ref.study_uid)
        elif isinstance(ref, SeriesReference):
            if ref.study_uid in studies:
                continue
            request = RetrieveRequest("SERIES", ref.study_uid, ref.series_uid)
        elif isinstance(ref, InstanceReference):
            if ref.study_uid in studies or (ref.study_uid, ref.series_uid) in series:
                continue
            key = (ref.study_uid, ref.series_uid)
            if key not in by_series:
                by_series[key] = []
                requests.append(RetrieveRequest("IMAGE", *key))
            if ref.instance_uid not in by_series[key]:
                by_series[key].append(ref.instance_uid)
            continue
        else:  # pragma: no cover - the three references are all there is
            raise TypeError(f"cannot retrieve {ref!r}")
        if request not in requests:
            requests.append(request)
    planned: list[RetrieveRequest] = []
    for request in requests:
        if request.level != "IMAGE":
            planned.append(request)
            continue
        uids = by_series[(request.study_uid, str(request.series_uid))]
        for start in range(0, len(uids), MAX_UIDS_PER_REQUEST):
            planned.append(replace(request, instance_uids=tuple(uids[start : start + MAX_UIDS_PER_REQUEST])))
    return planned, frozenset(sop_classes)


class RetrieveLoop:
    """The request loop that CGet and CMove share: send each retrieve request, hand on what arrives, judge the
    outcome (the rules in the module docstring). Subclasses provide ``send``, ``collect`` and
    ``subop_failure_error``."""

    operation: str
    associations: AssociationManager
    source: str | None
    thread_safe: ClassVar[bool] = False  # one association (AssociationManager is not thread-safe)

    def send(self, request: RetrieveRequest) -> Iterator[Dataset]:
        raise NotImplementedError

    def collect(self, request: RetrieveRequest, delivered: set[str]) -> Iterator[tuple[InstanceReference, RawPayload]]:
        raise NotImplementedError

    def subop_failure_error(self, request: RetrieveRequest, failed: int) -> Exception:
        raise NotImplementedError

    def destination(self) -> str | None:
        """The C-MOVE destination, named in configuration errors; None for C-GET."""
        return None

    def run(self, requests: list[RetrieveRequest]) -> Iterator[tuple[InstanceReference, RawPayload]]:
        shortfall = Shortfall(self.source)
        for request in requests:
            yield from self._retrieve(request, shortfall, probe=True)
        shortfall.raise_if_any()

    def _retrieve(
        self, request: RetrieveRequest, shortfall: Shortfall, *, probe: bool
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        expected = request.expected()
        delivered: set[str] = set()
        final: Dataset | None = None
        finished = False
        try:
            for status in self.send(request):
                final = status
                for ref, data in self.collect(request, delivered):
                    if ref.instance_uid not in delivered and (expected is None or ref.instance_uid in expected):
                        delivered.add(ref.instance_uid)
                        yield ref, data
            finished = True
        finally:
            if not finished:  # the consumer stopped or an error struck mid-request: the association is unusable
                self.associations.abort()
        assert final is not None  # request() yields at least the final response or raises
        code = int(final.Status)
        completed, failed, warning = _subop_counts(final)
        error = error_for_status(
            code,
            operation=self.operation,
            source=self.source,
            reference=request.reference,
            destination=self.destination(),
            comment=final.get("ErrorComment"),
        )
        if error is not None:
            if probe and not delivered and (0xC000 <= code <= 0xCFFF or 0xA801 <= code <= 0xA9FF):
                yield from self._sort_out_refusal(request, shortfall, error)
                return
            raise error
        if expected is None:
            if failed:
                raise self.subop_failure_error(request, failed)
            if len(delivered) < completed + warning:
                raise self._undelivered(request, completed + warning, len(delivered))
            if not delivered:
                shortfall.add(
                    NotFoundError(
                        f"{self.operation}: the PACS sent nothing for {request.reference}",
                        source=self.source,
                        reference=request.reference,
                    )
                )
            return
        missing = expected - delivered
        if not missing:
            return
        if failed:
            raise self.subop_failure_error(request, failed)
        if completed + warning >= len(expected):
            raise self._undelivered(request, completed + warning, len(delivered))
        shortfall.missing(self._refs(request, missing), f"{self.operation} did not send them")

    def _sort_out_refusal(
        self, request: RetrieveRequest, shortfall: Shortfall, error: TrolleyError
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """A request refused with nothing sent: not found, or refused for its own reasons? Ask with a C-FIND."""
        key = _LEVEL_KEYS[request.level]
        present = {str(ds.get(key)) for ds in self.associations.find(request.probe(), request.reference)}
        expected = request.expected()
        if expected is None:
            if not present:
                shortfall.add(
                    NotFoundError(
                        f"{request.reference} is not on the PACS", source=self.source, reference=request.reference
                    )
                )
                return
            raise error
        absent = expected - present
        if not absent:
            raise error
        shortfall.missing(self._refs(request, absent), "not on the PACS")
        if expected & present:
            yield from self._retrieve(request.only(expected & present), shortfall, probe=False)

    def _undelivered(self, request: RetrieveRequest, sent: int, arrived: int) -> PayloadInvalidError:
        where = f" at {self.destination()!r}" if self.destination() else ""
        return PayloadInvalidError(
            f"{self.operation}: the PACS reports {sent} instance(s) sent but {arrived} arrived{where}",
            source=self.source,
            reference=request.reference,
        )

    @staticmethod
    def _refs(request: RetrieveRequest, uids: Iterable[str]) -> list[InstanceReference]:
        series_uid = str(request.series_uid)
        return [
            InstanceReference(request.study_uid, series_uid, uid) for uid in request.instance_uids if uid in set(uids)
        ]


def _subop_counts(final: Dataset) -> tuple[int, int, int]:
    """The final response's completed, failed and warning sub-operation counts (PS3.4 C.4.2.1.4.3); absent is 0."""
    names = ("NumberOfCompletedSuboperations", "NumberOfFailedSuboperations", "NumberOfWarningSuboperations")
    completed, failed, warning = (int(final.get(name, 0) or 0) for name in names)
    return completed, failed, warning
