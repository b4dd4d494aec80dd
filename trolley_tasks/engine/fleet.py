"""Read-only views of the fleet for operators: each source's throttle and breaker, queue lengths, live workers.

Nothing here changes a key or sends a task. ``trolley-tasks metrics`` calls it on every Prometheus scrape and
``trolley-tasks workers`` once, both through :class:`~trolley_tasks.engine.api.EngineClient`, so these are the only
places outside the engine's own machinery that look at its Redis keys and at Celery's control channel.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery

from trolley_tasks.engine.breaker import Breaker
from trolley_tasks.engine.models import SourceHealth, WorkerInfo
from trolley_tasks.engine.scheduler import DELAYED_KEY
from trolley_tasks.engine.settings import Settings
from trolley_tasks.engine.throttle import Throttle


def source_health(client: redis.Redis, settings: Settings) -> list[SourceHealth]:
    """Every configured source's throttle and breaker state.

    The throttle and breaker objects are built straight from the profile, not through
    :meth:`~trolley_tasks.engine.settings.Settings.source`: a metrics host needs no PACS secret to read them.
    """
    found = []
    for name, profile in sorted(settings.sources.items()):
        throttle = Throttle(client, name, max_concurrency=profile.max_concurrency)
        breaker = Breaker(
            client,
            name,
            threshold=profile.breaker_threshold,
            max_hold=profile.breaker_max_hold,
            probe_seconds=settings.engine.lease_seconds,
        )
        found.append(
            SourceHealth(
                name=name,
                max_concurrency=profile.max_concurrency,
                effective_concurrency=throttle.effective_limit(),
                slots_in_use=throttle.in_use(),
                breaker=breaker.state(),
                waits=throttle.waits(),
            )
        )
    return found


def broker_queue_lengths(app: Celery) -> dict[str, int]:
    """Messages waiting in each of the engine's broker queues (``app.conf.task_queues``).

    Kombu's passive ``queue_declare`` counts them on Redis (the list and its priority lists) and RabbitMQ alike; a
    queue no producer declared yet holds nothing, and says so with the transport's channel error, read as 0. Each
    queue gets its own channel because RabbitMQ closes a channel on a passive miss. The watchdog's backlog check
    (:func:`~trolley_tasks.engine.celery_app.tasks.broker_backlog`) is the sum of these.
    """
    lengths: dict[str, int] = {}
    with app.connection_for_read() as connection:
        for queue in app.conf.task_queues:
            with connection.channel() as channel:
                try:
                    lengths[queue.name] = int(channel.queue_declare(queue=queue.name, passive=True).message_count)
                except connection.channel_errors:  # never declared yet: nothing in it
                    lengths[queue.name] = 0
    return lengths


def queue_lengths(app: Celery, client: redis.Redis) -> dict[str, int]:
    """The broker queues' lengths, and ``delayed``: parked work in ``trolley:delayed`` (ledger Redis)."""
    return {**broker_queue_lengths(app), "delayed": int(client.zcard(DELAYED_KEY))}


def _describe_task(task: dict[str, Any]) -> str:
    """One line for a task a worker holds: its name and the readable part of its kwargs (no UIDs lists)."""
    kwargs = task.get("kwargs") or {}
    if isinstance(kwargs, str):  # events-side reprs: already the readable form the publisher chose
        return f"{task.get('name', '?')} {kwargs}"
    parts = [f"{key}={kwargs[key]}" for key in ("job", "source", "series") if key in kwargs]
    if isinstance(kwargs.get("instances"), list):
        parts.append(f"instances={len(kwargs['instances'])}")
    return " ".join([str(task.get("name", "?")), *parts])


def live_workers(app: Celery, timeout: float) -> list[WorkerInfo]:
    """The workers that answer Celery's control broadcast within ``timeout`` seconds, by node name.

    Three broadcasts (``stats``, ``active_queues``, ``active``), each waiting the full ``timeout`` for replies: a
    worker busy in a long task still answers, since control messages are handled by its main process.
    """
    inspect = app.control.inspect(timeout=timeout)
    stats = inspect.stats() or {}
    queues = inspect.active_queues() or {}
    active = inspect.active() or {}
    workers = []
    for name in sorted(stats):
        info = stats[name]
        pool = info.get("pool") or {}
        processes = pool.get("max-concurrency") or len(pool.get("processes") or [])
        workers.append(
            WorkerInfo(
                name=name,
                host=name.partition("@")[2] or name,
                pid=int(info.get("pid") or 0),
                processes=int(processes or 0),
                queues=sorted(q.get("name", "") for q in queues.get(name) or []),
                active=[_describe_task(task) for task in active.get(name) or []],
            )
        )
    return workers
