"""What the HTTP downloaders share about *what* to fetch and about instances that did not come.

The Downloader contract (:mod:`trolley_tasks.downloaders.base`) says a downloader delivers everything asked, or
raises after delivering what it could. :class:`Shortfall` is how: a "not found" for one request (an HTTP 404, an
instance the server left out of a series answer, an ``XDSMissingDocument``) is noted, the other requests go on, and
one error naming every missing object is raised at the end. Any other error (auth, busy, server failure, a broken
payload) is raised at once: continuing would only hurt the PACS or fail the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from trolley_tasks.core import Downloadable, InstanceReference, to_instance_refs
from trolley_tasks.errors import NonInstanceParameterError, NoReferencesFoundError, NotFoundError

logger = logging.getLogger("trolley.downloaders")


def instance_refs_or_raise(
    objects: Downloadable | Iterable[Downloadable], *, source: str | None, what: str
) -> list[InstanceReference]:
    """Instance references for ``objects``, or NonInstanceParameterError (dicomtrolley's "dance" signal)."""
    try:
        return to_instance_refs(objects)
    except NoReferencesFoundError as exc:
        raise NonInstanceParameterError(
            f"{what} fetches instances only; search {exc.reference} at INSTANCE level first",
            source=source,
            reference=exc.reference,
        ) from exc


class Shortfall:
    """Collects not-found outcomes during a download and raises them together once the rest is delivered."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.errors: list[NotFoundError] = []

    def missing(self, refs: Sequence[InstanceReference], why: str) -> None:
        """The server answered but left these instances out."""
        if not refs:
            return
        shown = ", ".join(ref.instance_uid for ref in refs[:5]) + (" ..." if len(refs) > 5 else "")
        error = NotFoundError(
            f"{len(refs)} instance(s) asked for were not delivered ({why}): {shown}",
            source=self.source,
            reference=refs[0] if len(refs) == 1 else refs[0].series(),
        )
        logger.warning("%s", error)
        self.errors.append(error)

    def add(self, error: NotFoundError) -> None:
        """A whole request came back "not found" (HTTP 404, XDSMissingDocument)."""
        logger.warning("%s", error)
        self.errors.append(error)

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        if len(self.errors) == 1:
            raise self.errors[0]
        first = self.errors[0]
        # Keep the precise class (e.g. XDSMissingDocumentError) when every error is one, so callers can catch it.
        error_type = type(first) if all(isinstance(error, type(first)) for error in self.errors) else NotFoundError
        raise error_type(
            f"{len(self.errors)} requests or instances were not delivered; first: {first.message}",
            source=self.source,
            reference=first.reference,
        ) from first
