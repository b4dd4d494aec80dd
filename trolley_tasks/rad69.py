"""dicomtrolley's ``rad69`` module under our package; the implementation is :mod:`trolley_tasks.downloaders.rad69`."""

from trolley_tasks.downloaders.rad69 import Rad69, XDSMissingDocumentError

__all__ = ["Rad69", "XDSMissingDocumentError"]
