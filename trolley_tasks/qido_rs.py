"""dicomtrolley's ``qido_rs`` module under our package; the implementation is :mod:`trolley_tasks.searchers.qido_rs`."""

from trolley_tasks.searchers.qido_rs import HierarchicalQuery, QidoRS, RelationalQuery

__all__ = ["HierarchicalQuery", "QidoRS", "RelationalQuery"]
