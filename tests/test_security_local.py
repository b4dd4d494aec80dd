"""Local attackers: private directories, temp files that follow no link, confinement of the work folders, no cached
trust in a directory swapped for a symlink, the C-MOVE spool's expectations and purge."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

from testbed.cohort import generate_cohort
from tests.conftest import CI
from trolley_tasks.engine.embedded import EmbeddedError, EmbeddedRedis
from trolley_tasks.errors import ConfigurationError, UnsafePathError
from trolley_tasks.storage import durable
from trolley_tasks.storage.confine import private_directory
from trolley_tasks.storage.disk import QUARANTINE_DIR, TEMP_DIR, StorageDir
from trolley_tasks.transports import move_spool
from trolley_tasks.transports.move_spool import MoveSpool
from trolley_tasks.transports.storage_scp import StorageReceiver

COHORT = generate_cohort(studies=1, series=1, instances=2, seed=12, rows=16, columns=16)
FIRST, SECOND = list(COHORT)
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0 and not CI, reason="giving a folder to another user needs root")
"""Skipped without root, except under CI=true (which runs as root): there a missing privilege fails the test."""


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_private_directory_is_made_0700_and_tightened(tmp_path: Path) -> None:
    made = private_directory(tmp_path / "new" / "private")
    assert mode(made) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    private_directory(loose)
    assert mode(loose) == 0o700


def test_private_directory_refuses_a_symlink_and_a_file(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "file").write_text("x")
    for name in ("link", "file"):
        with pytest.raises(UnsafePathError, match="not a directory"):
            private_directory(tmp_path / name)


@needs_root
def test_private_directory_refuses_another_users_folder(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match="belongs to user id 65534"):
        private_directory(theirs)


@needs_root
def test_embedded_socket_fallback_folder_made_by_another_user_is_refused(tmp_path: Path) -> None:
    """A state directory with a long path puts the socket under /tmp; a folder planted there first is refused
    before anything is asked over it."""
    state = tmp_path / ("long-" * 30)
    embedded = EmbeddedRedis(state)
    planted = embedded.socket_path.parent
    assert planted.parent == Path(tempfile.gettempdir())  # the fallback, not the state directory
    shutil.rmtree(planted, ignore_errors=True)
    planted.mkdir(mode=0o777)
    try:
        os.chown(planted, NOBODY, NOBODY)
        with pytest.raises(EmbeddedError, match="socket folder is unsafe"):
            embedded.start()
        assert not (state / "embedded.lock").exists()  # refused before it took the state directory
    finally:
        shutil.rmtree(planted, ignore_errors=True)


def test_temp_files_never_open_a_planted_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a name guessed in advance (the random part forced here) is never opened through a symlink."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    monkeypatch.setattr(durable.secrets, "token_hex", lambda n: "guessed")
    (tmp_path / f"{durable.TEMP_PREFIX}guessed").symlink_to(victim)
    with pytest.raises(FileExistsError):
        durable.open_temp(tmp_path)
    assert victim.read_text() == "precious"


def test_a_series_folder_swapped_for_a_symlink_after_its_first_check_is_caught(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    storage = StorageDir()
    first = storage.save_raw(FIRST.reference(), COHORT.encode(FIRST), out)  # the series folder is checked (cached)
    series_dir = first.path.parent
    shutil.rmtree(series_dir)
    series_dir.symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="outside the output directory"):
        storage.save_raw(SECOND.reference(), COHORT.encode(SECOND), out)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("work", [TEMP_DIR, QUARANTINE_DIR])
def test_work_folders_that_lead_out_are_refused(tmp_path: Path, work: str) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / work).parent.mkdir(parents=True)
    (out / work).symlink_to(elsewhere)
    payload = COHORT.encode(FIRST) if work == TEMP_DIR else b"not dicom at all" * 10
    with pytest.raises(UnsafePathError, match="outside the output directory"):
        StorageDir().save_raw(FIRST.reference(), payload, out)
    assert list(elsewhere.iterdir()) == []


def test_spool_expectations_tokens_expiry_and_forget(tmp_path: Path) -> None:
    spool = MoveSpool(tmp_path / "spool").prepare()
    assert mode(spool.directory) == 0o700 and mode(spool.expected_dir) == 0o700
    uid = FIRST.sop_instance_uid
    assert spool.token(uid) is None
    tokens = spool.expect([uid, "../../etc/passwd"])
    assert list(tokens) == [uid]  # a UID that is not one is never a file name
    assert spool.token(uid) == tokens[uid] and len(tokens[uid]) == 32
    assert spool.arrival(uid, tokens[uid]).name == f"{uid}.{tokens[uid]}.dcm"
    spool.forget([uid])
    assert spool.token(uid) is None
    spool.expect([uid], seconds=-1)
    assert spool.token(uid) is None  # expired


def test_a_move_claims_only_the_arrivals_under_its_own_tokens_each_once(tmp_path: Path) -> None:
    """CMove.collect lists the spool and claims each arrival of its request by rename, once: not a file under
    another token (an older expectation of the same UID), not another request's, not a temp or claimed file."""
    from trolley_tasks.downloaders.dicom_qr_move import CMove
    from trolley_tasks.downloaders.dimse_retrieve import RetrieveRequest

    move = CMove(
        "127.0.0.1", 9, "TROLLEY", "PACS", destination_aet="TROLLEY", receiver_port=9,
        receiver_host="127.0.0.1", spool_dir=tmp_path / "spool", run_receiver=False,
    )  # fmt: skip
    spool = move.spool.prepare()
    ours = [f"1.2.3.{n}" for n in range(4)]
    move._tokens = spool.expect(ours)
    request = RetrieveRequest("IMAGE", "1.2", "1.2.3", tuple(ours))
    other = spool.expect(["1.2.4.1"])
    planted = [
        spool.arrival(ours[0], "0" * 32),  # our UID, a token we never issued
        spool.arrival("1.2.4.1", other["1.2.4.1"]),  # another request's arrival
        spool.directory / f".{ours[1]}.{move._tokens[ours[1]]}.dcm.claimed-1-ab",  # someone's claim
        spool.directory / ".trolley-tmp-x.dcm",
    ]
    for path in [
        *planted,
        spool.arrival(ours[1], move._tokens[ours[1]]),
        spool.arrival(ours[3], move._tokens[ours[3]]),
    ]:
        path.write_bytes(b"x")
    delivered: set[str] = set()
    first = [ref.instance_uid for ref, _ in move.collect(request, delivered)]
    assert sorted(first) == [ours[1], ours[3]]
    delivered.update(first)
    assert list(move.collect(request, delivered)) == []  # nothing new: nothing claimed twice
    spool.arrival(ours[2], move._tokens[ours[2]]).write_bytes(b"x")
    assert [ref.instance_uid for ref, _ in move.collect(request, delivered)] == [ours[2]]
    assert all(path.exists() for path in planted)


