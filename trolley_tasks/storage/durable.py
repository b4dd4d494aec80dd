"""The one atomic writer: every file the library and the engine write goes through here.

A new file is written as a temp file in the directory of its final name (so that the rename stays on one
filesystem), created with ``O_CREAT | O_EXCL`` under a random name (two writers never share one), then put under its
final name in one step. A reader sees the old file, the new file or no file, never half of one:

- :func:`open_temp` / :class:`AtomicFile`: the temp file;
- :func:`write_file`: bytes or chunks to a final path, durable on return (quarantine, state files), or only atomic
  with ``sync=False`` (the C-MOVE spool's markers, which nothing needs after a crash);
- :func:`commit_now` and :class:`Committer`: sync, rename, directory fsync, for one file or for a batch.

A file is durable once its bytes are on disk *before* the rename (otherwise a power cut can leave an empty file
under the final name) and its directory is fsynced *after* it (otherwise the new name itself can be lost). On ext4
each fsync of a new file is a journal commit of its own, and the next file's create waits behind it. So:

- :func:`commit_now` does both for one file (what ``storage.save_raw`` does on its own);
- a :class:`Committer` collects a batch's files and :meth:`Committer.flush` syncs them together (one ``syncfs``),
  renames them, and fsyncs each directory once. The engine flushes a batch before its ledger counts any instance of
  it as done, so "done" still means "durable on disk".
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, cast

TEMP_PREFIX = ".trolley-tmp-"
"""Temp files start with this; a crash may leave some, which ``storage.clean_temp_files`` removes later."""

COPY_CHUNK = 1024 * 1024
"""Bytes per read when a file must be copied across filesystems: memory stays one chunk whatever the file's size."""


def open_temp(directory: Path, *, text: bool = False) -> tuple[IO[Any], Path]:
    """A new, empty temp file in ``directory`` (made if missing), open for writing, and its path.

    ``os.open`` with ``O_EXCL`` and mode 0o666 rather than ``mkstemp``: the final files get the user's umask, as any
    file they write would. The name is random (64 bits), ``O_EXCL`` refuses any existing name and ``O_NOFOLLOW``
    any symlink planted there, so a local attacker can neither predict the file nor redirect it.
    ``text`` opens it as UTF-8 text with ``newline=""`` (the csv module's requirement).
    """
    path = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:  # first file in this directory (made once, not per file)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o666)
    if text:
        return os.fdopen(fd, "w", encoding="utf-8", newline=""), path
    return os.fdopen(fd, "wb"), path


class AtomicFile:
    """A temp file that becomes a final file in one step, or is removed.

    >>> with AtomicFile(directory) as temp:
    ...     temp.handle.write(data)
    ...     temp.commit(final)          # fsync, rename, directory fsync; without commit the temp file is removed
    """

    def __init__(self, directory: Path, *, text: bool = False) -> None:
        handle, self.path = open_temp(directory, text=text)
        self.handle: IO[Any] = handle  # binary, or text with text=True
        self.detached = False

    def close(self) -> None:
        """All bytes written; they are fsynced when the file is committed."""
        self.handle.close()

    def detach(self) -> Path:
        """Hand the file over (to a background commit or a quarantine): it is no longer removed on exit."""
        self.handle.close()
        self.detached = True
        return self.path

    def commit(self, final: Path, committer: Committer | None = None, key: str = "") -> None:
        """Put the file under ``final``: durable on return, or on ``committer.flush()`` (``key`` names it there)."""
        path = self.detach()
        if committer is None:
            commit_now(path, final)
        else:
            committer.submit(key, path, final)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()
        if not self.detached:
            self.path.unlink(missing_ok=True)


