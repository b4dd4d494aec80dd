"""trolley-tasks: export DICOM cohorts from a PACS.

The package root names what a script uses most, like httpx's: the object model and queries, the in-process
:class:`Trolley`, and the error tree. Protocols live in :mod:`trolley_tasks.searchers` and
:mod:`trolley_tasks.downloaders`, storage in :mod:`trolley_tasks.storage`.

The library layer (this package, less ``trolley_tasks.engine`` and ``trolley_tasks.cli``) is dicomtrolley's model:
searchers, downloaders, storage and the in-process Trolley. It never imports Celery or Redis (import-linter
contracts in ``make lint``); the engine (``trolley_tasks.engine``) runs the same pieces on Celery workers.
"""

from trolley_tasks.core import (
    DICOMObjectLevels,
    Instance,
    InstanceReference,
    Query,
    QueryLevels,
    Series,
    SeriesReference,
    Study,
    StudyReference,
)
from trolley_tasks.errors import (
    AuthError,
    ConfigurationError,
    DICOMTrolleyError,
    ErrorClass,
    NotFoundError,
    PayloadInvalidError,
    RetrievalError,
    ServerBusyError,
    ServerError,
    TransientNetworkError,
    TrolleyError,
    UsageError,
)
from trolley_tasks.trolley import Trolley

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "ConfigurationError",
    "DICOMObjectLevels",
    "DICOMTrolleyError",
    "ErrorClass",
    "Instance",
    "InstanceReference",
    "NotFoundError",
    "PayloadInvalidError",
    "Query",
    "QueryLevels",
    "RetrievalError",
    "Series",
    "SeriesReference",
    "ServerBusyError",
    "ServerError",
    "Study",
    "StudyReference",
    "TransientNetworkError",
    "Trolley",
    "TrolleyError",
    "UsageError",
    "__version__",
]
