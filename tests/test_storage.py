"""Storage: layouts, atomic writes (with a SIGKILL mid-write), confinement, identical files, quarantine, file meta."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from testbed.cohort import GeneratedInstance, generate_cohort
from tests.part10_files import add_file_meta, is_part10
from trolley_tasks.core import InstanceReference
from trolley_tasks.errors import (
    ConfigurationError,
    ErrorClass,
    PayloadInvalidError,
    TransientNetworkError,
    UnsafePathError,
    UsageError,
)
from trolley_tasks.formats.part10 import Part10File, read_header, read_part10_header
from trolley_tasks.storage.disk import (
    TEMP_DIR,
    DcmStorageDir,
    DICOMDiskStorage,
    FlatDcmStorageDir,
    QuarantinedPayloadError,
    StorageDir,
    TemplateStorage,
    clean_temp_files,
)
from trolley_tasks.storage.layouts import PathTemplate, path_component

COHORT = generate_cohort(studies=1, series=1, instances=2, seed=11, rows=16, columns=16)
FIRST, SECOND = list(COHORT)
EXAMPLE_TEMPLATE = "{PatientID}/{StudyDate}_{AccessionNumber}/{Modality}_{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


def raw(item: GeneratedInstance = FIRST) -> bytes:
    return COHORT.encode(item)


def files_under(root: Path) -> list[Path]:
    """Every regular file under ``root``, ignoring the work folder (temp files)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and ".trolley" not in p.parts)


def bare_dataset(item: GeneratedInstance, implicit: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, COHORT.dataset(item))
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ layouts


def test_storage_dir_writes_study_series_instance_byte_identical(tmp_path: Path) -> None:
    result = DcmStorageDir().save_raw(FIRST.reference(), raw(), tmp_path)
    expected = tmp_path / FIRST.study_uid / FIRST.series_uid / f"{FIRST.sop_instance_uid}.dcm"
    assert result.path == expected
    assert expected.read_bytes() == raw()
    assert result.size == len(raw()) and not result.already_present and not result.replaced
    assert files_under(tmp_path) == [expected]


def test_streamed_chunks_are_written_in_order(tmp_path: Path) -> None:
    data = raw()
    chunks = iter([data[i : i + 100] for i in range(0, len(data), 100)])
    result = FlatDcmStorageDir(path=tmp_path).save_raw(FIRST.reference(), chunks)
    assert result.path == tmp_path / f"{FIRST.sop_instance_uid}.dcm"
    assert result.path.read_bytes() == data


def test_template_storage_uses_header_values(tmp_path: Path) -> None:
    storage = TemplateStorage(EXAMPLE_TEMPLATE)
    result = storage.save_raw(FIRST.reference(), raw(), tmp_path)
    ds = COHORT.dataset(FIRST)
    expected = (
        tmp_path
        / path_component(ds.PatientID, "PatientID")
        / f"{ds.StudyDate}_{ds.AccessionNumber}"
        / f"CT_{FIRST.series_uid}"
        / f"{FIRST.sop_instance_uid}.dcm"
    )
    assert result.path == expected and expected.read_bytes() == raw()
    assert storage.reference_path(FIRST.reference(), tmp_path) is None  # needs PatientID: only the ledger knows
    assert storage.existing_valid(FIRST.reference(), tmp_path) is None


def test_save_dataset_uses_the_same_layout(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(BytesIO(raw()))
    result = DcmStorageDir().save(dataset, tmp_path)
    assert result.path == tmp_path / FIRST.study_uid / FIRST.series_uid / f"{FIRST.sop_instance_uid}.dcm"
    assert pydicom.dcmread(result.path).SOPInstanceUID == FIRST.sop_instance_uid
    assert DcmStorageDir().save(dataset, tmp_path).already_present


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("{NoSuchKeyword}/{SOPInstanceUID}.dcm", "not a DICOM keyword"),
        ("{PatientID}/{StudyDate}.dcm", "unique per instance"),
        ("{PatientID}{SOPInstanceUID}.dcm", "unique per instance"),  # "1"+"23.4" and "12"+"3.4" would collide
        ("x1{SOPInstanceUID}.dcm", "unique per instance"),
        ("{SOPInstanceUID}_{InstanceNumber}.dcm", "unique per instance"),
        ("/abs/{SOPInstanceUID}.dcm", "relative path"),
        ("../{SOPInstanceUID}.dcm", "'..' component"),
        ("a//{SOPInstanceUID}.dcm", "empty"),
        ("{InstanceNumber:05d}/{SOPInstanceUID}.dcm", "format specs"),
        ("{ReferencedSeriesSequence}/{SOPInstanceUID}.dcm", "VR SQ"),
        ("{PixelData}/{SOPInstanceUID}.dcm", "VR O"),
        ("a*b/{SOPInstanceUID}.dcm", "outside"),
        ("a\\b/{SOPInstanceUID}.dcm", "relative path"),
    ],
)
def test_bad_templates_are_refused_at_construction(template: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=why):
        TemplateStorage(template)


