"""What every command shares: the global options, the consoles, and the map from errors to exit codes.

Exit codes (httpx's ``_main.py`` is the model: an expected failure is one red line, never a traceback):

====  ==========================================================================================================
0     success; for ``export``: every expected instance is on disk
1     the job ended with failures (a summary table by error class), or the PACS failed a search
2     usage or configuration error: one line on stderr naming what to fix
130   Ctrl-C; a job being waited on is paused first, so nothing is lost
====  ==========================================================================================================
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from trolley_tasks.cli.logs import LEVELS, LOGGER_NAME, scrub, setup_logging
from trolley_tasks.engine.settings import Settings, load_settings
from trolley_tasks.errors import ConfigurationError, RetrievalError, TrolleyError, UsageError

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger(f"{LOGGER_NAME}.cli")

console = Console()
"""Results (tables, CSV, JSON) go to stdout, so they can be piped."""
err_console = Console(stderr=True)
"""Progress, notices and errors go to stderr."""

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        metavar="PATH",
        help="Configuration file. Default: $TROLLEY_CONFIG, ./trolley.toml, ~/.config/trolley/trolley.toml.",
        show_default=False,
        dir_okay=False,
    ),
]
LogLevelOption = Annotated[
    str,
    typer.Option(
        "--log-level",
        metavar="LEVEL",
        help=f"Log level of the 'trolley' logger: {', '.join(LEVELS)}.",
        case_sensitive=False,
    ),
]
LogJsonOption = Annotated[bool, typer.Option("--log-json", help="Log JSON lines instead of text (stderr).")]


class CliUsageError(UsageError):
    """A command line that cannot work (contradictory or missing options), found before anything is done."""


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``message`` as one red line on stderr; return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(scrub(message))}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def notice(message: str) -> None:
    """One dim line on stderr for the person at the terminal (not a log record)."""
    err_console.print(escape(message), style="dim", soft_wrap=True, highlight=False)


def start(config: Path | None, log_level: str, log_json: bool) -> Settings:
    """Configure logging, then load the settings. Every command starts here."""
    if log_level.lower() not in LEVELS:
        raise CliUsageError(f"--log-level must be one of {', '.join(LEVELS)}, not {log_level!r}")
    setup_logging(log_level, log_json)
    settings = load_settings(config)
    log.debug("configuration from %s", settings.config_path or "environment only")
    return settings


P = ParamSpec("P")
R = TypeVar("R")


def handles_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn the error tree into exit codes and one-line messages (see the module docstring)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (ConfigurationError, UsageError) as exc:
            log.debug("refused: %s", exc)
            raise fail(str(exc), EXIT_USAGE) from None
        except RetrievalError as exc:
            raise fail(f"{exc} [{exc.error_class.value}]", EXIT_FAILURES) from None
        except TrolleyError as exc:
            raise fail(str(exc), EXIT_FAILURES) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", style="yellow")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def human_bytes(size: float) -> str:
    """``526.3 MB``: decimal units, as file managers show sizes."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
