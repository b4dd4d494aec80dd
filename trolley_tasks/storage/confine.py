"""Where files may go: inside the output directory, and in private directories nobody else can swap or read.

Two guards against a local attacker (another user on the host, or a process that can write into a shared parent):

- :func:`private_directory` makes a directory that only we can enter (mode 0700) or, when it exists, checks that it
  is a real directory (not a symlink) owned by us, and takes group and other access away if we own it. The embedded
  Redis's socket fallback folder under ``/tmp`` and the C-MOVE spool go through it: a folder someone else made first
  under that name is refused, never adopted.
- :func:`confined_directory` checks that a directory resolves inside the output root (path components are sanitized
  by the layouts, so only a symlink could lead out). The answer is cached per directory, since a series' hundreds of
  files share one, but the cache never trusts a name: it remembers the identity (device, inode) of every existing
  component below the root and re-checks them with one ``lstat`` each on every call, so a directory swapped for a
  symlink after its first check is caught and checked again from scratch.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

from trolley_tasks.errors import UnsafePathError

_Identity = tuple[str, int, int]
"""(path, st_dev, st_ino) of one existing directory component."""

_CACHE_SIZE = 4096
_cache: dict[tuple[Path, Path], tuple[_Identity, ...]] = {}
_cache_lock = threading.Lock()


def private_directory(path: Path) -> Path:
    """``path`` as a directory only this user can use: made with mode 0700, or checked (and tightened) if it exists.

    Raises
    ------
    UnsafePathError
        ``path`` is a symlink, not a directory, or owned by another user.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{path} is not a directory (a symlink or a file is in its place); remove it")
    if info.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} belongs to user id {info.st_uid}, not to us; remove it or choose another path")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700, follow_symlinks=False)
    return path


def confined_directory(root: Path, directory: Path) -> Path:
    """``directory`` when it lies inside ``root`` (see the module docstring), else UnsafePathError."""
    key = (root, directory)
    with _cache_lock:
        known = _cache.get(key)
    if known is not None and _unchanged(known):
        return directory
    identities = _check(root, directory)
    if identities is not None:
        with _cache_lock:
            if len(_cache) >= _CACHE_SIZE:
                _cache.clear()
            _cache[key] = identities
    return directory


def _check(root: Path, directory: Path) -> tuple[_Identity, ...] | None:
    """Resolve and compare; the identities of the components when all exist (cacheable), else None."""
    resolved_root = root.resolve()
    if os.path.commonpath([resolved_root, directory.resolve()]) != str(resolved_root):
        raise UnsafePathError(f"{directory} would lead outside the output directory {root}")
    identities: list[_Identity] = []
    current = root
    try:
        info = os.stat(root)
        identities.append((str(root), info.st_dev, info.st_ino))
        for part in directory.relative_to(root).parts:
            current = current / part
            info = os.lstat(current)
            identities.append((str(current), info.st_dev, info.st_ino))
    except FileNotFoundError:
        return None  # not made yet: checked again next time, once it exists
    except ValueError:  # directory is not spelled under root (a '..' or another prefix): resolved above, no cache
        return None
    return tuple(identities)


def _unchanged(known: tuple[_Identity, ...]) -> bool:
    """Every remembered component is still the same real directory (the root may be a symlink: it is followed)."""
    try:
        for index, (path, device, inode) in enumerate(known):
            info = os.stat(path) if index == 0 else os.lstat(path)
            if (info.st_dev, info.st_ino) != (device, inode) or not stat.S_ISDIR(info.st_mode):
                return False
    except OSError:
        return False
    return True