def test_good_templates_are_accepted() -> None:
    assert PathTemplate("{PatientID}_{SOPInstanceUID}.dcm").needs_dataset
    assert not PathTemplate("{StudyInstanceUID}/{SOPInstanceUID}").needs_dataset
    assert PathTemplate("{TransferSyntaxUID}/{SOPInstanceUID}.dcm").keywords == {"TransferSyntaxUID", "SOPInstanceUID"}


def test_path_component_sanitizes_and_refuses_escapes() -> None:
    assert path_component("Doe^John=Ω", "PatientName") == "Doe^John__"
    assert path_component("", "AccessionNumber") == "UNKNOWN"
    assert path_component(None, "AccessionNumber") == "UNKNOWN"
    assert path_component(".hidden", "PatientID") == "_hidden"
    assert path_component("...", "PatientID") == "_.."  # no hidden names
    assert path_component(["ORIGINAL", "PRIMARY"], "ImageType") == "ORIGINAL-PRIMARY"
    assert len(path_component("x" * 500, "StudyDescription")) == 64
    for hostile in ("../../etc", "/abs", "a\x00b", "..", ".", "a\\..\\b"):
        with pytest.raises(UnsafePathError):
            path_component(hostile, "PatientID")
    with pytest.raises(UnsafePathError, match="not a DICOM UID"):
        path_component("1.2.x", "FrameOfReferenceUID", is_uid=True)


# -------------------------------------------------------------------------------------------------- confinement


@pytest.mark.parametrize("hostile", ["../../etc", "/abs", "a\x00b", ".."])
def test_hostile_template_values_write_nothing(tmp_path: Path, hostile: str) -> None:
    ds = COHORT.dataset(FIRST)
    ds.PatientID = hostile
    data = BytesIO()
    ds.save_as(data, enforce_file_format=True)
    storage = TemplateStorage("{PatientID}/{SOPInstanceUID}.dcm")
    with pytest.raises(UnsafePathError) as raised:
        storage.save_raw(FIRST.reference(), data.getvalue(), tmp_path)
    assert raised.value.error_class is ErrorClass.REQUEST_REJECTED
    assert files_under(tmp_path) == [] and list((tmp_path / TEMP_DIR).iterdir()) == []
    with pytest.raises(UnsafePathError):
        storage.save(ds, tmp_path)
    assert files_under(tmp_path) == []


def test_hostile_uid_in_dataset_writes_nothing(tmp_path: Path) -> None:
    ds = COHORT.dataset(FIRST)
    ds.SOPInstanceUID = "../../../etc/passwd"
    with pytest.raises(UnsafePathError):
        DcmStorageDir().save(ds, tmp_path)
    ds.SOPInstanceUID = FIRST.sop_instance_uid
    ds.FrameOfReferenceUID = "1.2/../../x"
    with pytest.raises(UnsafePathError):
        TemplateStorage("{FrameOfReferenceUID}/{SOPInstanceUID}.dcm").save(ds, tmp_path)
    assert files_under(tmp_path) == []


def test_symlink_out_of_the_output_directory_is_refused(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / FIRST.study_uid).symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="outside the output directory"):
        DcmStorageDir().save_raw(FIRST.reference(), raw(), out)
    assert list(elsewhere.iterdir()) == []


# ------------------------------------------------------------------------------------------- identical files


def test_identical_file_is_not_rewritten(tmp_path: Path) -> None:
    storage = DcmStorageDir()
    first = storage.save_raw(FIRST.reference(), raw(), tmp_path)
    os.utime(first.path, ns=(1_000_000_000, 1_000_000_000))
    before = first.path.stat()
    again = storage.save_raw(FIRST.reference(), iter([raw()]), tmp_path)
    after = first.path.stat()
    assert again.already_present and not again.replaced and again.size == first.size
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert list((tmp_path / TEMP_DIR).iterdir()) == []


