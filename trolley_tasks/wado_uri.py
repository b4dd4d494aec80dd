"""dicomtrolley's ``wado_uri`` module under our package.

The implementation is :mod:`trolley_tasks.downloaders.wado_uri`.
"""

from trolley_tasks.downloaders.wado_uri import WadoURI

__all__ = ["WadoURI"]
