"""Build a source profile's searcher and downloader, the way a worker process does: once, then reuse.

A task message names a profile (``"orthanc"``); each worker resolves that name against its own configuration and
builds its clients here. So URLs, AE titles and credentials never travel in messages, and HTTP sessions and DIMSE
associations live as long as the worker process.

Protocol modules are imported only when a profile uses them, so a WADO-RS worker never loads pynetdicom.

A profile is a ``[sources.NAME]`` table of the configuration (:class:`SourceProfile`): which protocols, where, how
to authenticate (secrets by variable or file *name* only), and how gently. The models validate everything a profile
says when the file is read, so a mistake is one line naming the key, never a failure at 3 a.m. in a worker.
"""

from trolley_tasks.profiles.build import (
    auth_from_config,
    build_downloader,
    build_receiver,
    build_searcher,
    session_for_profile,
)
from trolley_tasks.profiles.models import (
    AuthConfig,
    DownloaderName,
    RetryOverride,
    SearcherName,
    SourceProfile,
    check_secrets_present,
    parse_rate,
    parse_window,
)

__all__ = [
    "AuthConfig",
    "DownloaderName",
    "RetryOverride",
    "SearcherName",
    "SourceProfile",
    "auth_from_config",
    "build_downloader",
    "build_receiver",
    "build_searcher",
    "check_secrets_present",
    "parse_rate",
    "parse_window",
    "session_for_profile",
]
