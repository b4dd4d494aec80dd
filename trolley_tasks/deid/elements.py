"""The pieces of a header rewrite that work on one element's bytes or values, and the pixel data's way past it.

Split from :mod:`trolley_tasks.deid.rewrite`, which decides what happens to each element; here is how an element is
read from the walk's spans (undecoded) or copied, shifted or searched for identifying values, and how the
bytes after the header are passed on.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import BaseTag

from trolley_tasks.errors import PayloadInvalidError
from trolley_tasks.formats import part10_scan

PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
DUMMY_BY_VR = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y"}


def pixels(data: bytes, start: int, rest: Iterator[bytes], walker: part10_scan.Walker) -> Iterator[bytes]:
    """The original bytes from ``start`` (the pixel data element) to the end of the pixel data, as they come.

    An element after the pixel data is never written, nor anything after it: a private group that sorts after it
    (7FE1, where some vendors keep their own headers), Digital Signatures (FFFA,FFFA), trailing padding. None of
    them is identifying-free by rule, and none is rewritten here. The stream is still read to its end (so that the
    downloader's connection or arrival file is left as a whole read leaves it) and walked: an original that is not a
    whole file raises PayloadInvalidError once its last byte has passed, as it would have without de-identification
    (cutting at what follows the pixel data must not make a truncated instance look whole).
    """
    spans = walker.spans if walker.spans is not None else []
    checked, position = 0, 0
    chunk: bytes | None = data
    while chunk is not None:
        cut = None
        if walker.error is not None or walker.unsupported is not None:
            cut = walker.size - len(chunk)  # from the start of this chunk on
        for span in spans[checked:]:
            if span.tag > PIXEL_TAGS[-1]:
                cut = span.start if cut is None else min(cut, span.start)
                break
        checked = len(spans)
        begin, end = max(start - position, 0), len(chunk) if cut is None else max(cut - position, 0)
        if begin < end:
            yield chunk[begin:end]
        position += len(chunk)
        if cut is not None:
            for following in rest:  # read to the end, write nothing more
                walker.feed(following)
            break
        chunk = next(rest, None)
        if chunk is not None:
            walker.feed(chunk)
    try:
        walker.finish()
    except (part10_scan.Truncated, part10_scan.NotDicom) as exc:
        raise PayloadInvalidError(f"cannot de-identify: not a whole DICOM file ({exc})") from exc
    except part10_scan.Unsupported:
        pass  # big endian: pydicom read the header; storage checks what was written


def value_of(data: bytes, span: part10_scan.Span) -> bytes:
    """An element's value bytes (an undefined length's items, without their Sequence Delimitation Item)."""
    return data[span.value : span.end - 8 if span.undefined else span.end]


def dataset_of(spans: list[part10_scan.Span], data: bytes, implicit: bool) -> Dataset:
    """A dataset of these elements, undecoded (pydicom decodes each when it is read)."""
    ds = Dataset()
    for span in spans:
        value = value_of(data, span)
        ds[span.tag] = RawDataElement(BaseTag(span.tag), span.vr, len(value), value, 0, implicit, True, True, False)
    return ds


def copied(data: bytes, span: part10_scan.Span) -> bytes:
    """An element kept as it is: its bytes, with the two reserved bytes of an explicit VR long header as zeros (as
    any writer writes them; PS3.5 7.1.2)."""
    if span.value - span.start == 12 and data[span.start + 6 : span.start + 8] != b"\0\0":
        return data[span.start : span.start + 6] + b"\0\0" + data[span.start + 8 : span.end]
    return data[span.start : span.end]


IDENTIFYING = (
    "PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "InstitutionName", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "PatientBirthName",
)  # fmt: skip


PATIENT_TAGS = tuple(
    BaseTag(tag_for_keyword(keyword) or 0) for keyword in ("SpecificCharacterSet", "PatientID", *IDENTIFYING)
)


def dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def vr_of(ds: Dataset, tag: BaseTag) -> str:
    """The VR of an element without decoding it (an implicit VR file's raw element has none: the dictionary's)."""
    vr = ds.get_item(tag).VR
    return str(vr) if vr else dictionary_vr(tag)


def identifying_values(ds: Dataset) -> list[str]:
    """Values a descriptor must not repeat: the patient's names (and each name component), IDs, institution and
    physicians."""
    values: list[str] = []
    for keyword in IDENTIFYING:
        value = ds.get(keyword)
        for one in value if isinstance(value, list) else [value]:
            if one:
                values.append(str(one))
                values.extend(part for part in str(one).replace("^", " ").split() if part)
    return values


def shifted(element: DataElement, shift: timedelta) -> object:
    values = list(element.value) if element.VM > 1 else [element.value]
    moved = [_shift_one(str(v), element.VR, shift) for v in values]
    return moved if element.VM > 1 else moved[0]


def _shift_one(value: str, vr: str, shift: timedelta) -> str:
    """A DA (YYYYMMDD) or the date part of a DT moved back by ``shift``; a value we cannot read becomes the dummy
    date (never left as it was)."""
    stripped = value.strip()
    try:
        day = datetime.strptime(stripped[:8], "%Y%m%d").date()
    except ValueError:
        return DUMMY_BY_VR[vr]
    moved = (day - shift) if day - shift > date(1, 1, 1) else day
    return moved.strftime("%Y%m%d") + (stripped[8:] if vr == "DT" else "")
