"""The C-MOVE receiver against rogue peers: a second pynetdicom SCU tries what an attacker on the network would,
against a real receiver; none of it is stored or counted; then a real C-MOVE export through Orthanc still works."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from testbed.orthanc import free_port
from trolley_tasks.core import InstanceReference
from trolley_tasks.downloaders.dicom_qr import CMove, StorageReceiver
from trolley_tasks.storage import StorageDir
from trolley_tasks.transports.move_spool import MoveSpool
from trolley_tasks.transports.storage_scp import STATUS_NOT_AUTHORISED

CAP = 1024 * 1024
"""The test receiver's per-instance cap: small, so that the oversize dataset is cut off after a megabyte."""
FORGED_PIXELS = b"\x07" * 4096


def dataset(ref: InstanceReference, pixels: bytes) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ref.instance_uid
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ref.instance_uid
    ds.StudyInstanceUID = ref.study_uid
    ds.SeriesInstanceUID = ref.series_uid
    ds.PatientID = "FORGED"
    ds.add_new(0x7FE00010, "OB", pixels)
    return ds


def store(port: int, ds: Dataset, *, calling: str, called: str = "TROLLEY") -> str:
    """One C-STORE from a second SCU: ``"rejected"``, ``"aborted"`` or the status as hex."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return "rejected"
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    return f"0x{int(status.Status):04X}" if "Status" in status else "aborted"


@pytest.fixture
def pynetdicom_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where pynetdicom writes datasets as they arrive (TMPDIR), watched by the test."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def receiver(orthanc: Any, tmp_path: Path) -> Iterator[StorageReceiver]:
    with StorageReceiver(
        orthanc.move_aet,
        "127.0.0.1",
        orthanc.move_port,
        tmp_path / "spool",
        allowed_aets=[orthanc.aet],
        allowed_hosts=["127.0.0.1"],
        max_instance_bytes=CAP,
        max_association_bytes=8 * CAP,
    ) as running:
        yield running


def spool_files(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.iterdir() if p.is_file())


def test_rogue_peers_store_nothing_and_a_real_move_still_works(
    orthanc: Any, receiver: StorageReceiver, pynetdicom_tmp: Path, tmp_path: Path
) -> None:
    spool = MoveSpool(receiver.spool_dir)
    target = orthanc.cohort.instance_refs()[0]
    spool.expect([target.instance_uid])  # a move of this instance is outstanding: the attacker knows its UIDs

    stranger = InstanceReference(target.study_uid, target.series_uid, generate_uid())
    outcomes = {
        "unrequested instance from the PACS's AE": store(
            receiver.port, dataset(stranger, FORGED_PIXELS), calling=orthanc.aet
        ),
        "forged requested instance from EVIL": store(receiver.port, dataset(target, FORGED_PIXELS), calling="EVIL"),
        "store to a wrong called AE": store(
            receiver.port, dataset(target, FORGED_PIXELS), calling=orthanc.aet, called="NOTTROLLEY"
        ),
        "32 MiB instance over the 1 MiB cap": store(
            receiver.port, dataset(target, b"\x01" * (32 * CAP)), calling=orthanc.aet
        ),
    }
    print(outcomes)
    assert outcomes == {
        "unrequested instance from the PACS's AE": f"0x{STATUS_NOT_AUTHORISED:04X}",
        "forged requested instance from EVIL": "rejected",
        "store to a wrong called AE": "rejected",
        "32 MiB instance over the 1 MiB cap": "aborted",
    }
    assert receiver.received == 0
    assert receiver.refused >= 4
    assert spool_files(receiver.spool_dir) == []
    deadline = time.monotonic() + 10  # the cut-off dataset's temporary file goes when its connection closes
    while list(pynetdicom_tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(pynetdicom_tmp.iterdir()) == []
    spool.forget([target.instance_uid])

    # the real PACS, through a real C-MOVE, gets its instances stored, and only those
    cmove = CMove(
        "127.0.0.1",
        orthanc.dicom_port,
        "TROLLEY",
        orthanc.aet,
        destination_aet=orthanc.move_aet,
        receiver_port=orthanc.move_port,
        spool_dir=receiver.spool_dir,
        run_receiver=False,
    )
    series = [ref for ref in orthanc.cohort.instance_refs() if ref.series_uid == target.series_uid]
    storage = StorageDir(tmp_path / "out")
    try:
        saved = [storage.save_raw(ref, payload) for ref, payload in cmove.iter_raw(series)]
    finally:
        cmove.close()
    assert len(saved) == len(series) == receiver.received
    assert FORGED_PIXELS not in saved[0].path.read_bytes()
    assert spool_files(receiver.spool_dir) == []


def test_an_address_not_allowed_is_rejected(orthanc: Any, tmp_path: Path) -> None:
    port = free_port()
    with StorageReceiver(
        "TROLLEY", "127.0.0.1", port, tmp_path / "spool", allowed_aets=[orthanc.aet], allowed_hosts=["192.0.2.7"]
    ) as receiver:
        ref = orthanc.cohort.instance_refs()[0]
        MoveSpool(receiver.spool_dir).expect([ref.instance_uid])
        assert store(port, dataset(ref, FORGED_PIXELS), calling=orthanc.aet) == "rejected"
        assert receiver.received == 0
        assert spool_files(receiver.spool_dir) == []


def test_a_late_arrival_after_the_move_is_refused(orthanc: Any, receiver: StorageReceiver) -> None:
    """The move is over (its expectation forgotten): the same UID from the right peer is refused."""
    spool = MoveSpool(receiver.spool_dir)
    ref = orthanc.cohort.instance_refs()[1]
    spool.expect([ref.instance_uid])
    spool.forget([ref.instance_uid])
    assert store(receiver.port, dataset(ref, FORGED_PIXELS), calling=orthanc.aet) == f"0x{STATUS_NOT_AUTHORISED:04X}"
    assert receiver.received == 0


def test_an_expected_instance_from_the_pacs_is_stored_under_its_token(orthanc: Any, receiver: StorageReceiver) -> None:
    spool = MoveSpool(receiver.spool_dir)
    ref = orthanc.cohort.instance_refs()[2]
    token = spool.expect([ref.instance_uid])[ref.instance_uid]
    assert store(receiver.port, dataset(ref, FORGED_PIXELS), calling=orthanc.aet) == "0x0000"
    assert receiver.received == 1
    assert spool.arrival(ref.instance_uid, token).is_file()
    assert not (receiver.spool_dir / f"{ref.instance_uid}.dcm").exists()  # never a file named after the UID alone


def test_the_receiver_address_defaults_to_the_route_to_the_pacs_never_every_interface(tmp_path: Path) -> None:
    from trolley_tasks.profiles import SourceProfile, build_receiver

    profile = SourceProfile(
        searcher="dicom-qr",
        downloader="c-move",
        host="127.0.0.1",
        port=4242,
        called_aet="PACS",
        move_destination="TROLLEY",
        receiver_port=11113,
    )
    receiver = build_receiver(profile, "pacs", tmp_path / "spool")
    assert receiver.host == "127.0.0.1"
    assert (receiver.allowed_aets, receiver.allowed_hosts) == (("PACS",), ("127.0.0.1",))
    chosen = build_receiver(profile.model_copy(update={"receiver_host": "127.0.0.2"}), "pacs", tmp_path / "spool")
    assert chosen.host == "127.0.0.2"


def test_c_get_refuses_an_instance_over_max_instance_bytes(orthanc: Any) -> None:
    from trolley_tasks.downloaders.dicom_qr import CGet
    from trolley_tasks.errors import ErrorClass, RequestRejectedError

    ref = orthanc.cohort.instance_refs()[0]
    cget = CGet("127.0.0.1", orthanc.dicom_port, "TROLLEY", orthanc.aet, max_instance_bytes=64 * 1024)
    try:
        with pytest.raises(RequestRejectedError, match="larger than 65536 bytes") as raised:
            list(cget.iter_raw(ref))
    finally:
        cget.close()
    assert raised.value.error_class is ErrorClass.REQUEST_REJECTED
