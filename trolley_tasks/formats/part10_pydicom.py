"""Big endian and deflated Part 10 files (PS3.5 A.3, A.5), which the fast walk does not cover: read by pydicom.

They are rare in archives, so they take the slower road: the identity from the first bytes by ``read_partial``,
and the whole-file check from the written file by ``dcmread`` with large values deferred.
"""

from __future__ import annotations

import os
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from trolley_tasks.errors import PayloadInvalidError

DEFER_SIZE = 64 * 1024
"""pydicom reads values larger than this lazily: pixel data never enters memory while checking."""

_SERIES = 0x0020000E
_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_PARSE_ERRORS = (InvalidDicomError, EOFError, ValueError, KeyError, OSError, OverflowError, NotImplementedError)


def _stop_after_series_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _SERIES


def peek_pydicom(data: bytes) -> Dataset | None:
    """The dataset up to SeriesInstanceUID from a stream's first bytes; None when more bytes are needed.

    Raises
    ------
    PayloadInvalidError
        The bytes cannot be read as DICOM.
    """
    try:
        return read_partial(BytesIO(data), stop_when=_stop_after_series_uid)
    except zlib.error:  # deflated syntax (PS3.5 A.5): pydicom inflates all it has, so a partial stream fails here
        return None
    except _PARSE_ERRORS as exc:
        raise PayloadInvalidError(f"not a DICOM Part 10 file ({type(exc).__name__}: {str(exc)[:120]})") from exc


def read_part10_pydicom(path: Path | str) -> Dataset:
    """The header of the whole file at ``path`` (large values deferred), after checking that the file is whole.

    Longer than most functions here because pydicom stops quietly at a short read: every structural check that the
    walk makes as it goes is made here after the fact, in one place.
    """
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fp:
            dataset = pydicom.dcmread(fp, defer_size=DEFER_SIZE, force=False)
            end = fp.tell()
    except (*_PARSE_ERRORS, zlib.error) as exc:
        raise PayloadInvalidError(f"not a DICOM Part 10 file: {exc}") from exc
    meta = getattr(dataset, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise PayloadInvalidError("not a DICOM Part 10 file: no TransferSyntaxUID in the file meta information")
    if not dataset:
        raise PayloadInvalidError("DICOM file holds file meta information but no dataset (truncated)")
    # The last top-level element must end exactly at the end of the file (a value or an element header cut short is
    # a truncated download; PS3.10 files have nothing after their last element). A deflated dataset is parsed from
    # an inflated copy, so its offsets say nothing about the file; zlib's own stream end check stands in for this.
    deflated = meta.TransferSyntaxUID == _DEFLATED
    if deflated:
        end = size
    last = dataset.get_item(max(dataset.keys()))
    value_tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)  # a RawDataElement's; parsed sequences have neither
    if not deflated and value_tell is not None and length is not None and length != 0xFFFFFFFF:
        end = value_tell + length
        if end < size:
            raise PayloadInvalidError(
                f"DICOM file is truncated: {size - end} stray bytes after its last element (a cut element header)"
            )
    if end > size:
        raise PayloadInvalidError(f"DICOM file is truncated: its last element ends at byte {end}, the file has {size}")
    if "Rows" in dataset and not any(tag in dataset for tag in _PIXEL_DATA_TAGS):
        raise PayloadInvalidError("DICOM file is truncated: it describes an image (Rows) but holds no pixel data")
    return dataset
