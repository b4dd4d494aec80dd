"""The C-MOVE spool's purge against the processes that use the spool at the same time (real processes, a real
folder): it removes what is stale, never a marker a fetch is writing."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from pydicom.uid import generate_uid

from trolley_tasks.storage.durable import TEMP_PREFIX
from trolley_tasks.transports.move_spool import STALE_SECONDS, MoveSpool


def _expect(directory: str, rounds: int) -> None:
    spool = MoveSpool(directory)
    for _ in range(rounds):
        uids = [generate_uid() for _ in range(20)]
        tokens = spool.expect(uids)
        assert [spool.token(uid) for uid in uids] == [tokens[uid] for uid in uids]
        spool.forget(uids)


def _purge(directory: str, stop: float) -> None:
    spool = MoveSpool(directory)
    while time.time() < stop:
        spool.purge(force=True)


def test_a_purge_never_removes_a_marker_a_fetch_is_writing(tmp_path: Path) -> None:
    """The receiver purges (on start, then once a minute) while fetches on the host register their expectations,
    each written as a temp file and renamed. A purge that took the temp file for an unreadable marker made the
    rename fail, and the fetch's whole batch with it (found by ``make bench``: 50 C-MOVE instances failed)."""
    spool = MoveSpool(tmp_path / "spool").prepare()
    context = multiprocessing.get_context("spawn")
    purger = context.Process(target=_purge, args=(str(spool.directory), time.time() + 30))
    writers = [context.Process(target=_expect, args=(str(spool.directory), 150)) for _ in range(2)]
    purger.start()
    try:
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(timeout=60)
        assert [writer.exitcode for writer in writers] == [0, 0]
    finally:
        for process in (purger, *writers):
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)


def test_a_purge_removes_what_is_stale_and_keeps_what_is_fresh(tmp_path: Path) -> None:
    spool = MoveSpool(tmp_path / "spool").prepare()
    old = time.time() - STALE_SECONDS - 60
    fresh_temp, old_temp = spool.expected_dir / f"{TEMP_PREFIX}fresh", spool.expected_dir / f"{TEMP_PREFIX}old"
    expired, current = generate_uid(), generate_uid()
    spool.expect([expired], seconds=-1)
    spool.expect([current])
    for path in (fresh_temp, old_temp):
        path.write_bytes(b"")
    os.utime(old_temp, (old, old))
    assert spool.purge(force=True) == 2
    assert sorted(p.name for p in spool.expected_dir.iterdir()) == sorted([fresh_temp.name, current])
