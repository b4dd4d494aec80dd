"""The fast Part 10 walk against pydicom-written files: every transfer syntax it covers, nested sequences of
undefined length, encapsulated pixel data, and every truncation point."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from trolley_tasks.formats import part10_scan
from trolley_tasks.formats.part10_scan import NotDicom, Truncated, Unsupported, scan

SOP, STUDY, SERIES, ROWS = 0x00080018, 0x0020000D, 0x0020000E, 0x00280010


def encode(syntax: UID, *, encapsulated: bool = False, undefined_sequences: bool = False) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.4.5")
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.PatientName = "DOE^JANE"
    item = Dataset()
    item.CodeValue = "123"
    inner = Dataset()
    inner.CodeMeaning = "nested"
    item.ConceptNameCodeSequence = Sequence([inner])
    ds.ProcedureCodeSequence = Sequence([item, item])
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 4, 4, 8, 1
    if encapsulated:
        ds.PixelData = encapsulate([b"\xff\xd8frame-one\xff\xd9", b"\xff\xd8frame-two\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.NumberOfFrames = 2
    else:
        ds.PixelData = bytes(16)
    if undefined_sequences:
        for element in (ds["ProcedureCodeSequence"], item["ConceptNameCodeSequence"]):
            element.is_undefined_length = True
        for seq_item in ds.ProcedureCodeSequence:
            seq_item.is_undefined_length_sequence_item = True
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


CASES = [
    pytest.param(ExplicitVRLittleEndian, False, False, id="explicit"),
    pytest.param(ExplicitVRLittleEndian, False, True, id="explicit-undefined-sequences"),
    pytest.param(ImplicitVRLittleEndian, False, False, id="implicit"),
    pytest.param(ImplicitVRLittleEndian, False, True, id="implicit-undefined-sequences"),
    pytest.param(JPEGBaseline8Bit, True, True, id="encapsulated"),
]


@pytest.mark.parametrize(("syntax", "encapsulated", "undefined"), CASES)
def test_whole_files_are_walked_to_their_end(syntax: UID, encapsulated: bool, undefined: bool) -> None:
    data = encode(syntax, encapsulated=encapsulated, undefined_sequences=undefined)
    found = scan(data, frozenset({SOP, STUDY, SERIES, ROWS}))
    assert found.complete and found.end == len(data) and found.pixel_data
    assert found.transfer_syntax == syntax and found.implicit == (syntax == ImplicitVRLittleEndian)
    assert (found.text(SOP), found.text(STUDY), found.text(SERIES)) == ("1.2.3.4.5", "1.2.3", "1.2.3.4")
    assert found.values[ROWS][1] == b"\x04\x00"


@pytest.mark.parametrize(("syntax", "encapsulated", "undefined"), CASES)
def test_every_cut_is_truncated_never_complete(syntax: UID, encapsulated: bool, undefined: bool) -> None:
    data = encode(syntax, encapsulated=encapsulated, undefined_sequences=undefined)
    whole = scan(data)
    for cut in range(len(data) - 1, 0, -1):
        try:
            found = scan(data[:cut])
        except (Truncated, NotDicom):
            continue
        # a cut exactly between two top-level elements parses: then it must not claim the last element
        assert found.end == cut < whole.end
        assert not found.pixel_data  # pixel data is last: a file cut before its end lacks it (storage refuses it)


def test_stop_reads_only_up_to_the_tag_asked() -> None:
    data = encode(ExplicitVRLittleEndian)
    found = scan(data[:600], frozenset({SOP, SERIES}), stop=SERIES)
    assert not found.complete and found.text(SERIES) == "1.2.3.4" and found.text(SOP) == "1.2.3.4.5"


def test_not_dicom_and_unsupported_syntaxes() -> None:
    with pytest.raises(NotDicom, match="DICM"):
        scan(b"<html>" + b" " * 200)
    with pytest.raises(Truncated):
        scan(b"short")
    for syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        with pytest.raises(Unsupported):
            scan(encode(syntax))
    broken = bytearray(encode(ExplicitVRLittleEndian))
    at = broken.index(b"PN")  # the VR of PatientName
    broken[at : at + 2] = b"\x00\x01"
    with pytest.raises(NotDicom, match="no VR"):
        scan(bytes(broken))
    assert part10_scan.PREAMBLE_AND_MAGIC == 132


def walk(data: bytes, piece: int) -> part10_scan.Scan:
    walker = part10_scan.Walker()
    for start in range(0, len(data), piece):
        walker.feed(data[start : start + piece])
    return walker.finish()


@pytest.mark.parametrize(("syntax", "encapsulated", "undefined"), CASES)
@pytest.mark.parametrize("piece", [1, 7, 64, 100_000])
def test_the_streamed_walk_finds_what_scan_finds(syntax: UID, encapsulated: bool, undefined: bool, piece: int) -> None:
    data = encode(syntax, encapsulated=encapsulated, undefined_sequences=undefined)
    found = walk(data, piece)
    assert found.complete and found.end == len(data) and found.pixel_data
    assert (found.text(SOP), found.text(STUDY), found.text(SERIES)) == ("1.2.3.4.5", "1.2.3", "1.2.3.4")
    assert found.values[ROWS][1] == b"\x04\x00" and found.transfer_syntax == syntax


@pytest.mark.parametrize(("syntax", "encapsulated", "undefined"), CASES)
def test_every_cut_of_a_stream_is_truncated_or_lacks_pixels(syntax: UID, encapsulated: bool, undefined: bool) -> None:
    data = encode(syntax, encapsulated=encapsulated, undefined_sequences=undefined)
    for cut in range(len(data) - 1, 0, -1):
        for piece in (cut, 5):
            try:
                found = walk(data[:cut], piece)
            except (Truncated, NotDicom):
                continue
            assert found.end == cut and not found.pixel_data  # the same cut points scan() accepts


def test_the_streamed_walk_reports_not_dicom_and_unsupported_at_the_end() -> None:
    walker = part10_scan.Walker()
    walker.feed(b"<html>" + b" " * 200)  # never raises while bytes pass
    with pytest.raises(NotDicom, match="DICM"):
        walker.finish()
    for syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        with pytest.raises(Unsupported):
            walk(encode(syntax), 50)
    with pytest.raises(Truncated):
        walk(b"short", 2)
