"""``trolley-tasks workers``: the live fleet, without opening Flower.

The list is whoever answers Celery's control broadcast (``inspect stats``, ``active_queues``, ``active``) within
``--timeout``: a worker that is alive but whose main process is stuck does not answer, and is rightly left out.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from trolley_tasks.cli.common import EXIT_FAILURES, console, handles_errors, notice, start
from trolley_tasks.cli.services import require_broker
from trolley_tasks.engine.api import EngineClient


@handles_errors
def workers(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, metavar="SECONDS", help="How long to wait for replies.")
    ] = 2.0,
) -> None:
    """List the live workers: host, pool processes, queues and the tasks each holds now.

    Exits 1 when no worker answers. Example:

    \b
        trolley-tasks workers --json
    """
    settings = start(ctx)
    require_broker(settings, "workers")
    engine = EngineClient(settings)
    try:
        found = engine.workers(timeout=timeout)
    finally:
        engine.close()
    if as_json:
        console.print_json(json.dumps([item.model_dump(mode="json") for item in found]))
    else:
        table = Table(caption=f"{len(found)} workers", caption_justify="left")
        table.add_column("worker", no_wrap=True)
        table.add_column("pid", no_wrap=True, justify="right")
        table.add_column("procs", no_wrap=True, justify="right")
        table.add_column("queues", overflow="fold")
        table.add_column("tasks in hand", overflow="fold")
        for item in found:
            held = "\n".join(item.active) if item.active else "-"
            table.add_row(item.name, str(item.pid), str(item.processes), ", ".join(item.queues), held)
        console.print(table)
    if not found:
        notice(f"no worker answered within {timeout:g}s")
        raise typer.Exit(EXIT_FAILURES)
