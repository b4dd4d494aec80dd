"""De-identification of the generated research cohort, file by file (the library; the engine is not involved):
no original identifier left in the bytes, pixels byte-identical, stable keyed pseudonyms, one date shift per
patient, valid files (pydicom and dciodvfy, compared with the originals)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import tag_for_keyword

from testbed.cohort import INSTITUTION, ResearchCohort
from tests.conftest import service_missing
from trolley_tasks.deid import BUILT_IN, DeidentificationError, Deidentifier, DeidProfile
from trolley_tasks.deid.actions import DESCRIPTORS, DEVICE_IDENTITY, PATIENT_CHARACTERISTICS, Action, action_table
from trolley_tasks.errors import ConfigurationError, MissingCredentialError
from trolley_tasks.storage import StorageDir

COHORT = ResearchCohort(studies=4, series=2, instances=3, seed=31)
KEY = b"a research key of enough length"
IMAGES = [item for item in COHORT if item.kind in ("axial", "scout", "short")]


def chunks(data: bytes, size: int = 4096) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def deidentified(key: bytes = KEY, profile: DeidProfile = BUILT_IN["basic"]) -> dict[str, bytes]:
    deid = Deidentifier(profile, key)
    return {item.sop_instance_uid: b"".join(deid.stream(chunks(COHORT.encode(item)))) for item in IMAGES}


def test_no_original_identifier_survives_in_any_byte() -> None:
    out = deidentified()
    needles = {INSTITUTION, "REFERRER", "TROLLEY^PATIENT", "MRN"}
    for item in COHORT:
        needles |= {item.patient_id, item.accession_number, item.study_date, item.study_uid, item.series_uid}
        needles.add(item.sop_instance_uid)
    for data in out.values():
        found = [needle for needle in needles if needle.encode() in data]
        assert found == []


def test_pixels_are_byte_identical_and_the_file_is_valid() -> None:
    out = deidentified()
    for item in IMAGES:
        original = COHORT.dataset(item)
        ds = pydicom.dcmread(io.BytesIO(out[item.sop_instance_uid]))
        assert ds.PixelData == original.PixelData
        assert ds.SOPInstanceUID.startswith("2.25.") and len(ds.SOPInstanceUID) <= 64
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert ds.SeriesDescription == original.SeriesDescription  # Clean Descriptors keeps "AXIAL 1", "SCOUT"
        assert ds.PatientSex == original.PatientSex  # Retain Patient Characteristics
        assert not [e for e in ds if e.tag.is_private]


def test_relationships_hold_and_each_series_maps_to_one_new_series() -> None:
    out = {uid: pydicom.dcmread(io.BytesIO(data)) for uid, data in deidentified().items()}
    new_series: dict[str, set[str]] = {}
    new_study: dict[str, set[str]] = {}
    for item in IMAGES:
        ds = out[item.sop_instance_uid]
        new_series.setdefault(item.series_uid, set()).add(ds.SeriesInstanceUID)
        new_study.setdefault(item.study_uid, set()).add(ds.StudyInstanceUID)
    assert all(len(v) == 1 for v in new_series.values()) and all(len(v) == 1 for v in new_study.values())
    assert len({next(iter(v)) for v in new_series.values()}) == len(new_series)


def test_one_date_shift_per_patient() -> None:
    out = {uid: pydicom.dcmread(io.BytesIO(data)) for uid, data in deidentified().items()}
    shifts: dict[str, set[int]] = {}
    for item in IMAGES:
        moved = out[item.sop_instance_uid].StudyDate
        days = (pydicom.valuerep.DA(item.study_date) - pydicom.valuerep.DA(moved)).days
        shifts.setdefault(item.patient_id, set()).add(days)
    assert all(len(v) == 1 and next(iter(v)) > 0 for v in shifts.values())
    assert len(shifts) == 2  # two patients, two studies each (longitudinal)


def test_same_key_same_files_other_key_other_pseudonyms() -> None:
    first, again, other = deidentified(), deidentified(), deidentified(b"another key, also long enough")
    assert first == again
    for uid in first:
        a, b = pydicom.dcmread(io.BytesIO(first[uid])), pydicom.dcmread(io.BytesIO(other[uid]))
        assert a.SOPInstanceUID != b.SOPInstanceUID and a.PatientID != b.PatientID
        assert a.PixelData == b.PixelData


def test_burned_in_and_phi_carrying_classes_are_excluded_by_default() -> None:
    profile = BUILT_IN["basic"]
    kinds = {}
    for item in COHORT:
        ds = COHORT.dataset(item)
        kinds[item.kind] = profile.exclusion(str(ds.SOPClassUID), ds.get("BurnedInAnnotation"))
    assert kinds["axial"] is None and kinds["scout"] is None
    assert kinds["burned"] == "deid: BurnedInAnnotation YES"
    assert kinds["sr"] is not None and "structured report" in kinds["sr"]


def test_the_key_is_required_and_never_shown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TROLLEY_DEID_KEY", raising=False)
    with pytest.raises(MissingCredentialError, match="TROLLEY_DEID_KEY is not set"):
        BUILT_IN["basic"].read_key()
    monkeypatch.setenv("TROLLEY_DEID_KEY", "short")
    with pytest.raises(ConfigurationError) as error:
        BUILT_IN["basic"].read_key()
    assert "short" not in str(error.value)
    keyfile = tmp_path / "key"
    keyfile.write_text("a key from a file, long enough\n")
    assert DeidProfile(key_file=keyfile).read_key() == b"a key from a file, long enough"
    assert "long enough" not in repr(Deidentifier(BUILT_IN["basic"], KEY).names)


def test_option_lists_are_dicom_keywords_and_change_the_table() -> None:
    for keyword in (*PATIENT_CHARACTERISTICS, *DEVICE_IDENTITY, *DESCRIPTORS):
        assert tag_for_keyword(keyword) is not None, keyword
    plain = action_table(
        DeidProfile(retain_patient_characteristics=False, retain_device_identity=False, clean_descriptors=False)
    )
    assert plain[tag_for_keyword("PatientSex")] is not Action.KEEP
    assert plain[tag_for_keyword("SeriesDescription")] is Action.REMOVE
    assert action_table(BUILT_IN["basic"])[tag_for_keyword("SeriesDescription")] is Action.CLEAN
    assert len(plain) > 500  # the Basic Profile column of PS3.15 Table E.1-1, read from dicom-anonymizer


def _dciodvfy_errors(path: Path) -> set[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")}


def test_dciodvfy_finds_no_new_error(tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        service_missing("dciodvfy is not installed; apt-get install -y dicom3tools")
    out = deidentified()
    for item in IMAGES[:4]:
        original, cleaned = tmp_path / "original.dcm", tmp_path / "deid.dcm"
        original.write_bytes(COHORT.encode(item))
        cleaned.write_bytes(out[item.sop_instance_uid])
        assert _dciodvfy_errors(cleaned) - _dciodvfy_errors(original) == set()


def test_a_header_that_breaks_the_rewrite_fails_that_instance_only() -> None:
    """Whatever pydicom raises while the profile is applied or the header written becomes a DeidentificationError
    (the engine fails that instance and goes on with its batch), before a byte of it was yielded."""

    class Broken(Deidentifier):
        def _apply(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError("an element pydicom cannot convert")

    stream = Broken(BUILT_IN["basic"], KEY).stream(chunks(COHORT.encode(IMAGES[0])))
    with pytest.raises(DeidentificationError, match="ValueError"):
        next(stream)


def test_nothing_after_the_pixel_data_is_written() -> None:
    """Elements that sort after the pixel data (a private 7FE1 group some vendors keep their headers in, trailing
    padding) never reach the output, whether they arrive with the header or chunks later; the pixels do, whole."""
    item = IMAGES[0]
    ds = COHORT.dataset(item)
    block = ds.private_block(0x7FE1, "VENDOR CSA NON-IMAGE", create=True)
    block.add_new(0x10, "OB", b"TRAILING PHI " * 64)
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 64)  # DataSetTrailingPadding
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    for pieces in ([data], chunks(data, 1000), chunks(data, 64 * 1024)):
        out = b"".join(Deidentifier(BUILT_IN["basic"], KEY).stream(pieces))
        assert b"TRAILING PHI" not in out and b"VENDOR CSA" not in out
        cleaned = pydicom.dcmread(io.BytesIO(out))
        assert cleaned.PixelData == ds.PixelData and max(cleaned.keys()) == 0x7FE00010


def test_a_truncated_original_fails_as_that_instance_and_leaves_no_original_header(tmp_path: Path) -> None:
    """An original cut inside its pixel data: the stream fails with a DeidentificationError (which the engine takes
    for this instance only, as storage's own check would a truncated byte-identical one) once its last byte has
    passed, and what storage keeps in quarantine is the de-identified header and the pixel bytes that came."""
    item = IMAGES[0]
    data = COHORT.encode(item)[:-100]
    with pytest.raises(DeidentificationError, match="not a whole DICOM file"):
        b"".join(Deidentifier(BUILT_IN["basic"], KEY).stream(chunks(data)))
    deid = Deidentifier(BUILT_IN["basic"], KEY)
    with pytest.raises(DeidentificationError):
        StorageDir().save_raw(deid.reference(item.reference()), deid.stream(chunks(data)), tmp_path)
    (kept,) = (tmp_path / ".trolley" / "quarantine").iterdir()
    assert item.patient_id.encode() not in kept.read_bytes() and b"TROLLEY^PATIENT" not in kept.read_bytes()
