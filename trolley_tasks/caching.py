"""dicomtrolley's ``caching`` module under our package; the implementation is :mod:`trolley_tasks.searchers.caching`."""

from trolley_tasks.searchers.caching import CachedSearcher, DICOMObjectCache, NodeNotFound

__all__ = ["CachedSearcher", "DICOMObjectCache", "NodeNotFound"]
