"""Storage: where verified instances go on disk.

- :mod:`~trolley_tasks.storage.layouts`: DICOM attributes to a safe relative path (templates);
- :mod:`~trolley_tasks.storage.durable`: the one atomic, durable writer (temp file, fsync, rename, directory fsync);
- :mod:`~trolley_tasks.storage.disk`: the storage classes dicomtrolley users know (``StorageDir``, ``FlatStorageDir``,
  with dicomtrolley's file names), ours (``DcmStorageDir``, ``FlatDcmStorageDir``) and the template storage, which
  check each instance's identity and quarantine what is not the instance asked for;
- :mod:`~trolley_tasks.storage.placement`: the last step, a checked file under its final name;
- :mod:`~trolley_tasks.storage.writable`: :func:`make_writable`, for datasets that did not come from a file.
"""

from trolley_tasks.storage.disk import (
    DcmStorageDir,
    DICOMDiskStorage,
    FlatDcmStorageDir,
    FlatStorageDir,
    QuarantinedPayloadError,
    SaveResult,
    StorageDir,
    TemplateStorage,
)
from trolley_tasks.storage.writable import make_writable

__all__ = [
    "DICOMDiskStorage",
    "DcmStorageDir",
    "FlatDcmStorageDir",
    "FlatStorageDir",
    "QuarantinedPayloadError",
    "SaveResult",
    "StorageDir",
    "TemplateStorage",
    "make_writable",
]
