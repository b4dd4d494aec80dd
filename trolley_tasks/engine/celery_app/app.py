"""The Celery app of trolley-tasks: ``celery -A trolley_tasks.engine.celery_app.app worker``.

Its settings come from :mod:`trolley_tasks.engine.celery_app.celeryconfig`, which reads the environment
(``TROLLEY_CONFIG``,
``TROLLEY_BROKER__URL``, ``TROLLEY_BROKER__LEDGER_URL``); the tasks are in :mod:`trolley_tasks.engine.celery_app.tasks`.
"""

from __future__ import annotations

from celery import Celery

app = Celery("trolley_tasks", include=["trolley_tasks.engine.celery_app.tasks"])
app.config_from_object("trolley_tasks.engine.celery_app.celeryconfig")


def get_app() -> Celery:
    """The process's app (configured from the environment when first used)."""
    return app
