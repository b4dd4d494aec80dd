"""WADO-RS (PS3.18 10.4): studies, series and instances as ``multipart/related`` answers.

``GET {url}/studies/{st}[/series/{se}[/instances/{in}]]`` with
``Accept: multipart/related; type="application/dicom"; transfer-syntax=<ts>`` returns one part per instance (PS3.18
8.7.3.5). ``transfer-syntax=*`` asks for the syntax as stored, which Orthanc returns byte-identical to the upload. A
named syntax (for example explicit VR little endian, ``1.2.840.10008.1.2.1``, for an ML pipeline) asks the server to
transcode; each part is then checked to carry it.

The answer is parsed incrementally (:mod:`trolley_tasks.formats.multipart`): memory is one part's headers plus one
chunk,
whatever the series weighs. Each part is identified by the SOPInstanceUID in its first bytes
(:func:`~trolley_tasks.formats.part10.read_header`) and handed on as a Part10Stream, its header with it.

What was asked is checked against what came: parts not asked for (a series request made for some of its
instances) are skipped, and instances asked for and not delivered are raised once the rest was delivered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Unpack

import requests

from trolley_tasks.core import (
    DICOMObject,
    DICOMObjectLevels,
    DICOMObjectReference,
    Downloadable,
    InstanceReference,
    SeriesReference,
    StudyReference,
    group_by_series,
    to_instance_refs,
    to_series_level_refs,
)
from trolley_tasks.downloaders.base import AS_STORED, DownloaderBase, RawPayload, checked_transfer_syntax
from trolley_tasks.downloaders.shortfall import Shortfall
from trolley_tasks.errors import (
    NonSeriesParameterError,
    NoReferencesFoundError,
    NotFoundError,
    PayloadInvalidError,
    RequestRejectedError,
    ServerError,
)
from trolley_tasks.formats.multipart import iter_parts, parse_content_type
from trolley_tasks.formats.part10 import check_identity, read_header
from trolley_tasks.transports import http

logger = logging.getLogger("trolley.downloaders.wado_rs")


@dataclass(frozen=True)
class _Request:
    """One WADO-RS GET: the resource, and the instances expected from it (None: whatever the resource holds)."""

    target: StudyReference | SeriesReference | InstanceReference
    expected: tuple[InstanceReference, ...] | None


class WadoRS(http.HTTPEndpoint, DownloaderBase):
    """A WADO-RS endpoint, for example Orthanc's ``http://host:8042/dicom-web``.

    Parameters
    ----------
    session, source, timeout
        As for every HTTP client (:class:`~trolley_tasks.transports.http.HTTPEndpoint`).
    url
        The DICOMweb root under which ``/studies/...`` lives.
    request_per_series
        True (dicomtrolley's default): one request per series, which keeps each answer to a size the PACS serves
        comfortably. Studies must then come with their series (a searched Study, or SeriesReferences):
        a bare StudyReference raises NonSeriesParameterError so that the caller expands it first. Instances of one
        series are fetched with one series request, and instances not asked for are skipped; a lone instance is
        fetched by its own URL rather than its whole series. False: each object is fetched at its own level (a
        study in one request, each instance in its own request).
    transfer_syntax
        ``"*"`` (as stored, byte-identical) or a transfer syntax UID the server must transcode to.
    """

    def __init__(
        self,
        session: http.SessionOrFactory,
        url: str,
        *,
        request_per_series: bool = True,
        transfer_syntax: str = AS_STORED,
        **endpoint: Unpack[http.EndpointOptions],
    ) -> None:
        super().__init__(session, url, **endpoint)
        self.request_per_series = request_per_series
        self.transfer_syntax = checked_transfer_syntax(transfer_syntax, "WADO-RS")
        self.accept = f'multipart/related; type="application/dicom"; transfer-syntax={transfer_syntax}'

    @property
    def whole_series(self) -> bool:
        """True with ``request_per_series``: a batch of several instances of a series is one request for the whole
        series (PS3.18 10.4.1.1.2), the instances not asked for skipped on the way."""
        return self.request_per_series

    def __repr__(self) -> str:
        return (
            f"WadoRS(url={http.redact_url(self.url)!r}, request_per_series={self.request_per_series}, "
            f"transfer_syntax={self.transfer_syntax!r})"
        )

    # ---------------------------------------------------------------------------------------------------------------
    # What to ask for

    def resource_url(self, reference: StudyReference | SeriesReference | InstanceReference) -> str:
        url = f"{self.url}/studies/{reference.study_uid}"
        if isinstance(reference, SeriesReference | InstanceReference):
            url += f"/series/{reference.series_uid}"
        if isinstance(reference, InstanceReference):
            url += f"/instances/{reference.instance_uid}"
        return url

    def _requests_for(self, objects: Downloadable | Iterable[Downloadable]) -> list[_Request]:
        items: list[Downloadable] = (
            [objects] if isinstance(objects, DICOMObject | DICOMObjectReference) else list(objects)
        )
        planned: list[_Request] = []
        instance_refs: list[InstanceReference] = []
        for item in items:
            if isinstance(item, InstanceReference) or (
                isinstance(item, DICOMObject) and item.max_object_depth() == DICOMObjectLevels.INSTANCE
            ):
                instance_refs.extend(to_instance_refs(item))  # searched down to instances: we know what to expect
            elif not self.request_per_series:
                reference = item.reference() if isinstance(item, DICOMObject) else item
                assert isinstance(reference, StudyReference | SeriesReference)
                planned.append(_Request(reference, None))
            else:
                try:
                    series_refs = to_series_level_refs(item)
                except NoReferencesFoundError as exc:
                    raise NonSeriesParameterError(
                        f"WADO-RS with request_per_series fetches series: search {exc.reference} at SERIES level "
                        "first, or use request_per_series=False",
                        source=self.source,
                        reference=exc.reference,
                    ) from exc
                for series_ref in series_refs:
                    if isinstance(series_ref, SeriesReference):
                        planned.append(_Request(series_ref, None))
        for series, refs in group_by_series(instance_refs).items():
            unique = tuple(dict.fromkeys(refs))
            if self.request_per_series and len(unique) > 1:
                planned.append(_Request(series, unique))
            else:
                planned.extend(_Request(ref, (ref,)) for ref in unique)
        return planned

    # ---------------------------------------------------------------------------------------------------------------
    # Fetching

    def iter_raw(
        self, objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """Stream every instance contained in ``objects``; see the class docstring for the request plan.

        NonSeriesParameterError is raised now, before any request, when ``request_per_series`` is on and a study
        comes without its series.
        """
        return self._fetch(self._requests_for(objects))

    def _fetch(self, planned: list[_Request]) -> Iterator[tuple[InstanceReference, RawPayload]]:
        shortfall = Shortfall(self.source)
        for request in planned:
            try:
                yield from self._fetch_one(request, shortfall)
            except NotFoundError as exc:
                shortfall.add(exc)
        shortfall.raise_if_any()

    def _open(self, request: _Request) -> requests.Response:
        target = request.target
        try:
            response = http.request(
                self.session,
                "GET",
                self.resource_url(target),
                source=self.source,
                reference=target,
                headers={"Accept": self.accept},
                stream=True,
                timeout=self.timeout,
                ok_statuses=(406,),
            )
        except (RequestRejectedError, ServerError) as exc:
            if self.transfer_syntax == AS_STORED:
                raise
            # Orthanc answers 500 when it cannot encode the syntax asked for: say so, keep the error's class.
            raise type(exc)(
                f"{exc.message}; transfer syntax {self.transfer_syntax} was asked for: the server may be unable "
                "to transcode to it",
                source=self.source,
                reference=target,
                retry_after=exc.retry_after,
            ) from exc
        if response.status_code == 406:  # PS3.18 8.7.3.5: none of the acceptable media types can be produced
            response.close()
            raise RequestRejectedError(
                f"HTTP 406 Not Acceptable: the server cannot send {self.accept!r}"
                + (
                    f"; it does not transcode to transfer syntax {self.transfer_syntax}: ask for another syntax "
                    "or '*' (as stored)"
                    if self.transfer_syntax != AS_STORED
                    else ""
                ),
                source=self.source,
                reference=target,
            )
        return response

    def _fetch_one(self, request: _Request, shortfall: Shortfall) -> Iterator[tuple[InstanceReference, RawPayload]]:
        target = request.target
        wanted = set(request.expected) if request.expected is not None else None
        delivered: set[InstanceReference] = set()
        response = self._open(request)
        try:
            body = http.iter_body(response, source=self.source, reference=target)
            for part in iter_parts(body, response.headers.get("Content-Type"), source=self.source, reference=target):
                chunks = http.bounded(
                    part, self.max_instance_bytes, what=f"an instance of {target}", source=self.source, reference=target
                )
                payload = read_header(chunks, source=self.source, reference=target)
                header = payload.header
                assert header is not None  # read_header sets it
                reference = header.reference(target.study_uid, getattr(target, "series_uid", None))
                check_identity(header, self._in_target(reference, target), source=self.source)
                if reference in delivered or (wanted is not None and reference not in wanted):
                    logger.debug("skipping %s: %s", reference, "sent twice" if reference in delivered else "not asked")
                    continue
                self._check_transfer_syntax(part.headers.get("content-type", ""), header.transfer_syntax_uid, reference)
                delivered.add(reference)
                yield reference, payload
        finally:
            response.close()
        if request.expected is not None:
            missing = [ref for ref in request.expected if ref not in delivered]
            shortfall.missing(missing, f"not in the server's answer for {target}")

    @staticmethod
    def _in_target(
        reference: InstanceReference, target: StudyReference | SeriesReference | InstanceReference
    ) -> InstanceReference:
        """What the part must match: the target's UIDs where the target names them."""
        if isinstance(target, InstanceReference):
            return target
        series_uid = target.series_uid if isinstance(target, SeriesReference) else reference.series_uid
        return InstanceReference(target.study_uid, series_uid, reference.instance_uid)

    def _check_transfer_syntax(self, part_type: str, file_syntax: str | None, reference: InstanceReference) -> None:
        """A named syntax must be what the file is (file meta) and, when the part says, what the part declares."""
        if self.transfer_syntax == AS_STORED:
            return
        if file_syntax != self.transfer_syntax:
            raise PayloadInvalidError(
                f"asked for transfer syntax {self.transfer_syntax}, the file meta TransferSyntaxUID is {file_syntax}",
                source=self.source,
                reference=reference,
            )
        declared = parse_content_type(part_type)[1].get("transfer-syntax") if part_type else None
        if declared is not None and declared != self.transfer_syntax:  # the parameter is optional (Orthanc omits it)
            raise PayloadInvalidError(
                f"asked for transfer syntax {self.transfer_syntax}, the part's Content-Type says {declared}",
                source=self.source,
                reference=reference,
            )
