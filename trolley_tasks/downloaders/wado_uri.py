"""WADO-URI (PS3.18 chapter 9): one HTTP GET per instance.

``GET {url}?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..&contentType=application/dicom`` returns the
instance as stored. The query string is written by hand rather than from a ``params`` dict: requests would send
``contentType=application%2Fdicom``, which Orthanc answers with 400 (ORTHANC.md). UIDs are digits and dots (validated
by the references), so nothing else in the query needs escaping.

Each answer is streamed: the engine gets ``(InstanceReference, chunk iterator)`` and writes the chunks as they come,
so a 500 MB enhanced multi-frame instance never sits in memory. The first bytes are parsed (file meta and dataset up
to SeriesInstanceUID, :mod:`~trolley_tasks.formats.peek`) to make sure the server sent the instance asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import requests

from trolley_tasks.core import Downloadable, InstanceReference
from trolley_tasks.downloaders.base import DownloaderBase, RawPayload
from trolley_tasks.downloaders.shortfall import Shortfall, instance_refs_or_raise
from trolley_tasks.errors import NotFoundError
from trolley_tasks.formats.part10 import check_identity, read_header
from trolley_tasks.transports import http


class WadoURI(http.HTTPEndpoint, DownloaderBase):
    """A WADO-URI endpoint, for example Orthanc's ``http://host:8042/wado``.

    Parameters
    ----------
    session
        A ``requests.Session``, possibly logged in (see :mod:`trolley_tasks.transports.auth`); reused for keep-alive.
    url
        The WADO-URI endpoint, without query string.
    source
        Name used in errors and logs; defaults to the URL without credentials.
    timeout
        ``(connect, read)`` seconds, or one number for both; defaults to
        :data:`trolley_tasks.transports.http.DEFAULT_TIMEOUT`.
    """

    def __init__(
        self,
        session: requests.Session,
        url: str,
        *,
        source: str | None = None,
        timeout: float | tuple[float, float] | None = None,
    ) -> None:
        super().__init__(session, url, source=source, timeout=timeout)

    def __repr__(self) -> str:
        return f"WadoURI(url={http.redact_url(self.url)!r})"

    def instance_url(self, reference: InstanceReference) -> str:
        """The request URL for one instance, with ``contentType=application/dicom`` left unescaped."""
        separator = "&" if "?" in self.url else "?"
        return (
            f"{self.url}{separator}requestType=WADO&studyUID={reference.study_uid}"
            f"&seriesUID={reference.series_uid}&objectUID={reference.instance_uid}&contentType=application/dicom"
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
                body = http.iter_body(response, source=self.source, reference=reference)
                payload = read_header(body, source=self.source, reference=reference)
                header = payload.header
                assert header is not None  # read_header sets it
                check_identity(header, reference, source=self.source)
                yield reference, payload
            finally:
                response.close()
        shortfall.raise_if_any()

    def close(self) -> None:
        """Close the session's pooled connections."""
        self.session.close()