def test_different_content_replaces_atomically_and_says_so(tmp_path: Path) -> None:
    storage = DcmStorageDir()
    first = storage.save_raw(FIRST.reference(), raw(), tmp_path)
    other = add_file_meta(bare_dataset(FIRST, implicit=True), "1.2.840.10008.1.2")  # same instance, other syntax
    second = storage.save_raw(FIRST.reference(), other, tmp_path)
    assert second.replaced and not second.already_present and second.path == first.path
    assert first.path.read_bytes() == other


def test_existing_valid_finds_only_whole_files(tmp_path: Path) -> None:
    storage = DcmStorageDir()
    assert storage.existing_valid(FIRST.reference(), tmp_path) is None
    saved = storage.save_raw(FIRST.reference(), raw(), tmp_path)
    found = storage.existing_valid(FIRST.reference(), tmp_path)
    assert found is not None and found.already_present and found.path == saved.path and found.size == saved.size
    saved.path.write_bytes(raw()[:-50])  # damaged behind our back
    assert storage.existing_valid(FIRST.reference(), tmp_path) is None
    assert storage.reference_path(SECOND.reference(), tmp_path) == saved.path.parent / f"{SECOND.sop_instance_uid}.dcm"


def test_existing_valid_many_looks_into_a_series_only_where_its_folder_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine asks for a batch at once: a layout whose folder for the series is not there costs one lstat for
    the series, not one for each instance."""
    other = generate_cohort(studies=1, series=1, instances=40, seed=12, rows=16, columns=16)
    dicomtrolleys = StorageDir().save_raw(SECOND.reference(), raw(SECOND), tmp_path).path  # the other layout
    ours = DcmStorageDir().save_raw(FIRST.reference(), raw(), tmp_path).path
    looked: list[str] = []
    lexists = os.path.lexists
    monkeypatch.setattr(os.path, "lexists", lambda path: looked.append(str(path)) or lexists(path))
    wanted = [FIRST.reference(), SECOND.reference(), *(item.reference() for item in other)]
    found = DcmStorageDir().existing_valid_many(wanted, tmp_path)
    assert {uid: result.path for uid, result in found.items()} == {
        FIRST.sop_instance_uid: ours,
        SECOND.sop_instance_uid: dicomtrolleys,
    }
    assert all(result.already_present for result in found.values())
    # COHORT's series: both layouts' folders, then FIRST in ours, SECOND in ours and in dicomtrolley's (5);
    # the 40 instances of the series with no folder: one look at each layout's folder for it (2), none at a file
    assert len(looked) == 7, looked
    assert PathTemplate("a/{StudyInstanceUID}_{SeriesInstanceUID}/{SOPInstanceUID}.dcm").folders_by_series
    assert not PathTemplate("{SeriesInstanceUID}/{SOPInstanceUID}/{SOPInstanceUID}.dcm").folders_by_series


def test_existing_valid_never_counts_a_file_behind_a_symlink(tmp_path: Path) -> None:
    """The lookup asks whether anything is at the path before it confines the directory (a fresh export confined
    directories not made yet on every call); what is there is still confined first: a valid file of the instance,
    reached through a series directory swapped for a symlink, is refused, never counted as done."""
    storage = DcmStorageDir()
    elsewhere = tmp_path / "elsewhere"
    saved = storage.save_raw(FIRST.reference(), raw(), elsewhere)
    out = tmp_path / "out"
    series = out / saved.path.parent.relative_to(elsewhere)
    series.parent.mkdir(parents=True)
    series.symlink_to(saved.path.parent, target_is_directory=True)
    with pytest.raises(UnsafePathError):
        storage.existing_valid(FIRST.reference(), out)
    assert storage.existing_valid(SECOND.reference(), out) is None  # nothing there: nothing to refuse or read


# ----------------------------------------------------------------------------------------------- quarantine


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"<html>500 Internal Server Error</html>", "not a DICOM"),
        (raw(SECOND), "SOPInstanceUID"),
        (raw()[:-100], "truncated"),
        (raw()[:-1000], "truncated"),
    ],
    ids=["not-dicom", "other-instance", "cut-in-pixels", "cut-in-header"],
)
def test_invalid_payload_is_quarantined(tmp_path: Path, payload: bytes, why: str) -> None:
    with pytest.raises(QuarantinedPayloadError, match=why) as raised:
        DcmStorageDir().save_raw(FIRST.reference(), payload, tmp_path)
    error = raised.value
    assert isinstance(error, PayloadInvalidError) and error.error_class is ErrorClass.PAYLOAD_INVALID
    assert error.reference == FIRST.reference()
    assert error.quarantine_path == tmp_path / ".trolley" / "quarantine" / f"{FIRST.sop_instance_uid}.bad"
    assert error.quarantine_path.read_bytes() == payload
    assert files_under(tmp_path) == []  # nothing in the export tree
    assert sorted((tmp_path / ".trolley" / "quarantine").iterdir()) == [error.quarantine_path]


def test_quarantine_is_overwritten_per_instance(tmp_path: Path) -> None:
    for payload in (b"first bad answer", b"second"):
        with pytest.raises(QuarantinedPayloadError) as raised:
            DcmStorageDir().save_raw(FIRST.reference(), payload, tmp_path)
    assert raised.value.quarantine_path.read_bytes() == b"second"


def test_broken_stream_leaves_nothing(tmp_path: Path) -> None:
    def stream() -> object:
        yield raw()[:500]
        raise TransientNetworkError("connection reset mid-body")

    with pytest.raises(TransientNetworkError):
        DcmStorageDir().save_raw(FIRST.reference(), stream(), tmp_path)  # type: ignore[arg-type]
    assert files_under(tmp_path) == [] and list((tmp_path / TEMP_DIR).iterdir()) == []


# -------------------------------------------------------------------------------------------------- atomicity

KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from trolley_tasks.storage.disk import DcmStorageDir
    from testbed.cohort import generate_cohort

    cohort = generate_cohort(studies=1, series=1, instances=1, seed=3, rows=1024, columns=1024)
    item = next(iter(cohort))
    data = cohort.encode(item)

    def slowly():
        for start in range(0, len(data), 65536):
            yield data[start:start + 65536]
            if start == 65536 * 4:
                print("HALFWAY", flush=True)
            time.sleep(0.05)

    DcmStorageDir().save_raw(item.reference(), slowly(), sys.argv[1])
    print("DONE", flush=True)
    """
)


