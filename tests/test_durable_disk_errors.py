"""A disk that fails on write-back, for real: a batch whose bytes did not reach the disk never counts as durable.

The disk is an ext4 filesystem on a loop device whose backing file lies on a tmpfs smaller than the filesystem, so
the page cache takes the writes and the write-back fails (the kernel logs "critical space allocation error"). Needs
root, like the disk-full tests.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.conftest import service_missing
from trolley_tasks.storage import durable

_OTHER_WORKER = """
import ctypes, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(ctypes.CDLL(None, use_errno=True).syncfs(fd), ctypes.get_errno())
"""


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        service_missing(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def failing_disk(where: Path, real_mb: int = 24, size_mb: int = 128) -> Iterator[Path]:
    """An ext4 of ``size_mb`` that holds only ``real_mb`` once written back; unmounted and detached afterwards."""
    if os.geteuid() != 0:
        service_missing("a failing-disk test mounts a tmpfs and a loop device, which needs root")
    back, mount = where / "back", where / "mnt"
    back.mkdir(parents=True)
    mount.mkdir()
    with ExitStack() as stack:
        _run("mount", "-t", "tmpfs", "-o", f"size={real_mb}m", "tmpfs", str(back))
        stack.callback(subprocess.run, ["umount", "-l", str(back)], check=False)
        image = back / "disk.img"
        _run("truncate", "-s", f"{size_mb}M", str(image))
        _run("mkfs.ext4", "-q", "-F", str(image))
        device = _run("losetup", "--find", "--show", str(image))
        stack.callback(subprocess.run, ["losetup", "-d", device], check=False)
        _run("mount", device, str(mount))
        stack.callback(subprocess.run, ["umount", "-l", str(mount)], check=False)
        yield mount


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
        other = _run(sys.executable, "-c", _OTHER_WORKER, str(temp_dir))  # another worker's syncfs sees it first
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
