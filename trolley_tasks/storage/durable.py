"""Putting a checked temp file under its final name so that it survives a crash, inline or in the background.

A file is durable once its bytes are fsynced *before* the rename (otherwise a power cut can leave an empty file
under the final name) and its directory is fsynced *after* it (otherwise the new name itself can be lost). Those two
fsyncs cost about a millisecond per file here, which at hundreds of instances a second is a quarter of a worker's
time, while the CPU has other work (the next instance's bytes). So:

- :func:`commit_now` does both for one file (what ``storage.save_raw`` does on its own);
- a :class:`Committer` runs the fsync-then-rename of each file on a small thread pool while the caller goes on, and
  :meth:`Committer.flush` waits for them and fsyncs each directory once. The engine flushes a batch before its
  ledger counts any instance of it as done, so "done" still means "durable on disk".
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

TEMP_PREFIX = ".trolley-tmp-"
"""Temp files start with this; a crash may leave some, which ``storage.clean_temp_files`` removes later."""

COMMIT_THREADS = 4
"""fsyncs in flight per worker process: enough to keep the disk queue busy while Python parses the next part."""

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(source: Path, target: Path) -> None:
    """``os.replace``; across filesystems (a mount inside the output), copy next to the target and replace there."""
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        neighbour = target.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            shutil.copyfile(source, neighbour)
            fsync_path(neighbour)
            os.replace(neighbour, target)
        finally:
            neighbour.unlink(missing_ok=True)
        source.unlink(missing_ok=True)


def sync_and_replace(temp: Path, final: Path) -> None:
    """The bytes of ``temp`` reach the disk, then ``temp`` becomes ``final`` in one step."""
    fsync_path(temp)
    replace(temp, final)


def commit_now(temp: Path, final: Path) -> None:
    """Make ``temp`` durable under ``final`` before returning: fsync, rename, fsync the directory."""
    sync_and_replace(temp, final)
    fsync_path(final.parent)


def _shared_pool() -> ThreadPoolExecutor:
    """One pool per process, made after a fork (a forked child must not inherit its parent's threads)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="trolley-commit")
            _pool_pid = os.getpid()
        return _pool


class Committer:
    """Commits files in the background; :meth:`flush` makes them all durable and reports the ones that failed.

    >>> committer = Committer()
    >>> storage.save_raw(ref, payload, out, committer=committer)   # returns at once; fsync + rename run behind
    >>> failed = committer.flush()                                  # {key: exception}; the rest are durable
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, Future[None], Path]] = []

    def submit(self, key: str, temp: Path, final: Path) -> None:
        """Start committing ``temp`` as ``final``; ``key`` names it in :meth:`flush`'s answer."""
        self._pending.append((key, _shared_pool().submit(sync_and_replace, temp, final), final.parent))

    def flush(self) -> dict[str, BaseException]:
        """Wait for every submitted commit, then fsync each directory once. Returns the commits that failed."""
        failed: dict[str, BaseException] = {}
        directories: set[Path] = set()
        for key, future, directory in self._pending:
            try:
                future.result()
                directories.add(directory)
            except Exception as exc:  # an OSError (disk full, permissions): that instance is not on disk
                failed[key] = exc
        self._pending.clear()
        for directory in directories:
            fsync_path(directory)
        return failed
