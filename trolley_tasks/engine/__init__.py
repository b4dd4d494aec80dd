"""The distributed export engine: the only package of trolley-tasks that imports Celery and redis-py.

- :mod:`~trolley_tasks.engine.api`: the one door, :class:`~trolley_tasks.engine.api.EngineClient` (submit, status,
  pause, resume, cancel, retry-failed, report) and :func:`~trolley_tasks.engine.api.open_engine`.
- :mod:`~trolley_tasks.engine.settings`: the configuration (profiles, broker, Flower), read when asked, never at
  import.
- :mod:`~trolley_tasks.engine.producer`: cohort -> job in the ledger -> one expansion message per row.
- :mod:`~trolley_tasks.engine.expand` and :mod:`~trolley_tasks.engine.fetch`: the task bodies, as plain functions;
  :mod:`~trolley_tasks.engine.dispatch`: the one place that cuts a series into fetch messages.
- :mod:`~trolley_tasks.engine.ledger`: per-job and per-instance state in Redis (Lua transitions).
- :mod:`~trolley_tasks.engine.policy`: the retry table, one decision per error class;
  :mod:`~trolley_tasks.engine.throttle`: per-source concurrency, rate and time window across hosts.
- :mod:`~trolley_tasks.engine.celery_app`: ``make_app(settings)``, its Celery settings, the thin tasks, messages.
- :mod:`~trolley_tasks.engine.embedded`: a private Redis and local workers when no broker is configured;
  :mod:`~trolley_tasks.engine.receiver`: the C-MOVE receiver of a worker host; :mod:`~trolley_tasks.engine.report`.

See docs/engine.md and docs/architecture.md.
"""
