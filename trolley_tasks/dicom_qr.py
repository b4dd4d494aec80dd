"""dicomtrolley's ``dicom_qr`` module under our package: the C-FIND searcher and its query.

The implementation is :mod:`trolley_tasks.searchers.dicom_qr`; our C-GET and C-MOVE downloaders are in
:mod:`trolley_tasks.downloaders.dicom_qr`. Importing this module loads pynetdicom.
"""

from trolley_tasks.searchers.dicom_qr import DICOMQR, DICOMQuery

__all__ = ["DICOMQR", "DICOMQuery"]
