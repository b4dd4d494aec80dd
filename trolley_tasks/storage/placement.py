"""Putting a checked file under its final name: once, durably, and never over identical bytes.

The last step of :class:`~trolley_tasks.storage.disk.DICOMDiskStorage`'s saves, on its own so that disk.py keeps to
the storage classes: an identical file already there is left alone (``already_present``), a different one is
replaced atomically and reported (``replaced``), and each new folder's parent is fsynced, so that a renamed file's
path survives a power cut (:mod:`trolley_tasks.storage.durable` does the rename and the file's fsync).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from trolley_tasks.storage.durable import AtomicFile, Committer, commit_now, fsync_path

logger = logging.getLogger("trolley.storage")

_COMPARE_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class SaveResult:
    """What a save did.

    Attributes
    ----------
    path
        The final file.
    size
        Its size in bytes.
    already_present
        An identical file (same size, same bytes) was already there and was not touched.
    replaced
        A different file was there and was replaced, atomically, by the new one.
    """

    path: Path
    size: int
    already_present: bool = False
    replaced: bool = False


def place(temp: AtomicFile, final: Path, root: Path, committer: Committer | None = None, key: str = "") -> SaveResult:
    """Commit a checked temp file under ``final``, unless the same bytes are there already (then it is removed)."""
    result = place_file(temp.path, final, root, committer, key)
    if not result.already_present:
        temp.detach()  # renamed, or being renamed by the committer: no longer ours to remove
    return result


def place_file(source: Path, final: Path, root: Path, committer: Committer | None, key: str) -> SaveResult:
    """Rename the checked file ``source`` to ``final`` (durably), unless an identical file is there already."""
    size = source.stat().st_size
    _make_dirs(final.parent, root)
    try:
        existing = final.stat().st_size
    except FileNotFoundError:
        existing = None
    if existing == size and _same_bytes(source, final):
        return SaveResult(final, size, already_present=True)
    if committer is None:
        commit_now(source, final)
    else:
        committer.submit(key, source, final)
    if existing is not None:
        logger.warning("replaced %s: the server sent different bytes than the file already there", final)
    return SaveResult(final, size, replaced=existing is not None)


def _make_dirs(directory: Path, root: Path) -> None:
    """Create ``directory`` and fsync the parent of each new level, so that a renamed file's path survives a crash."""
    if directory.is_dir():
        return
    missing: list[Path] = []
    current = directory
    while not current.is_dir() and current != root:
        missing.append(current)
        current = current.parent
    for level in reversed(missing):
        try:
            level.mkdir()
        except FileExistsError:
            continue  # another worker made it
        fsync_path(level.parent)
    directory.mkdir(parents=True, exist_ok=True)


def _same_bytes(first: Path, second: Path) -> bool:
    with open(first, "rb") as a, open(second, "rb") as b:
        return all(x == y for x, y in zip(_chunks(a), _chunks(b), strict=False)) and not a.read(1) and not b.read(1)


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    return iter(lambda: handle.read(_COMPARE_CHUNK), b"")
