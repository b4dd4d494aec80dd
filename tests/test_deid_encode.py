"""The de-identified header's writer (``trolley_tasks.deid.encode``) gives the bytes pydicom's ``save_as`` gives,
for every kind of instance of the research cohort, in explicit and implicit VR."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from testbed.cohort import ResearchCohort
from trolley_tasks.deid import BUILT_IN, Deidentifier
from trolley_tasks.deid.encode import encode

COHORT = ResearchCohort(studies=2, series=1, instances=2, seed=41)
DEID = Deidentifier(BUILT_IN["basic"], b"a key for the encoder test, long enough")


def _header(data: bytes) -> pydicom.FileDataset:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    DEID.dataset(ds)
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_encode_gives_the_bytes_save_as_gives(syntax: str) -> None:
    kinds = set()
    for item in COHORT:
        original = COHORT.dataset(item)
        original.file_meta.TransferSyntaxUID = syntax
        buffer = io.BytesIO()
        original.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        expected = io.BytesIO()
        _header(data).save_as(expected, enforce_file_format=True)
        assert encode(_header(data)) == expected.getvalue(), item.kind
        kinds.add(item.kind)
    assert kinds == {"axial", "scout", "short", "sr", "burned"}


def _undefined_lengths(ds: pydicom.Dataset) -> None:
    """Every sequence and item of ``ds`` written with an undefined length, as many modalities write them."""
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True


def test_the_header_rewritten_from_the_walk_is_the_header_pydicom_rewrites() -> None:
    """:meth:`Deidentifier.stream` rewrites a header from the walk's spans, with a memo of rewritten elements; a
    header it cannot take that way (here: the structured report, which has no pixel data) is read, rewritten and
    written by pydicom. Both give the same bytes, for every kind of image, with a nested UID to replace, in explicit
    and implicit VR, with sequences of defined and undefined length, whether the memo is cold (a new deidentifier
    per file) or warm (one that has seen every file), in the default character set and in UTF-8. Two patients with
    two studies each: a memo that mixed patients would shift a date or name a patient wrongly. Nothing is excluded,
    so that every kind is rewritten."""
    profile = BUILT_IN["basic"].model_copy(update={"exclude_burned_in": False, "exclude_sop_classes": []})
    warm = Deidentifier(profile, b"a key for the encoder test, long enough")
    cohort = ResearchCohort(studies=4, series=1, instances=3, seed=42)
    files = []
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        for undefined in (False, True):
            for item in cohort:
                original = cohort.dataset(item)
                original.file_meta.TransferSyntaxUID = syntax
                reference = pydicom.Dataset()  # a nested UID to replace, in every image
                reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = CTImageStorage, item.series_uid
                original.ReferencedImageSequence = [reference]
                if undefined:  # and a character set other than the default, with a descriptor that needs it
                    _undefined_lengths(original)
                    original.SpecificCharacterSet = "ISO_IR 192"
                    original.StudyDescription = f"ÉTUDE THORAX {original.PatientName}"
                buffer = io.BytesIO()
                original.save_as(buffer, enforce_file_format=True)
                files.append(buffer.getvalue())
    assert any(b"\xfe\xff\xdd\xe0" in data for data in files)  # a sequence delimiter: undefined lengths were written
    for data in files * 2:
        cold = Deidentifier(profile, b"a key for the encoder test, long enough")
        header, start = cold._from_pydicom(data, None)
        by_pydicom = header + data[start:]
        assert b"".join(warm.stream(data)) == by_pydicom
        assert b"".join(cold.stream([data[i : i + 1000] for i in range(0, len(data), 1000)])) == by_pydicom
    assert len({patient.patient_id for patient in warm._patients.values()}) == 2
    assert sum(len(memo) for memo in warm._memos.values()) > 20
