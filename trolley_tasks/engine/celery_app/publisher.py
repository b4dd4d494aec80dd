"""The :class:`~trolley_tasks.engine.messages.Publisher` of production: Celery messages, sent by task name."""

from __future__ import annotations

from celery import Celery

from trolley_tasks.engine.messages import EXPAND, FETCH, FINALIZE, FetchMessage


class CeleryPublisher:
    """One Celery message per call, sent now. Deferred work never reaches this class as a countdown: the engine
    parks it in Redis (:class:`~trolley_tasks.engine.scheduler.DeferringPublisher`), so no worker holds ETA tasks."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def fetch(self, message: FetchMessage, countdown: float = 0.0) -> None:
        self._now(countdown)
        kwargs = message.kwargs()
        # what task events (Flower) show: the batch's size, not its UID list, which can be hundreds of UIDs long
        shown = dict(kwargs, instances=len(message.instances))
        self.app.send_task(FETCH, kwargs=kwargs, kwargsrepr=repr(shown))

    def expand(self, job: str, source: str, row: str, attempt: int = 1, countdown: float = 0.0) -> None:
        self._now(countdown)
        self.app.send_task(EXPAND, kwargs={"job": job, "source": source, "row": row, "attempt": attempt})

    def finalize(self, job: str) -> None:
        self.app.send_task(FINALIZE, kwargs={"job": job})

    @staticmethod
    def _now(countdown: float) -> None:
        if countdown > 0:
            raise ValueError("CeleryPublisher sends now; deferred work goes through DeferringPublisher")
