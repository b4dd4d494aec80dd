"""DICOM JSON (PS3.18 Annex F.2) to pydicom Datasets, for QIDO-RS answers and WADO-RS metadata.

pydicom's :meth:`~pydicom.dataset.Dataset.from_json` does the decoding. What this module adds:

- **No fetching.** An element given by ``BulkDataURI`` (PS3.18 F.2.5, for example PixelData in WADO-RS metadata)
  is kept with an empty value. A searcher must never start downloading pixel data behind the caller's back, and
  a URI from the server is not something we follow blindly.
- **Errors are the server's.** A body that is not JSON, not a list of objects, or holds an element pydicom cannot
  decode is the server's fault: :class:`~trolley_tasks.errors.PayloadInvalidError`, with the source, never a
  ``ValueError`` that the engine would take for a bug.
"""

from __future__ import annotations

import json
from typing import Any

from pydicom import Dataset

from trolley_tasks.errors import PayloadInvalidError


def _keep_bulk_data_empty(tag: str, vr: str, uri: str) -> None:
    """The bulk data handler: the element stays, without value; the URI is not fetched (see module docstring)."""
    return None


def dataset_from_json(obj: Any, *, source: str | None = None, what: str = "DICOM JSON") -> Dataset:
    """One DICOM JSON object (``{"0020000D": {"vr": "UI", "Value": [...]}, ...}``) as a Dataset.

    Raises
    ------
    PayloadInvalidError
        If ``obj`` is not a JSON object or an element cannot be decoded.
    """
    if not isinstance(obj, dict):
        raise PayloadInvalidError(
            f"{what}: expected a JSON object per DICOM object, got {type(obj).__name__}", source=source
        )
    try:
        return Dataset.from_json(obj, bulk_data_uri_handler=_keep_bulk_data_empty)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PayloadInvalidError(f"{what}: an element could not be decoded: {exc}", source=source) from exc


def datasets_from_json(body: bytes, *, source: str | None = None, what: str = "DICOM JSON") -> list[Dataset]:
    """A DICOM JSON body (a JSON array of objects, PS3.18 F.2.1) as Datasets, in the server's order.

    An empty body counts as an empty array: some servers answer "no match" with 200 and nothing, next to the
    standard 204 (PS3.18 8.3.4.4) and ``[]``.

    Raises
    ------
    PayloadInvalidError
        If the body is not UTF-8 JSON, not an array, or holds an undecodable object.
    """
    if not body.strip():
        return []
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadInvalidError(f"{what}: the answer is not JSON ({exc})", source=source) from exc
    if not isinstance(parsed, list):
        raise PayloadInvalidError(
            f"{what}: expected a JSON array of DICOM objects, got {type(parsed).__name__}", source=source
        )
    return [dataset_from_json(item, source=source, what=what) for item in parsed]
