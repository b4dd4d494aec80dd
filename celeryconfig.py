"""Celery settings for ``celery --config celeryconfig`` run from the repository root (an edge, like workers/).

The engine builds its apps from settings (``trolley_tasks.engine.celery_app.app.make_app``) and reads nothing at
import; this file is for tools that want a plain settings module, so it reads ``$TROLLEY_CONFIG`` and the
``TROLLEY_*`` variables here, once, when imported.
"""

from trolley_tasks.engine.celery_app.celeryconfig import celery_settings
from trolley_tasks.engine.settings import load_settings

globals().update(celery_settings(load_settings()))
