"""Paging through a QIDO-RS search until the answer is complete (PS3.18 8.3.4.4, 8.3.4.5).

Servers cap what one search returns. How they say so differs, so the pager reads every signal there is:

- **a full page**: we asked for ``limit=N`` and got N results, so there may be more;
- **a Warning header** ``299 ...`` saying the result was cut (the standard's "The number of results exceeded the
  maximum supported by the server. Additional results can be requested", dcm4chee's "There are N additional
  results that can be requested"). Other 299 warnings, such as "fuzzymatching is not supported", are not cuts;
- **a known count**: when the caller knows how many objects there are (NumberOfSeriesRelatedInstances from the
  parent's answer), it pages until it has them.

Then it asks for the next page with ``offset``. A server that ignores ``offset`` would send the first page again and
again; a page that repeats UIDs already received raises :class:`~trolley_tasks.errors.PayloadInvalidError` instead
of looping forever or quietly returning a partial answer. So does a Warning that promised more followed by nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import requests
from pydicom import Dataset

from trolley_tasks.errors import PayloadInvalidError
from trolley_tasks.formats.dicom_json import datasets_from_json
from trolley_tasks.searchers.tree import dataset_uid
from trolley_tasks.transports.http import DEFAULT_MAX_ANSWER_BYTES, read_body, redact_url, request, retrying

DICOM_JSON = "application/dicom+json"

_CUT_WORDS = re.compile(r"additional results|more results|exceed|truncat|remaining", re.IGNORECASE)


class IncompleteResultError(PayloadInvalidError):
    """The server's answer is provably incomplete: it promised more and did not deliver, or it returned fewer
    objects than it counts itself. Retrying may help (the study was changing); a result limit in the server's
    configuration that also ignores ``offset`` (Orthanc 1.10's ``LimitFindInstances``) will not."""


def warning_says_truncated(headers: Mapping[str, str]) -> bool:
    """True when a ``Warning`` header (RFC 7234 5.5, code 299) says the result was cut, not merely degraded."""
    value = headers.get("Warning") or ""
    return bool(re.search(r"(^|,)\s*299\b", value)) and bool(_CUT_WORDS.search(value))


def _get_page(
    session: requests.Session,
    url: str,
    *,
    source: str | None,
    timeout: float | tuple[float, float] | None,
    tries: int,
    max_bytes: int,
) -> tuple[list[Dataset], bool, int]:
    """One page, asked again on its own when it fails in a way another try may cure (:func:`retrying`)."""

    def once() -> tuple[list[Dataset], bool, int]:
        response = request(session, "GET", url, source=source, headers={"Accept": DICOM_JSON}, timeout=timeout)
        truncated = warning_says_truncated(response.headers)
        if response.status_code == 204:  # PS3.18 8.3.4.4: no matches
            response.close()
            return [], truncated, 0
        body = read_body(response, limit=max_bytes, source=source)
        what = f"QIDO-RS answer from {redact_url(url)}"
        return datasets_from_json(body, source=source, what=what), truncated, len(body)

    return retrying(once, tries=tries)


def paged_search(
    session: requests.Session,
    url: str,
    query_string: str,
    *,
    key: str,
    limit: int = 0,
    offset: int = 0,
    page_size: int | None = None,
    expected: int | None = None,
    source: str | None = None,
    timeout: float | tuple[float, float] | None = None,
    tries: int = 1,
    max_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
) -> list[Dataset]:
    """Every result of one QIDO-RS search, fetched page by page, each page tried up to ``tries`` times.

    Parameters
    ----------
    url
        The resource, for example ``https://pacs/dicom-web/studies``.
    query_string
        The matching parameters, already encoded; ``limit`` and ``offset`` are added here.
    key
        The UID keyword that identifies a result at this level (SOPInstanceUID for instances), used to spot a
        server that ignores ``offset``.
    limit, offset
        The caller's own slice: at most ``limit`` results (0: all), starting at ``offset``.
    page_size
        Ask for pages of this size (``limit=page_size``); None sends no limit and relies on the server's signals.
    expected
        How many results the server itself counts, if known: keep paging until reached.
    max_bytes
        The most the whole answer, all its pages together, may weigh: the paging guard against a server that
        invents new UIDs for ever (request-rejected once passed).
    """
    results: list[Dataset] = []
    seen: set[str] = set()
    remaining = limit or None
    promised_more = False
    received = 0
    while True:
        ask = page_size
        if remaining is not None:
            ask = min(ask, remaining) if ask else remaining
        paging = [f"limit={ask}"] if ask else []
        if offset:
            paging.append(f"offset={offset}")
        full_query = "&".join(part for part in (query_string, *paging) if part)
        page_url = f"{url}?{full_query}" if full_query else url
        page, truncated, size = _get_page(
            session, page_url, source=source, timeout=timeout, tries=tries, max_bytes=max_bytes - received
        )
        received += size
        if not page:
            if promised_more:
                raise IncompleteResultError(
                    f"the server said its answer from {redact_url(url)} was cut, then sent nothing at offset {offset}",
                    source=source,
                )
            return results
        keys = [dataset_uid(ds, key, source=source) for ds in page]
        repeated = sum(1 for uid in keys if uid in seen)
        if repeated:
            raise PayloadInvalidError(
                f"the page at offset {offset} from {redact_url(url)} repeats {repeated} result(s) already received: "
                "the server seems to ignore 'offset', so the full answer cannot be collected",
                source=source,
            )
        seen.update(keys)
        results.extend(page)
        if remaining is not None:
            remaining -= len(page)
            if remaining <= 0:
                return results
        full = ask is not None and len(page) >= ask
        short_of_count = expected is not None and len(results) < expected
        if not (full or truncated or short_of_count):
            return results
        promised_more = truncated
        offset += len(page)
