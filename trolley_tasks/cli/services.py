"""``trolley-tasks worker`` and ``trolley-tasks flower``: long-running services on the engine's Celery app.

Both run Celery in this process (``app.worker_main``, ``app.start``) on an app made from the configuration this
command read (:func:`~trolley_tasks.engine.celery_app.app.make_app`), so the worker's processes see the same
profiles. Nothing secret is ever put on a command line: Flower's password travels in ``FLOWER_BASIC_AUTH``, an
environment variable Flower reads itself, so ``ps`` shows no password.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from trolley_tasks.cli.common import CliUsageError, handles_errors, log
from trolley_tasks.cli.common import start as start_command
from trolley_tasks.engine.celery_app.app import make_app
from trolley_tasks.engine.settings import FlowerConfig, Settings
from trolley_tasks.errors import MissingCredentialError


def require_broker(settings: Settings, command: str) -> str:
    """The broker URL; CliUsageError naming where to set it when there is none."""
    if not settings.broker.url:
        where = settings.config_path or "the configuration"
        raise CliUsageError(
            f"'{command}' needs a broker: set [broker] url in {where} or TROLLEY_BROKER__URL "
            "(without one, 'export' runs its own workers in embedded mode)"
        )
    return settings.broker.url


def _engine_app(settings: Settings, command: str) -> Any:
    """The engine's Celery app on ``settings``' broker (CliUsageError when there is none)."""
    require_broker(settings, command)
    return make_app(settings)


@handles_errors
def worker(
    ctx: typer.Context,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-C", min=0, metavar="N", help="Worker processes; 0: the CPU count.")
    ] = 0,
    queues: Annotated[
        str, typer.Option("--queues", "-Q", metavar="LIST", help="Comma-separated queues; default: all of ours.")
    ] = "",
    loglevel: Annotated[str, typer.Option("--loglevel", "-l", metavar="LEVEL", help="Celery's log level.")] = "info",
    hostname: Annotated[
        str, typer.Option("--hostname", "-n", metavar="NAME", help="Node name, for example w1@%h.")
    ] = "",
    logfile: Annotated[
        str, typer.Option("--logfile", metavar="PATH", help="Write the worker's log here instead of stderr.")
    ] = "",
) -> None:
    """Start a Celery worker with trolley-tasks' engine app and configuration (runs until stopped).

    Example:

    \b
        TROLLEY_BROKER__URL=redis://pacs-gw:6379/0 trolley-tasks worker --concurrency 4
    """
    settings = start_command(ctx)
    app = _engine_app(settings, "worker")
    argv = ["worker", f"--loglevel={loglevel}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if queues:
        argv.append(f"--queues={queues}")
    if hostname:
        argv.append(f"--hostname={hostname}")
    if logfile:
        argv.append(f"--logfile={logfile}")
    log.info("worker on %s with %s", _redacted(settings.broker.url or ""), " ".join(argv[1:]))
    app.worker_main(argv)


def _redacted(url: str) -> str:
    from trolley_tasks.cli.logs import scrub

    return scrub(url)


def flower_password(flower: FlowerConfig) -> str | None:
    """Flower's password from the variable or file the config names; None when neither is set.

    A ``password_file`` that is named but missing is an error: the user asked for authentication.
    """
    if flower.password_file is not None:
        if not Path(flower.password_file).is_file():
            raise MissingCredentialError(f"[flower] password_file: no file at {flower.password_file}")
        return Path(flower.password_file).read_text().strip()
    if flower.password_env and os.environ.get(flower.password_env):
        return os.environ[flower.password_env]
    return None


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@handles_errors
def flower(
    ctx: typer.Context,
    address: Annotated[
        str, typer.Option("--address", metavar="HOST", help="Listen address; default from [flower], 127.0.0.1.")
    ] = "",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="Port; default from [flower], 5555.")
    ] = 0,
) -> None:
    """Start Flower (the Celery web monitor) on trolley-tasks' app, with basic auth from the config.

    The password comes from the variable named by [flower] password_env (default FLOWER_PASSWORD) or from
    password_file, or from FLOWER_BASIC_AUTH itself. Flower refuses to listen beyond 127.0.0.1 without one.

    Example:

    \b
        FLOWER_PASSWORD=... trolley-tasks flower --port 5555
    """
    settings = start_command(ctx)
    require_broker(settings, "flower")
    listen = address or settings.flower.address
    listen_port = port or settings.flower.port
    password = flower_password(settings.flower)
    if password:
        # Flower reads FLOWER_* variables as its options: the password never appears in an argv
        os.environ["FLOWER_BASIC_AUTH"] = f"{settings.flower.username}:{password}"
    authenticated = bool(os.environ.get("FLOWER_BASIC_AUTH"))
    if not authenticated and not is_loopback(listen):
        raise MissingCredentialError(
            f"[flower] refusing to serve Flower on {listen} without a password: set {settings.flower.password_env} "
            "(or [flower] password_file), or listen on 127.0.0.1"
        )
    if not authenticated:
        log.warning(
            "Flower on %s:%s without authentication (set %s to require one)",
            listen,
            listen_port,
            settings.flower.password_env,
        )
    log.info("Flower on http://%s:%s", listen, listen_port)
    app = _engine_app(settings, "flower")
    app.start(["flower", f"--address={listen}", f"--port={listen_port}"])