def test_sigkill_mid_write_leaves_no_file_under_the_final_name(tmp_path: Path) -> None:
    cohort = generate_cohort(studies=1, series=1, instances=1, seed=3, rows=1024, columns=1024)
    item = next(iter(cohort))
    final = tmp_path / item.study_uid / item.series_uid / f"{item.sop_instance_uid}.dcm"
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "HALFWAY"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not final.exists()
    leftovers = list((tmp_path / TEMP_DIR).iterdir())
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < len(cohort.encode(item))

    result = DcmStorageDir().save_raw(item.reference(), cohort.encode(item), tmp_path)  # the rerun completes
    assert result.path == final and final.read_bytes() == cohort.encode(item)
    assert clean_temp_files(tmp_path, older_than=3600) == 0  # fresh: could belong to a running writer
    assert clean_temp_files(tmp_path, older_than=0) == 1
    assert list((tmp_path / TEMP_DIR).iterdir()) == []


# ------------------------------------------------------------------------------------------ custom storages


def test_custom_save_only_storage_does_not_take_raw() -> None:
    class MyStorage(DICOMDiskStorage):
        def save(self, dataset: Dataset, path: object = None) -> None:  # type: ignore[override]
            raise AssertionError("not called here")

    class RawToo(DcmStorageDir):
        pass

    assert DcmStorageDir().supports_raw() and FlatDcmStorageDir().supports_raw() and RawToo().supports_raw()
    assert not MyStorage().supports_raw()
    assert not DICOMDiskStorage().supports_raw()
    with pytest.raises(ConfigurationError, match="no output directory"):
        DcmStorageDir().save_raw(FIRST.reference(), raw())
    assert "DcmStorageDir" in repr(DcmStorageDir("/tmp/x"))


# ------------------------------------------------------------------------------------------------ file meta


