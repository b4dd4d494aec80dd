"""Background commits: nothing is under its final name before flush() says so, failures are reported per key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trolley_tasks.storage.durable import TEMP_PREFIX, AtomicFile, Committer, commit_now, write_file


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
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    target = tmp_path / "expected" / "1.2.3"
    write_file(target, b"token 123", sync=False)
    assert target.read_bytes() == b"token 123" and synced == []
    assert [p.name for p in target.parent.iterdir()] == ["1.2.3"]  # no temp file left beside it
    write_file(target, b"token 456")
    assert target.read_bytes() == b"token 456" and len(synced) == 2  # the file, then its folder
