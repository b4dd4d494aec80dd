"""A disk that fails on write-back, for real: a batch whose bytes did not reach the disk never counts as durable.

The disk is :func:`tests.engine.live.failing_disk`. Needs root, like the disk-full tests.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest

from tests.engine.live import failing_disk, run_or_missing
from trolley_tasks.storage import durable

_OTHER_WORKER = """
import ctypes, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(ctypes.CDLL(None, use_errno=True).syncfs(fd), ctypes.get_errno())
"""


def test_a_write_back_error_another_worker_saw_first_still_fails_the_batch(
    tmp_path: Path, watchers: dict[int, int]
) -> None:
    if durable._syncfs is None:
        pytest.fail("this kernel's syncfs does not report errors (before Linux 5.8): the batch path is untested")
    with failing_disk(tmp_path) as disk:
        out, temp_dir = disk / "out", disk / "out" / ".trolley" / "tmp"
        temp_dir.mkdir(parents=True)
        warm = durable.Committer()  # this worker's earlier batch: its first flush on this disk
        handle, path = durable.open_temp(temp_dir)
        with handle:
            handle.write(b"small")
        warm.submit("warm", path, out / "warm.dcm")
        assert warm.flush() == {} and (out / "warm.dcm").read_bytes() == b"small"

        committer = durable.Committer()
        for index in range(12):  # 60 MB: more than the disk holds
            handle, path = durable.open_temp(temp_dir)
            with handle:
                handle.write(os.urandom(5_000_000))
            committer.submit(f"k{index}", path, out / f"{index}.dcm")
        # another worker's syncfs sees the error first
        other = run_or_missing(sys.executable, "-c", _OTHER_WORKER, str(temp_dir))
        assert other.split()[0] == "-1", f"the other worker's syncfs succeeded: {other}"
        fresh = os.open(temp_dir, os.O_RDONLY)
        try:  # why a descriptor opened for the call will not do: the error was reported already
            assert ctypes.CDLL(None, use_errno=True).syncfs(fresh) == 0
        finally:
            os.close(fresh)

        failed = committer.flush()
        assert sorted(failed) == sorted(f"k{index}" for index in range(12))
        assert all(isinstance(error, OSError) and error.errno for error in failed.values())
        assert sorted(p.name for p in out.iterdir()) == [".trolley", "warm.dcm"]  # no final name for the batch
