"""The de-identified header's writer (``trolley_tasks.deid.encode``) gives the bytes pydicom's ``save_as`` gives,
for every kind of instance of the research cohort, in explicit and implicit VR."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

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


def test_a_header_rewritten_from_the_memo_is_the_header_a_fresh_rewrite_gives() -> None:
    """The memo keeps each rewritten element under its original bytes and the patient's: a deidentifier that has
    seen the whole cohort (and rewrites most elements from its memo) writes every instance byte for byte as one that
    sees that instance first. Two patients with two studies each: a memo that mixed patients would shift a date or
    name a patient wrongly. Nothing is excluded, so that the structured report's nested sequences are rewritten too."""
    profile = BUILT_IN["basic"].model_copy(update={"exclude_burned_in": False, "exclude_sop_classes": []})
    warm = Deidentifier(profile, b"a key for the encoder test, long enough")
    cohort = ResearchCohort(studies=4, series=1, instances=3, seed=42)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        files = []
        for item in cohort:
            original = cohort.dataset(item)
            original.file_meta.TransferSyntaxUID = syntax
            buffer = io.BytesIO()
            original.save_as(buffer, enforce_file_format=True)
            files.append(buffer.getvalue())
        for data in files * 2:
            cold = Deidentifier(profile, b"a key for the encoder test, long enough")
            assert b"".join(warm.stream(data)) == b"".join(cold.stream(data))
    assert len({patient.patient_id for patient in warm._patients.values()}) == 2
    assert sum(len(memo) for memo in warm._memos.values()) > 20
