"""Publishing engine messages through Celery: by task name, so the producer never imports the task modules."""

from __future__ import annotations

from celery import Celery

from trolley_tasks.engine.context import FetchMessage

FETCH = "trolley.fetch"
EXPAND = "trolley.expand_study"


class CeleryPublisher:
    """The :class:`~trolley_tasks.engine.context.Publisher` of production: one Celery message per call."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def fetch(self, message: FetchMessage, countdown: float = 0.0) -> None:
        self.app.send_task(FETCH, kwargs=message.kwargs(), countdown=countdown or None)

    def expand(self, job: str, source: str, row: str, attempt: int = 1, countdown: float = 0.0) -> None:
        kwargs = {"job": job, "source": source, "row": row, "attempt": attempt}
        self.app.send_task(EXPAND, kwargs=kwargs, countdown=countdown or None)
