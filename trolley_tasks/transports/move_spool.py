"""The C-MOVE spool of a worker host: which instances are expected, and where the receiver puts them.

A C-MOVE (PS3.4 C.4.2) makes the PACS open its own association to our Storage SCP, so the receiver cannot tell from
the association alone whether an instance was asked for. The fetch that sends the C-MOVE says so first, here, and
the receiver (:class:`~trolley_tasks.transports.storage_scp.StorageReceiver`) stores only what is expected. This
registry needs no Redis: it is a folder shared by every process of the host (they all run as one user), so a library
user with no engine gets the same protection.

Layout of ``<spool>`` (made mode 0700 and owner-checked by
:func:`~trolley_tasks.storage.confine.private_directory`):

- ``expected/<SOPInstanceUID>``: one marker per outstanding instance, holding a random token and a deadline
  (``"<token> <unix time>"``); written atomically by the fetch before its C-MOVE, removed after it;
- ``<SOPInstanceUID>.<token>.dcm``: an arrival the receiver stored for that marker. The token is secret (the spool
  is private), so :meth:`MoveSpool.arrival` finds only files the receiver stored for *this* expectation, never a
  file merely named after the UID;
- ``.trolley-tmp-*``: the atomic writer's temp files; ``.*.claimed-*``: arrivals a fetch has taken.

Everything older than its use (expired markers, arrivals nobody claimed, temp and claimed files a killed process
left) is removed by :meth:`MoveSpool.purge`, which the receiver runs on start and then at most once a minute.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from trolley_tasks.core import is_valid_uid
from trolley_tasks.storage.confine import private_directory
from trolley_tasks.storage.durable import TEMP_PREFIX, write_file

EXPECT_SECONDS = 3600.0
"""How long a marker stays valid when its fetch never removes it (killed): longer than any one C-MOVE request."""
STALE_SECONDS = 3600.0
"""An arrival, temp or claimed file untouched this long belongs to nobody any more."""
PURGE_INTERVAL = 60.0


class MoveSpool:
    """The expectations and arrivals of one spool folder (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.expected_dir = self.directory / "expected"
        self._last_purge = 0.0

    def __repr__(self) -> str:
        return f"MoveSpool({str(self.directory)!r})"

    def prepare(self) -> MoveSpool:
        """Make (or check) the spool and its ``expected`` folder as private directories."""
        private_directory(self.directory)
        private_directory(self.expected_dir)
        return self

    def expect(self, uids: Iterable[str], seconds: float = EXPECT_SECONDS) -> dict[str, str]:
        """Register ``uids`` as outstanding for ``seconds``; returns each UID's token. A previous arrival of the same
        UID (stored for an older expectation) is forgotten: only what comes after this call counts."""
        deadline = time.time() + seconds
        tokens: dict[str, str] = {}
        for uid in uids:
            if not is_valid_uid(uid):
                continue
            token = secrets.token_hex(16)
            # atomic, not durable: an expectation outlives no crash (its fetch is gone), so its fsyncs bought nothing
            write_file(self.expected_dir / uid, f"{token} {deadline:.0f}".encode(), sync=False)
            tokens[uid] = token
        return tokens

    def forget(self, uids: Iterable[str]) -> None:
        """The move is over: no more arrivals for ``uids``."""
        for uid in uids:
            if is_valid_uid(uid):
                (self.expected_dir / uid).unlink(missing_ok=True)

    def token(self, uid: str) -> str | None:
        """The token of an outstanding expectation of ``uid``, or None (never asked for, or expired)."""
        if not is_valid_uid(uid):
            return None
        try:
            text = (self.expected_dir / uid).read_text(encoding="ascii")
            token, deadline = text.split()
            if float(deadline) < time.time():
                return None
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return token

    def arrival(self, uid: str, token: str) -> Path:
        """Where the receiver stores ``uid`` for the expectation holding ``token``."""
        return self.directory / f"{uid}.{token}.dcm"

    def arrivals(self) -> Iterator[tuple[str, str, Path]]:
        """(uid, token, path) of every arrival in the spool now, by one directory listing (temp, claimed and other
        files are not arrivals)."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".dcm"):
                continue
            uid, _, token = entry.name[: -len(".dcm")].rpartition(".")
            if uid and token:
                yield uid, token, Path(entry.path)

    def purge(self, *, force: bool = False) -> int:
        """Remove expired markers and stale arrivals, temp and claimed files; at most once a minute unless
        ``force``. Returns how many files were removed."""
        now = time.time()
        if not force and now - self._last_purge < PURGE_INTERVAL:
            return 0
        self._last_purge = now
        removed = 0
        for folder, is_marker in ((self.expected_dir, True), (self.directory, False)):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
                    continue
                if self._stale(entry, now, is_marker):
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        return removed

    def _stale(self, entry: os.DirEntry[str], now: float, is_marker: bool) -> bool:
        if entry.is_symlink():
            return True  # nothing we write is a symlink
        temp = entry.name.startswith((TEMP_PREFIX, "."))
        if is_marker and not temp:
            return self.token(entry.name) is None
        # a temp file may be a marker or an arrival being written right now: only one a killed process left
        # (older than any write takes) is removed; judged by its token, it was unreadable, and its rename failed
        ours = temp or entry.name.endswith(".dcm")
        return ours and entry.stat(follow_symlinks=False).st_mtime < now - STALE_SECONDS
