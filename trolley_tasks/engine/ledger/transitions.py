"""The words of the ledger's transitions: what a fetch tells :meth:`~.ledger.Ledger.settle` about each instance, and
what :meth:`~.ledger.Ledger.claim` answers (the Lua scripts of :mod:`.lua` use the one-letter codes)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from trolley_tasks.engine.models import Exclusion, Failure


class Outcome(StrEnum):
    """What a fetch did with one instance, for :meth:`Ledger.settle` (the Lua scripts use the one-letter codes)."""

    DONE = "d"
    """Fetched and stored."""
    SKIPPED = "s"
    """Found on disk, valid, not fetched."""
    FAILED = "f"
    """Failed for good; the failure record says why."""
    EXCLUDED = "e"
    """Left out on purpose (:class:`~trolley_tasks.deid.ExcludedByProfile`): no longer expected; ``exclusion``
    says why."""
    PENDING = "p"
    """Back to pending: the caller re-queues it."""


class ClaimCode(StrEnum):
    """The ledger's answer for one instance a fetch wants to work on (see :meth:`Ledger.claim`)."""

    CLAIMED = "c"
    """Yours, under a lease, until you settle it."""
    TERMINAL = "t"
    """Done, skipped or failed already: nothing to do."""
    HELD = "h"
    """Another live fetch holds it (a duplicate message): leave it."""
    POISON = "x"
    """Redelivered too often (its worker kept dying): failed now."""
    UNKNOWN = "u"
    """Not an instance of this job (an expired or foreign message)."""


@dataclass(frozen=True)
class Settled:
    """One instance's outcome of a fetch, for :meth:`Ledger.settle`."""

    instance_uid: str
    outcome: Outcome
    attempts: int
    busy_counted_at: float = 0.0
    size: int = 0
    path: str = ""
    failure: Failure | None = None
    exclusion: Exclusion | None = None


@dataclass(frozen=True)
class Stored:
    """A done (or skipped) instance as the ledger recorded it: where its file is, relative to the output."""

    instance_uid: str
    size: int
    path: str


@dataclass(frozen=True)
class Expansion:
    """What :meth:`Ledger.expand` says about a series' instances."""

    publish: list[str]
    """Pending (new, or under a lapsed lease): to publish now."""
    stored: list[Stored]
    """Done or skipped already: the caller looks for their files (a re-run fetches again what left the output)."""


@dataclass(frozen=True)
class Claim:
    """The ledger's answer to a fetch that wants to work on some instances."""

    job_state: str
    finalized: bool
    lease: str
    """The claim's token: the lease written into every claimed record, which only this claim can renew."""
    codes: dict[str, tuple[ClaimCode, int, float]]
    """uid -> (code, attempts so far, busy_counted_at)."""

    def with_code(self, code: ClaimCode) -> list[str]:
        return [uid for uid, (c, _, _) in self.codes.items() if c == code]
