"""Background commits: nothing is under its final name before flush() says so, failures are reported per key."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from trolley_tasks.storage import durable
from trolley_tasks.storage.durable import TEMP_PREFIX, AtomicFile, Committer, commit_now, write_file

T = TypeVar("T")


def recording(calls: list[int], function: Callable[[int], T]) -> Callable[[int], T]:
    """``function``, noting each descriptor it is called with in ``calls``."""

    def record(fd: int) -> T:
        calls.append(fd)
        return function(fd)

    return record


def test_commit_now_and_background_commits(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    first = tmp_path / "a.tmp"
    first.write_bytes(b"one")
    commit_now(first, tmp_path / "out" / "a.dcm")
    assert (tmp_path / "out" / "a.dcm").read_bytes() == b"one" and not first.exists()

    committer = Committer()
    temps = []
    for index in range(20):
        temp = tmp_path / f"{index}.tmp"
        temp.write_bytes(bytes([index]) * 1000)
        temps.append(temp)
        committer.submit(f"k{index}", temp, tmp_path / "out" / f"{index}.dcm")
    missing_dir = tmp_path / "missing.tmp"
    missing_dir.write_bytes(b"x")
    committer.submit("bad", missing_dir, tmp_path / "no-such-dir" / "x.dcm")
    failed = committer.flush()
    assert set(failed) == {"bad"} and isinstance(failed["bad"], OSError)
    for index in range(20):
        assert (tmp_path / "out" / f"{index}.dcm").read_bytes() == bytes([index]) * 1000
        assert not temps[index].exists()
    assert committer.flush() == {}  # nothing pending any more


def test_write_file_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "new" / "report.json"
    write_file(target, [b"{", b"}"])
    write_file(target, b"[]")  # replaced in one step
    assert target.read_bytes() == b"[]" and sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_an_atomic_file_not_committed_is_removed(tmp_path: Path) -> None:
    with AtomicFile(tmp_path) as temp:
        temp.handle.write(b"half")
        path = temp.path
        assert path.name.startswith(TEMP_PREFIX) and path.parent == tmp_path
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_sync_false_is_atomic_without_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C-MOVE spool's markers: whole or absent, and no journal commit spent on them (a durable write fsyncs the
    file and its folder)."""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", recording(synced, real_fsync))
    target = tmp_path / "expected" / "1.2.3"
    write_file(target, b"token 123", sync=False)
    assert target.read_bytes() == b"token 123" and synced == []
    assert [p.name for p in target.parent.iterdir()] == ["1.2.3"]  # no temp file left beside it
    write_file(target, b"token 456")
    assert target.read_bytes() == b"token 456" and len(synced) == 2  # the file, then its folder


def _batch(tmp_path: Path, committer: Committer, count: int) -> list[Path]:
    (tmp_path / "out").mkdir(exist_ok=True)
    temps = []
    for index in range(count):
        temp = tmp_path / f"{index}.tmp"
        temp.write_bytes(bytes([index]) * 100)
        temps.append(temp)
        committer.submit(f"k{index}", temp, tmp_path / "out" / f"{index}.dcm")
    return temps


def test_a_batch_is_synced_once_per_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watchers: dict[int, int]
) -> None:
    """A process's first flush on a filesystem fsyncs each file (write-back errors are watched from then on); every
    later flush is one syncfs, and no file fsync."""
    if durable._syncfs is None:
        pytest.fail("this kernel's syncfs does not report errors (before Linux 5.8): the batch path is untested")
    syncfs_calls: list[int] = []
    real_syncfs = durable._syncfs
    monkeypatch.setattr(durable, "_syncfs", recording(syncfs_calls, real_syncfs))
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", recording(fsyncs, real_fsync))

    committer = Committer()
    _batch(tmp_path, committer, 10)
    assert not (tmp_path / "out" / "0.dcm").exists()  # nothing under its final name before flush
    assert committer.flush() == {}
    assert syncfs_calls == [] and len(fsyncs) == 10 + 1  # first flush here: each file, then the directory

    fsyncs.clear()
    (tmp_path / "second").mkdir()
    _batch(tmp_path / "second", committer, 10)
    assert committer.flush() == {}
    assert len(syncfs_calls) == 1 and len(fsyncs) == 1  # one syncfs for the batch, then the directory
    assert len(list((tmp_path / "out").iterdir())) == 10 and len(list((tmp_path / "second" / "out").iterdir())) == 10


