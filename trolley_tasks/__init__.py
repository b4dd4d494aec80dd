"""trolley-tasks: export DICOM cohorts from a PACS.

The library layer (this package, less ``trolley_tasks.engine``) is dicomtrolley's model: searchers, downloaders,
storage and the in-process :class:`~trolley_tasks.trolley.Trolley`. It never imports Celery or Redis; the engine
(``trolley_tasks.engine``) runs the same pieces on Celery workers.
"""

__version__ = "0.1.0"