def test_spool_purge_removes_what_nobody_will_claim(tmp_path: Path) -> None:
    spool = MoveSpool(tmp_path / "spool").prepare()
    old = time.time() - move_spool.STALE_SECONDS - 10
    stale = [
        spool.directory / "1.2.3.abc.dcm",
        spool.directory / f"{durable.TEMP_PREFIX}x",
        spool.directory / ".a.claimed-1",
    ]
    fresh = spool.directory / "1.2.4.def.dcm"
    for path in [*stale, fresh]:
        path.write_bytes(b"x")
    for path in stale:
        os.utime(path, (old, old))
    spool.expect(["1.2.5"], seconds=-1)
    spool.expect(["1.2.6"])
    assert spool.purge(force=True) == 4
    assert sorted(p.name for p in spool.directory.iterdir()) == ["1.2.4.def.dcm", "expected"]
    assert [p.name for p in spool.expected_dir.iterdir()] == ["1.2.6"]
    assert spool.purge() == 0  # at most once a minute


@needs_root
def test_receiver_refuses_a_spool_owned_by_another_user(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    os.chown(spool, NOBODY, NOBODY)
    receiver = StorageReceiver("TROLLEY", "127.0.0.1", 1, spool, allowed_aets=["PACS"], allowed_hosts=["127.0.0.1"])
    with pytest.raises(ConfigurationError, match="C-MOVE spool"):
        receiver.start()
    assert not receiver.running