def test_a_watched_filesystem_is_synced_once_from_the_first_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watchers: dict[int, int]
) -> None:
    """What the engine does before a batch writes: watching the output (not made yet: its nearest existing parent)
    lets even a process's first flush be one syncfs."""
    if durable._syncfs is None:
        pytest.fail("this kernel's syncfs does not report errors (before Linux 5.8): the batch path is untested")
    fsyncs: list[int] = []
    monkeypatch.setattr(os, "fsync", recording(fsyncs, os.fsync))
    durable.watch(tmp_path / "out" / "not-made-yet")
    assert list(watchers) == [os.stat(tmp_path).st_dev]
    committer = Committer()
    _batch(tmp_path, committer, 5)
    assert committer.flush() == {}
    assert len(fsyncs) == 1  # the directory only: the files went back with the syncfs


def test_files_written_before_their_filesystem_was_watched_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watchers: dict[int, int]
) -> None:
    """Two folders on one filesystem that no descriptor watched while their files were written: the descriptor the
    flush opens for the first folder did not watch the second folder's write-back either, so both are fsynced."""
    if durable._syncfs is None:
        pytest.fail("this kernel's syncfs does not report errors (before Linux 5.8): the batch path is untested")
    syncfs_calls: list[int] = []
    monkeypatch.setattr(durable, "_syncfs", recording(syncfs_calls, durable._syncfs))
    fsyncs: list[int] = []
    monkeypatch.setattr(os, "fsync", recording(fsyncs, os.fsync))
    committer = Committer()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _batch(tmp_path / folder, committer, 3)
    assert committer.flush() == {}
    assert syncfs_calls == [] and len(fsyncs) == 6 + 2  # every file, then the two output folders
    assert list(watchers) == [os.stat(tmp_path).st_dev]  # watched from now on


def test_a_forked_process_watches_with_its_own_descriptor(tmp_path: Path, watchers: dict[int, int]) -> None:
    """A descriptor shared with the parent would report a write-back error to whichever process synced first."""
    if durable._syncfs is None:
        pytest.fail("this kernel's syncfs does not report errors (before Linux 5.8): the batch path is untested")
    assert durable.sync_filesystem_of(tmp_path) is False and durable.sync_filesystem_of(tmp_path) is True
    parent_fd = watchers[os.stat(tmp_path).st_dev]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first sync opens its own descriptor, its second syncs through it
        first, second = durable.sync_filesystem_of(tmp_path), durable.sync_filesystem_of(tmp_path)
        own = durable._watchers[os.stat(tmp_path).st_dev]
        os.write(write, f"{first} {second} {own != parent_fd}".encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read, 100).decode()
    os.close(read)
    assert status == 0 and answer == "False True True"
    assert durable.sync_filesystem_of(tmp_path) is True  # the parent's own descriptor still serves it


def test_a_failed_sync_fails_every_file_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watchers: dict[int, int]
) -> None:
    """The disk lost a write-back: which file is unknown, so none of the batch counts as durable, and no temp file
    or final name is left for a later run to trust."""

    def broken(folder: Path) -> None:
        raise OSError(errno.EIO, "syncfs: Input/output error")

    monkeypatch.setattr(durable, "_syncfs", lambda fd: 0)
    monkeypatch.setattr(durable, "sync_filesystem_of", broken)
    durable.watch(tmp_path)  # as the engine does before a batch writes
    committer = Committer()
    temps = _batch(tmp_path, committer, 5)
    failed = committer.flush()
    assert sorted(failed) == [f"k{i}" for i in range(5)] and all(e.errno == errno.EIO for e in failed.values())  # type: ignore[attr-defined]
    assert not any(t.exists() for t in temps) and list((tmp_path / "out").iterdir()) == []


def test_without_syncfs_each_file_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(durable, "_syncfs", None)
    monkeypatch.setattr(os, "fsync", recording(synced, real_fsync))
    committer = Committer()
    _batch(tmp_path, committer, 4)
    assert committer.flush() == {}
    assert len(synced) == 4 + 1  # each file, then the one directory
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i}.dcm" for i in range(4)]


def test_a_failed_directory_fsync_fails_the_files_renamed_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their bytes are on disk and their names are in place, but the names may not survive a power cut: not
    durable, so not counted done (the engine pauses on the host's EIO, and a resumed run finds the files)."""
    real = durable.fsync_path

    def failing_for_folders(path: Path) -> None:
        if path.is_dir() and path.name == "bad":
            raise OSError(errno.EIO, "Input/output error", str(path))
        real(path)

    monkeypatch.setattr(durable, "fsync_path", failing_for_folders)
    committer = Committer()
    for folder in ("good", "bad"):
        (tmp_path / folder).mkdir()
        for index in range(2):
            temp = tmp_path / f"{folder}{index}.tmp"
            temp.write_bytes(b"x")
            committer.submit(f"{folder}{index}", temp, tmp_path / folder / f"{index}.dcm")
    failed = committer.flush()
    assert sorted(failed) == ["bad0", "bad1"] and all(e.errno == errno.EIO for e in failed.values())  # type: ignore[attr-defined]
    assert (tmp_path / "bad" / "0.dcm").exists()  # renamed: a resumed run finds it
