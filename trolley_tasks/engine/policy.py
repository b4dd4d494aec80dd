"""The retry policy: ONE table mapping each :class:`~trolley_tasks.errors.ErrorClass` to what a worker does.

The error tree (:mod:`trolley_tasks.errors`) says *what kind* of failure happened; this table says *what to do about
it*. Nothing else in the engine decides retries, so the whole behaviour is readable in :data:`DEFAULT_POLICY`:

================  =======  =========  ===========  ==================================================================
class             action   attempts   delay cap    notes
================  =======  =========  ===========  ==================================================================
transient         retry    8          60 s         equal-jitter backoff; 2 quick retries inside the fetch (tenacity)
timeout           retry    8          300 s        like transient with a longer cap; no quick retry (it was slow)
server-busy       retry    8          300 s        honour Retry-After; shrink the source's concurrency (AIMD);
                                                   counts against the budget at most once a minute
server-error      retry    4          120 s        backoff
payload-invalid   retry    3          10 s         retry twice, then fail; the bad bytes stay in .trolley/quarantine/
not-found         fail     1          -            no retry: the PACS does not have it
auth              pause    -          -            pause the whole job until someone resumes it
request-rejected  fail     1          -            retrying the same request cannot help
configuration     pause    -          -            a worker without the profile or its secret: pause, do not fail
================  =======  =========  ===========  ==================================================================

``max_attempts`` counts every try, the first included. A profile can override any field per class in its
``[sources.NAME.retry]`` table (see :func:`policy_with_overrides`).

Waits shorter than a second happen inside the fetch (tenacity, ``quick_retries``); longer waits park the instances in
Redis until due (:mod:`~trolley_tasks.engine.scheduler`), so a waiting instance never holds a worker process. Errors
that say the *source* is unwell (transient, timeout, busy) also go to the source's breaker
(:mod:`~trolley_tasks.engine.breaker`), which holds the whole source instead of spending every instance's budget.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from trolley_tasks.errors import ConfigurationError, ErrorClass, TrolleyError


class Action(StrEnum):
    """What happens to an instance after an error."""

    RETRY = "retry"
    """Try again after a backoff delay, until ``max_attempts`` tries were made; then fail."""
    FAIL = "fail"
    """Fail the instance now; the failure record keeps the error class and message."""
    PAUSE_JOB = "pause"
    """Pause the whole job: every other instance would hit the same wall (credentials, configuration)."""


@dataclass(frozen=True)
class Decision:
    """How the engine handles one error class.

    Parameters
    ----------
    action
        Retry, fail the instance, or pause the job.
    max_attempts
        Tries in all (the first included) before a retried instance fails.
    base_delay, max_delay
        Backoff: attempt ``n`` waits a uniformly random time in ``[c/2, c]`` with ``c = min(max_delay,
        base_delay * 2**(n-1))`` ("equal jitter"): it spreads the retries of many workers instead of synchronising
        them, and never comes back at once (full jitter, from 0, let a median instance survive only 16 s of
        "connection refused").
    quick_retries
        Immediate retries inside the same fetch (tenacity, sub-second waits), for failures that are cheap to retry
        such as a reset keep-alive connection. They count as attempts.
    honour_retry_after
        Wait at least what the server asked for (HTTP ``Retry-After``, RFC 9110 10.2.3).
    shrink_concurrency
        Halve the source's effective concurrency (AIMD, :mod:`trolley_tasks.engine.throttle`).
    budget_interval
        When set, at most one attempt is counted per this many seconds: a server that is merely busy for an hour
        must not exhaust the budget of a patient overnight export.

    The bytes of an invalid payload are kept in quarantine by the storage layer whatever the decision: that is not
    a choice of the retry table.
    """

    action: Action
    max_attempts: int = 1
    base_delay: float = 1.0
    max_delay: float = 60.0
    quick_retries: int = 0
    honour_retry_after: bool = False
    shrink_concurrency: bool = False
    budget_interval: float | None = None

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before try ``attempt + 1``, after ``attempt`` tries failed (equal jitter)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(0, attempt - 1))
        wait = (rng or random).uniform(ceiling / 2, ceiling)
        if self.honour_retry_after and retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay))
        return wait

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` tries used up the budget (or the action never retries)."""
        return self.action is not Action.RETRY or attempts >= self.max_attempts


