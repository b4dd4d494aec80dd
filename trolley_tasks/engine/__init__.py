"""The distributed export engine: the only package of trolley-tasks that imports Celery and redis-py.

- :mod:`~trolley_tasks.engine.api`: what callers use (submit_export, job_status, pause, resume, cancel, ...).
- :mod:`~trolley_tasks.engine.producer` and :mod:`~trolley_tasks.cohort`: cohort -> rows -> expansion tasks.
- :mod:`~trolley_tasks.engine.expand` and :mod:`~trolley_tasks.engine.fetch`: the task bodies, as plain functions.
- :mod:`~trolley_tasks.engine.ledger.ledger`: per-job and per-instance state in Redis (Lua transitions).
- :mod:`~trolley_tasks.engine.policy`: the retry table, one decision per error class.
- :mod:`~trolley_tasks.engine.throttle`: per-source concurrency, rate and time window across hosts.
- :mod:`~trolley_tasks.engine.celery_app.app`, :mod:`~trolley_tasks.engine.celery_app.tasks`,
:mod:`~trolley_tasks.engine.celery_app.celeryconfig`.

See docs/engine.md.
"""
