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
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

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

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_LOG_LEVEL = "info"


@dataclass(frozen=True)
class GlobalOptions:
    """What ``--config``, ``--log-level`` and ``--log-json`` said, before the command name, after it, or both.

    ``None`` means "not given here", so that a value given after the command name can override one given before it
    (the nearer one wins) without a default on one side hiding the other.
    """

    config: Path | None = None
    log_level: str | None = None
    log_json: bool = False

    def then(self, nearer: GlobalOptions) -> GlobalOptions:
        """These options, overridden by what ``nearer`` (the command's own) gives."""
        return GlobalOptions(
            config=nearer.config or self.config,
            log_level=nearer.log_level or self.log_level,
            log_json=self.log_json or nearer.log_json,
        )

    @property
    def level(self) -> str:
        return self.log_level or DEFAULT_LOG_LEVEL


GLOBAL_PARAMETERS = (
    inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None,
            typer.Option(
                "--config",
                "-c",
                metavar="PATH",
                help="Configuration file. Default: $TROLLEY_CONFIG, ./trolley.toml, ~/.config/trolley/trolley.toml.",
                show_default=False,
                dir_okay=False,
            ),
        ],
    ),
    inspect.Parameter(
        "log_level",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                "--log-level",
                metavar="LEVEL",
                help=f"Log level of the 'trolley' logger: {', '.join(LEVELS)}. Default: {DEFAULT_LOG_LEVEL}.",
                show_default=False,
            ),
        ],
    ),
    inspect.Parameter(
        "log_json",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[bool, typer.Option("--log-json", help="Log JSON lines instead of text (stderr).")],
    ),
)
"""The global options, declared once. :func:`with_global_options` adds them to the app callback and to every command,
so ``trolley-tasks --config f export ...`` and ``trolley-tasks export ... --config f`` both work (the second is what
users and older docs type)."""


def with_global_options(function: Callable[..., R]) -> Callable[..., R]:
    """``function`` with the :data:`GLOBAL_PARAMETERS` added; what they say is merged into ``ctx.obj``.

    Typer builds a command's options from its signature, so the wrapper's signature is ``function``'s plus the global
    ones; the wrapper takes them out before calling ``function``, which reads them back with :func:`start` or
    :func:`global_options`. On the app callback this records the options given before the command name; on a command,
    those given after it, which win.
    """
    signature = inspect.signature(function, eval_str=True)
    if "ctx" not in signature.parameters:
        raise TypeError(f"{function.__name__} needs a 'ctx: typer.Context' parameter for the global options")
    names = [parameter.name for parameter in GLOBAL_PARAMETERS]

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        given = GlobalOptions(**{name: kwargs.pop(name) for name in names})
        context: typer.Context = kwargs["ctx"]
        context.obj = global_options(context).then(given)
        return function(*args, **kwargs)

    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *GLOBAL_PARAMETERS]
    )
    return wrapper


def option_group(
    name: str, parameters: tuple[inspect.Parameter, ...], build: Callable[..., Any]
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """A decorator: a command's parameter ``name`` becomes the options ``parameters``, and ``build(**values)`` of what
    they say is what the command receives as ``name``.

    Typer makes options from a function's signature, so the wrapper's signature has ``parameters`` spread out where
    ``name`` was: a group of options (the search filters) is declared once and shared by several commands, and its
    options keep their place in ``--help``.
    """
    names = [parameter.name for parameter in parameters]

    def decorate(function: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(function, eval_str=True)
        spread: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            spread.extend(parameters if parameter.name == name else (parameter,))
        if len(spread) == len(signature.parameters):
            raise TypeError(f"{function.__name__} has no parameter {name!r} for the options {', '.join(names)}")

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            kwargs[name] = build(**{option: kwargs.pop(option) for option in names})
            return function(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=spread)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def global_options(context: typer.Context) -> GlobalOptions:
    """The global options in effect for this command (given before its name, after it, or neither)."""
    found = context.find_object(GlobalOptions)
    return found if found is not None else GlobalOptions()


class CliUsageError(UsageError):
    """A command line that cannot work (contradictory or missing options), found before anything is done."""


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``message`` as one red line on stderr; return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(scrub(message))}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def notice(message: str) -> None:
    """One dim line on stderr for the person at the terminal (not a log record)."""
    err_console.print(escape(message), style="dim", soft_wrap=True, highlight=False)


def start(context: typer.Context) -> Settings:
    """Configure logging and load the settings, as the global options say. Every command starts here."""
    options = global_options(context)
    if options.level.lower() not in LEVELS:
        raise CliUsageError(f"--log-level must be one of {', '.join(LEVELS)}, not {options.level!r}")
    setup_logging(options.level, options.log_json)
    settings = load_settings(options.config)
    log.debug("configuration from %s", settings.config_path or "environment only")
    return settings


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