def write_file(path: Path, data: bytes | Iterable[bytes], *, sync: bool = True) -> None:
    """Write ``data`` (bytes, or chunks in order) to ``path`` atomically and durably, through a temp file beside it.

    With ``sync=False`` the file is still atomic (a reader sees all of it or nothing) but not fsynced: a power cut
    may lose it or leave it empty under its name. Only for files nothing needs after a crash; each fsync costs a
    journal commit (see the module docstring)."""
    with AtomicFile(path.parent) as temp:
        for chunk in (data,) if isinstance(data, bytes | bytearray | memoryview) else data:
            temp.handle.write(chunk)
        if sync:
            temp.commit(path)
        else:
            replace(temp.detach(), path)


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
        handle, neighbour = open_temp(target.parent)
        try:
            with handle, open(source, "rb") as original:
                shutil.copyfileobj(original, handle, COPY_CHUNK)
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


def _syncfs_function() -> Callable[[int], int] | None:
    """libc's ``syncfs`` where it reports write-back errors (Linux 5.8 and later), else None.

    Python has no ``os.syncfs``; ctypes reaches it. Before 5.8, syncfs returned 0 whatever the disk said, which would
    make "durable" a guess, so those kernels (and other systems) keep one fsync per file."""
    if not sys.platform.startswith("linux"):
        return None
    release = tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
    if release < (5, 8):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    return cast(Callable[[int], int], function)


_syncfs = _syncfs_function()


_watchers: dict[int, int] = {}
"""One open directory per filesystem, per process: the descriptor its syncfs calls go through (see
:func:`sync_filesystem_of`)."""
_watchers_pid = 0
_watchers_lock = threading.Lock()


def _watcher(directory: Path) -> tuple[int, bool]:
    """This process's descriptor on the filesystem of ``directory``, and whether it was open before this call."""
    global _watchers_pid
    device = os.stat(directory).st_dev
    with _watchers_lock:
        if _watchers_pid != os.getpid():
            _watchers.clear()  # the parent's descriptors stay open here, unused: closing them would not close theirs
            _watchers_pid = os.getpid()
        fd = _watchers.get(device)
        if fd is not None:
            return fd, True
        fd = _watchers[device] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return fd, False


def watch(directory: Path) -> None:
    """Watch the filesystem of ``directory`` (or of its nearest existing parent) for write-back errors from now on,
    so that a :class:`Committer` syncs the files written after this call with one syncfs, even in its first flush.
    The engine calls it before a batch writes anything."""
    if _syncfs is None:
        return
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    with contextlib.suppress(OSError):  # unreadable: the first flush fsyncs each file instead
        _watcher(directory)


def sync_filesystem_of(directory: Path) -> bool:
    """Write back every dirty byte of the filesystem that holds ``directory`` (``syncfs``). False when this process
    was not watching that filesystem (:func:`watch`): it is watched from now on, and the caller must fsync the files
    it wrote so far itself. Raises the write-back error otherwise.

    syncfs reports an error once per open descriptor, from the moment the descriptor was opened. A descriptor opened
    just for the call would miss an error that another process's syncfs (another worker on this host) reported
    first, so each process keeps one descriptor per filesystem and syncs through it; a forked child opens its own
    (a shared descriptor reports an error to whichever process asks first)."""
    assert _syncfs is not None
    try:
        fd, watched = _watcher(directory)
    except OSError:  # a folder we cannot open: the caller fsyncs each file, which reports its own errors
        return False
    if not watched:
        return False
    if _syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syncfs {directory}: {os.strerror(code)}")
    return True


