"""The Celery app of trolley-tasks, built from settings: :func:`make_app`.

``trolley-tasks worker`` loads its settings and runs ``make_app(settings).worker_main(...)``; the engine client
(:mod:`trolley_tasks.engine.api`) builds one app per client to publish. No app exists at import time, and importing
this module reads nothing.

For operators who prefer Celery's own command (``celery -A trolley_tasks.engine.celery_app.app worker``), the module
attribute ``app`` is built on first access from :func:`~trolley_tasks.engine.settings.load_settings`, which reads
``$TROLLEY_CONFIG`` and the ``TROLLEY_*`` variables (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from trolley_tasks.engine.celery_app.celeryconfig import celery_settings
from trolley_tasks.engine.celery_app.tasks import register_tasks
from trolley_tasks.engine.settings import Settings, load_settings

_lazy: Celery | None = None


def make_app(settings: Settings) -> Celery:
    """A Celery app on ``settings``' broker, with the engine's tasks registered and ``settings`` attached
    (``app.trolley_settings``), which each worker process uses to build its clients."""
    app = Celery("trolley_tasks", set_as_current=False)
    app.conf.update(celery_settings(settings))
    app.trolley_settings = settings
    register_tasks(app)
    return app


def settings_of(app: Celery) -> Settings:
    """The settings :func:`make_app` attached to ``app``."""
    settings: Settings = app.trolley_settings
    return settings


def __getattr__(name: str) -> Any:
    global _lazy
    if name == "app":
        if _lazy is None:
            _lazy = make_app(load_settings())
        return _lazy
    raise AttributeError(name)
