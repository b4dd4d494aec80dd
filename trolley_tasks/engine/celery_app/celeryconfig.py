"""Celery settings of the engine, as a function of the :class:`~trolley_tasks.engine.settings.Settings`.

Nothing here reads a file or the environment: :func:`celery_settings` turns settings already loaded into Celery's
configuration, and :func:`~trolley_tasks.engine.celery_app.app.make_app` applies it to an app.

Where the app finds its broker and its ledger
---------------------------------------------

- ``TROLLEY_BROKER__URL`` (or ``[broker] url`` in the file named by ``TROLLEY_CONFIG``): the Celery broker,
  ``redis://host:6379/0``, ``redis+socket:///path/redis.sock`` or ``amqp://user@host:5672//`` (RabbitMQ). Without
  one, ``redis://127.0.0.1:6379/0``.
- ``TROLLEY_BROKER__LEDGER_URL`` (or ``[broker] ledger_url``): the Redis that holds the ledger and the throttle.
  It defaults to the broker's URL when the broker is a Redis; a RabbitMQ broker needs it set.
- ``[broker] visibility_timeout`` (``TROLLEY_BROKER__VISIBILITY_TIMEOUT``, seconds, default 7200): see below.

Why each setting
----------------
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged after its task ran, and given back
  to the queue when the process running it dies; the ledger makes the second delivery harmless.
- ``worker_prefetch_multiplier = 1``: a worker process reserves one message at a time, so a slow batch never
  strands others behind it.
- ``task_ignore_result``, no result backend: state lives in the ledger; results would only fill Redis.
- JSON only: messages hold UIDs, a job id and a profile name, nothing that needs pickle.
- Explicit dotted task names (``trolley.expand_study``, ``trolley.fetch``) and two queues, ``trolley.expand`` and
  ``trolley.fetch``, so operators can give fetches their own workers.
- ``visibility_timeout`` (Redis): an unacknowledged message is redelivered after this long. It must exceed the
  longest task (``task_time_limit``, 20 min) plus the longest countdown (retry delays and window holds are capped at
  10 min); 2 h leaves room. With RabbitMQ, its ``consumer_timeout`` (30 min by default) plays this role.
- Task events on (``worker_send_task_events``, ``task_send_sent_event``) for Flower.
"""

from __future__ import annotations

from typing import Any

from kombu import Queue

from trolley_tasks.engine.settings import DEFAULT_BROKER, Settings


def celery_settings(settings: Settings) -> dict[str, Any]:
    """Every Celery setting of the engine for ``settings`` (no broker configured: :data:`DEFAULT_BROKER`)."""
    return {
        "broker_url": settings.broker.url or DEFAULT_BROKER,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.broker.visibility_timeout},
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.engine.task_time_limit,
        "task_soft_time_limit": settings.engine.task_time_limit - min(60, settings.engine.task_time_limit // 4),
        "task_default_queue": "trolley.fetch",
        "task_queues": (Queue("trolley.fetch"), Queue("trolley.expand")),
        "task_routes": {
            "trolley.fetch": {"queue": "trolley.fetch"},
            "trolley.expand_study": {"queue": "trolley.expand"},
            "trolley.finalize": {"queue": "trolley.expand"},
        },
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
    }
