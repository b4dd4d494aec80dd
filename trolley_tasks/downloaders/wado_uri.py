"""WADO-URI (PS3.18 chapter 9): one HTTP GET per instance.

``GET {url}?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..&contentType=application/dicom`` returns the
instance as stored. The query string is written by hand rather than from a ``params`` dict: requests would send
``contentType=application%2Fdicom``, which Orthanc answers with 400 (ORTHANC.md). UIDs are digits and dots (validated
by the references), so nothing else in the query needs escaping.

Each answer is streamed: the engine gets ``(InstanceReference, chunk iterator)`` and writes the chunks as they come,
so a 500 MB enhanced multi-frame instance never sits in memory. The first bytes are parsed (file meta and dataset up
to SeriesInstanceUID, :func:`~trolley_tasks.formats.part10.read_header`) to make sure the server sent the instance asked
for; that header travels with the chunks to storage (:class:`~trolley_tasks.formats.part10.Part10Stream`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Unpack

from trolley_tasks.core import Downloadable, InstanceReference
from trolley_tasks.downloaders.base import AS_STORED, DownloaderBase, RawPayload, checked_transfer_syntax
from trolley_tasks.downloaders.shortfall import Shortfall, instance_refs_or_raise
from trolley_tasks.errors import NotFoundError, PayloadInvalidError
from trolley_tasks.formats.part10 import check_identity, read_header
from trolley_tasks.transports import http


class WadoURI(http.HTTPEndpoint, DownloaderBase):
    """A WADO-URI endpoint, for example Orthanc's ``http://host:8042/wado``.

    Parameters
    ----------
    session, source, timeout
        As for every HTTP client (:class:`~trolley_tasks.transports.http.HTTPEndpoint`).
    url
        The WADO-URI endpoint, without query string.
    transfer_syntax
        ``"*"`` (the default: no ``transferSyntax`` parameter, and Orthanc and most archives send the file as stored)
        or a transfer syntax UID, sent as the ``transferSyntax`` query parameter (PS3.18 chapter 9); a file that
        comes back in another syntax is an invalid payload.
    """

    def __init__(
        self,
        session: http.SessionOrFactory,
        url: str,
        *,
        transfer_syntax: str = AS_STORED,
        **endpoint: Unpack[http.EndpointOptions],
    ) -> None:
        super().__init__(session, url, **endpoint)
        self.transfer_syntax = checked_transfer_syntax(transfer_syntax, "WADO-URI")

    def __repr__(self) -> str:
        return f"WadoURI(url={http.redact_url(self.url)!r}, transfer_syntax={self.transfer_syntax!r})"

    def instance_url(self, reference: InstanceReference) -> str:
        """The request URL for one instance, with ``contentType=application/dicom`` left unescaped."""
        separator = "&" if "?" in self.url else "?"
        return (
            f"{self.url}{separator}requestType=WADO&studyUID={reference.study_uid}"
            f"&seriesUID={reference.series_uid}&objectUID={reference.instance_uid}&contentType=application/dicom"
            + (f"&transferSyntax={self.transfer_syntax}" if self.transfer_syntax != AS_STORED else "")
        )

    def iter_raw(
        self, objects: Downloadable | Iterable[Downloadable]
    ) -> Iterator[tuple[InstanceReference, RawPayload]]:
        """Stream each instance. Raises NonInstanceParameterError now (before any request) for studies or series
        without instance information; a missing instance is raised after the others were delivered."""
        references = instance_refs_or_raise(objects, source=self.source, what="WADO-URI")
        return self._fetch(references)

    def _fetch(self, references: list[InstanceReference]) -> Iterator[tuple[InstanceReference, RawPayload]]:
        shortfall = Shortfall(self.source)
        for reference in references:
            try:
                response = http.request(
                    self.session,
                    "GET",
                    self.instance_url(reference),
                    source=self.source,
                    reference=reference,
                    stream=True,
                    timeout=self.timeout,
                )
            except NotFoundError as exc:
                shortfall.add(exc)
                continue
            try:
                body = http.bounded(
                    http.iter_body(response, source=self.source, reference=reference),
                    self.max_instance_bytes,
                    what=f"instance {reference.instance_uid}",
                    source=self.source,
                    reference=reference,
                )
                payload = read_header(body, source=self.source, reference=reference)
                header = payload.header
                assert header is not None  # read_header sets it
                check_identity(header, reference, source=self.source)
                if self.transfer_syntax not in (AS_STORED, header.transfer_syntax_uid):
                    raise PayloadInvalidError(
                        f"asked for transfer syntax {self.transfer_syntax}, the file meta TransferSyntaxUID is "
                        f"{header.transfer_syntax_uid}",
                        source=self.source,
                        reference=reference,
                    )
                yield reference, payload
            finally:
                response.close()
        shortfall.raise_if_any()
