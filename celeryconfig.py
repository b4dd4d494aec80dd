"""Celery settings for ``celery -A trolley_tasks.engine.celery_app.app`` run from the repository root.

The settings live in :mod:`trolley_tasks.engine.celery_app.celeryconfig`, so an installed package works without the repository
on ``sys.path``; this file only re-exports them (issue 2 asks for a top-level ``celeryconfig.py``).
"""

from trolley_tasks.engine.celery_app.celeryconfig import *  # noqa: F403
