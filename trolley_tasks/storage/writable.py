"""Make a dataset that did not come from a file (WADO-RS metadata, a C-FIND answer) writable as a Part 10 file.

``Dataset.save_as(..., enforce_file_format=True)`` needs file meta (PS3.10 7.1), which such datasets lack, and
pydicom cannot write an element whose VR is UN but whose value was decoded from JSON into something else.
"""

from __future__ import annotations

import logging

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

logger = logging.getLogger("trolley.storage")


def make_writable(dataset: Dataset) -> Dataset:
    """Give ``dataset`` file meta for Explicit VR Little Endian and drop UN elements whose value is not bytes or
    text; returns the same dataset, changed in place (dicomtrolley's ``storage.make_writable``).

    Unlike dicomtrolley's, the file meta also names the MediaStorageSOPInstanceUID, which PS3.10 7.1 requires
    and :func:`~trolley_tasks.formats.part10.check_identity` reads.

    Raises
    ------
    AttributeError
        The dataset has no SOPClassUID or SOPInstanceUID: it cannot be a Part 10 file.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta
    for element in list(dataset):
        if element.VR == "UN" and not isinstance(element.value, bytes | str | None):
            logger.debug("dropping %s: VR UN with a %s value cannot be written", element.tag, type(element.value))
            del dataset[element.tag]
    return dataset