class Committer:
    """Commits a batch of files at once; :meth:`flush` makes them all durable and reports the ones that failed.

    >>> committer = Committer()
    >>> storage.save_raw(ref, payload, out, committer=committer)   # returns at once: written, not yet renamed
    >>> failed = committer.flush()                                  # {key: exception}; the rest are durable

    One ``syncfs`` per filesystem per flush, not one fsync per file. Measured in the engine (docs/performance.md,
    "One syncfs per batch"): each fsync of a new file forced an ext4 journal commit of its own, which the next
    file's create then waited behind, and the threads that ran them in the background cost CPU of their own. syncfs
    writes the batch's files back together and commits the journal once; it also writes back whatever else is dirty
    on that filesystem (on an export host, mostly the other workers' batches). Each file is fsynced instead where
    syncfs does not report errors (see :func:`_syncfs_function`), and in a process's first flush on a filesystem it
    did not :func:`watch` before writing.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, Path, Path]] = []

    def submit(self, key: str, temp: Path, final: Path) -> None:
        """``temp`` (closed, all bytes written) becomes ``final`` at :meth:`flush`; ``key`` names it there."""
        self._pending.append((key, temp, final))

    def flush(self) -> dict[str, BaseException]:
        """Sync the temp files, rename each, then fsync each directory once. Returns the commits that failed; a
        failed syncfs fails every file it covered (which one the disk lost is not known), and removes them; a failed
        directory fsync fails the files renamed into it (a later run finds them, if their names survived)."""
        pending, self._pending = self._pending, []
        failed: dict[str, BaseException] = {}
        watched = _watched_devices()  # a descriptor opened during this flush did not watch these files' write-back
        synced: dict[Path, OSError | bool] = {}
        devices: dict[int, OSError | bool] = {}
        for key, temp, _ in pending:
            if temp.parent not in synced:
                synced[temp.parent] = _sync_folder(temp.parent, watched, devices)
            outcome = synced[temp.parent]
            error = outcome if isinstance(outcome, OSError) else None
            if outcome is False:  # no syncfs covered this file: fsync it
                error = _fsync_or_error(temp)
            if error is not None:
                failed[key] = error
                with contextlib.suppress(OSError):  # a disk that failed may refuse this too: the stale sweep will do
                    temp.unlink(missing_ok=True)
        directories: set[Path] = set()
        for key, temp, final in pending:
            if key in failed:
                continue
            try:
                replace(temp, final)
                directories.add(final.parent)
            except OSError as exc:  # the target's folder went away, permissions: that instance is not on disk
                failed[key] = exc
        for directory in directories:
            try:
                fsync_path(directory)
            except OSError as exc:  # renamed, but the names may not survive a power cut: not durable, not done
                failed.update(
                    {key: exc for key, _, final in pending if final.parent == directory and key not in failed}
                )
        return failed


def _watched_devices() -> frozenset[int]:
    """The filesystems this process watches now (:func:`watch`)."""
    with _watchers_lock:
        return frozenset(_watchers) if _watchers_pid == os.getpid() else frozenset()


def _sync_folder(folder: Path, watched: frozenset[int], devices: dict[int, OSError | bool]) -> OSError | bool:
    """True when one syncfs (one per filesystem and flush, remembered in ``devices``) through a descriptor that was
    watching before the flush began covered the files in ``folder``; False when they must be fsynced one by one (its
    filesystem is watched from now on); or the syncfs error."""
    if _syncfs is None:
        return False
    try:
        device = os.stat(folder).st_dev
    except OSError:
        return False  # the folder is gone: each file's own fsync says what happened
    if device not in devices:
        if device not in watched:
            watch(folder)
            devices[device] = False
        else:
            try:
                devices[device] = sync_filesystem_of(folder)
            except OSError as exc:
                devices[device] = exc
    return devices[device]


def _fsync_or_error(temp: Path) -> OSError | None:
    try:
        fsync_path(temp)
    except OSError as exc:
        return exc
    return None


def remove_stale_temp_files(directory: Path, older_than: float) -> int:
    """Remove this writer's temp files in ``directory`` untouched for ``older_than`` seconds (a crash left them).

    A temp file being written is touched continuously, so the age keeps this safe while other workers write to the
    same directory. Returns how many were removed.
    """
    if not directory.is_dir():
        return 0
    removed = 0
    limit = time.time() - older_than
    for entry in os.scandir(directory):
        if entry.name.startswith(TEMP_PREFIX) and entry.stat(follow_symlinks=False).st_mtime <= limit:
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed
