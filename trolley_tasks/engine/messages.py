"""What the engine's tasks carry, and where its functions send them.

A message names the job, the source profile and UIDs: never a URL, a credential or patient data. The task names are
explicit and dotted, so producers publish by name without importing the task modules, and operators can route them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

FETCH = "trolley.fetch"
EXPAND = "trolley.expand_study"
FINALIZE = "trolley.finalize"


@dataclass(frozen=True)
class FetchMessage:
    """A fetch task's arguments: a batch of instances of ONE series, the job and the source profile's name."""

    job: str
    source: str
    study: str
    series: str
    instances: tuple[str, ...]

    def kwargs(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "source": self.source,
            "study": self.study,
            "series": self.series,
            "instances": list(self.instances),
        }

    def with_instances(self, uids: Iterable[str]) -> FetchMessage:
        return FetchMessage(self.job, self.source, self.study, self.series, tuple(uids))


class Publisher(Protocol):
    """Where the engine's functions send follow-up work (Celery in production, a list in unit tests)."""

    def fetch(self, message: FetchMessage, countdown: float = 0.0) -> None: ...

    def expand(self, job: str, source: str, row: str, attempt: int = 1, countdown: float = 0.0) -> None: ...

    def finalize(self, job: str) -> None: ...