@pytest.mark.parametrize(("implicit", "syntax"), [(True, "1.2.840.10008.1.2"), (False, "1.2.840.10008.1.2.1")])
def test_add_file_meta_makes_a_part10_file(tmp_path: Path, implicit: bool, syntax: str) -> None:
    bare = bare_dataset(FIRST, implicit)
    assert not is_part10(bare)
    full = add_file_meta(bare, syntax)
    assert is_part10(full) and full.endswith(bare)  # the dataset bytes are kept as received
    ds = pydicom.dcmread(BytesIO(full))
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.file_meta.MediaStorageSOPInstanceUID == FIRST.sop_instance_uid
    assert ds.file_meta.MediaStorageSOPClassUID == COHORT.dataset(FIRST).SOPClassUID
    assert ds.PixelData == COHORT.dataset(FIRST).PixelData
    assert add_file_meta(full, syntax) is full  # already Part 10
    result = DcmStorageDir().save_raw(FIRST.reference(), full, tmp_path)  # what a C-GET receiver hands to storage
    assert read_part10_header(result.path).SOPInstanceUID == FIRST.sop_instance_uid


def test_add_file_meta_deflated() -> None:
    bare = bare_dataset(FIRST, implicit=False)
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = compressor.compress(bare) + compressor.flush()
    full = add_file_meta(deflated, "1.2.840.10008.1.2.1.99")
    assert pydicom.dcmread(BytesIO(full)).SOPInstanceUID == FIRST.sop_instance_uid


def test_add_file_meta_refuses_junk() -> None:
    with pytest.raises(UsageError):
        add_file_meta(bare_dataset(FIRST, implicit=True), "not-a-uid")
    with pytest.raises(PayloadInvalidError, match="SOPInstanceUID"):
        add_file_meta(b"\x08\x00\x16\x00\x00\x00\x00\x00", "1.2.840.10008.1.2")


def test_reference_uids_are_used_for_the_path(tmp_path: Path) -> None:
    reference = InstanceReference(FIRST.study_uid, FIRST.series_uid, FIRST.sop_instance_uid)
    result = DcmStorageDir().save_raw(reference, raw(), tmp_path)
    assert result.path == DcmStorageDir().reference_path(reference, tmp_path)


# ------------------------------------------------------------------------------------------- one walk, one move


def test_a_streamed_payload_is_not_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header the downloader read travels with the chunks: storage checks it without opening the file again."""

    def no_second_walk(path: object) -> None:
        raise AssertionError(f"{path} was read back")

    monkeypatch.setattr("trolley_tasks.storage.disk.read_part10_header", no_second_walk)
    data = raw()
    stream = read_header(iter([data[:300], data[300:5000], data[5000:]]))
    assert stream.header is not None and stream.header.sop_instance_uid == FIRST.sop_instance_uid
    result = TemplateStorage(EXAMPLE_TEMPLATE).save_raw(FIRST.reference(), stream, tmp_path)
    assert result.path.read_bytes() == data
    assert result.path.parts[-4] == str(COHORT.dataset(FIRST).PatientID)  # a template keyword from the walk


def test_a_cut_stream_is_quarantined_by_the_same_walk(tmp_path: Path) -> None:
    data = raw()[:-100]
    with pytest.raises(QuarantinedPayloadError, match="truncated") as raised:
        DcmStorageDir().save_raw(FIRST.reference(), read_header(iter([data[:1000], data[1000:]])), tmp_path)
    assert raised.value.quarantine_path.read_bytes() == data


def test_a_spooled_file_is_renamed_into_place_not_copied(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    arrival = spool / "arrival.dcm"
    arrival.write_bytes(raw())
    inode = arrival.stat().st_ino
    result = DcmStorageDir().save_raw(FIRST.reference(), Part10File(arrival), tmp_path / "out")
    assert result.path.stat().st_ino == inode and not arrival.exists()  # one rename, same filesystem
    assert result.path.read_bytes() == raw()
    again = spool / "again.dcm"
    again.write_bytes(raw())
    assert DcmStorageDir().save_raw(FIRST.reference(), Part10File(again), tmp_path / "out").already_present
    assert not again.exists()  # an arrival that was already in place is consumed, not left in the spool
    other = spool / "other.dcm"
    other.write_bytes(raw(SECOND))
    with pytest.raises(QuarantinedPayloadError, match="SOPInstanceUID") as raised:
        DcmStorageDir().save_raw(FIRST.reference(), Part10File(other), tmp_path / "out")
    assert raised.value.quarantine_path.read_bytes() == raw(SECOND) and not other.exists()