DEFAULT_POLICY: Mapping[ErrorClass, Decision] = {
    ErrorClass.TRANSIENT: Decision(Action.RETRY, max_attempts=8, base_delay=1.0, max_delay=60.0, quick_retries=2),
    ErrorClass.TIMEOUT: Decision(Action.RETRY, max_attempts=8, base_delay=2.0, max_delay=300.0),
    ErrorClass.SERVER_BUSY: Decision(
        Action.RETRY,
        max_attempts=8,
        base_delay=5.0,
        max_delay=300.0,
        honour_retry_after=True,
        shrink_concurrency=True,
        budget_interval=60.0,
    ),
    ErrorClass.SERVER_ERROR: Decision(Action.RETRY, max_attempts=4, base_delay=2.0, max_delay=120.0),
    ErrorClass.PAYLOAD_INVALID: Decision(Action.RETRY, max_attempts=3, base_delay=1.0, max_delay=10.0),
    ErrorClass.NOT_FOUND: Decision(Action.FAIL),
    ErrorClass.AUTH: Decision(Action.PAUSE_JOB),
    ErrorClass.REQUEST_REJECTED: Decision(Action.FAIL),
    ErrorClass.CONFIGURATION: Decision(Action.PAUSE_JOB),
}
"""The defaults of DESIGN.md, "The error tree decides retries"."""

_FIELDS = {f.name for f in fields(Decision)}


class Policy:
    """The table in force for one source profile: the defaults with that profile's overrides applied."""

    def __init__(self, table: Mapping[ErrorClass, Decision] = DEFAULT_POLICY) -> None:
        missing = set(ErrorClass) - set(table)
        if missing:
            raise ConfigurationError(f"retry policy has no decision for {sorted(missing)}")
        self.table: dict[ErrorClass, Decision] = dict(table)

    def decide(self, error: BaseException) -> tuple[ErrorClass, Decision]:
        """The class and decision for ``error``. An exception outside the error tree is a bug in our code or a
        library's: it fails the instance now (retrying a bug eight times only hides it)."""
        if isinstance(error, TrolleyError):
            return error.error_class, self.table[error.error_class]
        return ErrorClass.REQUEST_REJECTED, Decision(Action.FAIL)

    def __getitem__(self, error_class: ErrorClass) -> Decision:
        return self.table[error_class]


def policy_with_overrides(overrides: Mapping[Any, Any] | None, *, where: str = "retry") -> Policy:
    """The default table with per-class overrides, as a profile's ``[sources.NAME.retry]`` gives them.

    ``overrides`` maps an error class (or its name) to the fields to change, as a mapping or as the config's
    ``RetryOverride`` model (its unset fields keep the default), for example::

        [sources.pacs.retry.transient]
        max_attempts = 12
        max_delay = 120
        [sources.pacs.retry.not-found]      # a PACS that is still ingesting
        action = "retry"
        max_attempts = 3

    Raises
    ------
    ConfigurationError
        For an unknown error class, an unknown field, or a value of the wrong type, naming ``where`` and the key.
    """
    table = dict(DEFAULT_POLICY)
    for name, given in (overrides or {}).items():
        changes = given.model_dump(exclude_none=True) if isinstance(given, BaseModel) else given
        try:
            error_class = ErrorClass(str(name).replace("_", "-"))
        except ValueError:
            known = ", ".join(c.value for c in ErrorClass)
            raise ConfigurationError(f"{where}: unknown error class {name!r} (known: {known})") from None
        if not isinstance(changes, Mapping):
            raise ConfigurationError(f"{where}.{name}: expected a table of fields, got {changes!r}")
        unknown = sorted(set(changes) - _FIELDS)
        if unknown:
            raise ConfigurationError(f"{where}.{name}: unknown field(s) {unknown} (known: {sorted(_FIELDS)})")
        values = dict(changes)
        try:
            if "action" in values:
                values["action"] = Action(values["action"])
            for key in ("max_attempts", "quick_retries"):
                if key in values:
                    values[key] = int(values[key])
                    if values[key] < 0:
                        raise ValueError(f"{key} must be >= 0")
            for key in ("base_delay", "max_delay", "budget_interval"):
                if key in values and values[key] is not None:
                    values[key] = float(values[key])
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}.{name}: {exc}") from None
        table[error_class] = replace(table[error_class], **values)
    return Policy(table)
