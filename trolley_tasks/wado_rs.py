"""dicomtrolley's ``wado_rs`` module under our package: ``WadoRS`` (images) and ``WadoRSMetaData`` (headers only)
downloaders, and our ``WadoRSMetadata`` searcher, which builds the object tree from the same metadata answers."""

from trolley_tasks.downloaders.wado_rs import WadoRS
from trolley_tasks.downloaders.wado_rs_metadata import WadoRSMetaData
from trolley_tasks.searchers.wado_rs_metadata import WadoRSMetadata

__all__ = ["WadoRS", "WadoRSMetaData", "WadoRSMetadata"]
