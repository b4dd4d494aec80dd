"""Storage: where verified instances go on disk.

- :mod:`~trolley_tasks.storage.layouts`: DICOM attributes to a safe relative path (templates);
- :mod:`~trolley_tasks.storage.durable`: the one atomic, durable writer (temp file, fsync, rename, directory fsync);
- :mod:`~trolley_tasks.storage.disk`: the storage classes dicomtrolley users know (``StorageDir``, ``FlatStorageDir``)
  and the template storage, which check each instance's identity and quarantine what is not the instance asked for.
"""

from trolley_tasks.storage.disk import (
    DICOMDiskStorage,
    FlatStorageDir,
    QuarantinedPayloadError,
    SaveResult,
    StorageDir,
    TemplateStorage,
)

__all__ = [
    "DICOMDiskStorage",
    "FlatStorageDir",
    "QuarantinedPayloadError",
    "SaveResult",
    "StorageDir",
    "TemplateStorage",
]
