"""A reproducible synthetic cohort of CT images, for tests, ``make demo`` and ``make bench``.

``generate_cohort(studies, series, instances, seed)`` describes N studies x S series x I instances; every UID,
name and date follows from the seed, so two runs with the same arguments give the same cohort. The images are
realistic in size and structure (512x512 16-bit CT, file meta, patient, accession and date tags), so a cohort of
1,000 instances weighs about 526 MB like the benchmark in ORTHANC.md. Pixel data is seeded noise: it does not
compress, which keeps transfer figures honest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from trolley_tasks.core import InstanceReference, SeriesReference, StudyReference

UID_ROOT = "1.2.826.0.1.3680043.8.498."
"""pydicom's registered root; what follows it is derived from the seed and the object's position."""


def _uid(seed: int, *path: int) -> str:
    digest = hashlib.sha256(f"trolley-tasks/{seed}/{'/'.join(map(str, path))}".encode()).digest()
    number = int.from_bytes(digest[:16], "big")
    return (UID_ROOT + str(number))[:64].rstrip(".")


@dataclass(frozen=True)
class GeneratedInstance:
    """What the cohort says about one instance: enough to check a download without reading the file."""

    study_index: int
    series_index: int
    instance_index: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_date: str
    kind: str = "axial"
    """``axial`` (the CT series), or in a :class:`ResearchCohort` ``scout``, ``short``, ``sr`` or ``burned``."""

    def reference(self) -> InstanceReference:
        return InstanceReference(self.study_uid, self.series_uid, self.sop_instance_uid)


@dataclass(frozen=True)
class GeneratedCohort:
    """N studies x S series x I instances of CT, reproducible from ``seed``."""

    studies: int = 2
    series: int = 2
    instances: int = 3
    seed: int = 0
    rows: int = 512
    columns: int = 512
    first_study_date: date = date(2024, 1, 1)

    def __iter__(self) -> Iterator[GeneratedInstance]:
        for st in range(self.studies):
            for se in range(self.series):
                for inst in range(self.instances):
                    yield self.instance(st, se, inst)

    def __len__(self) -> int:
        return self.studies * self.series * self.instances

    def instance(self, st: int, se: int, inst: int) -> GeneratedInstance:
        patient = st  # one study per patient keeps PatientID queries unambiguous
        return GeneratedInstance(
            study_index=st,
            series_index=se,
            instance_index=inst,
            study_uid=_uid(self.seed, st),
            series_uid=_uid(self.seed, st, se),
            sop_instance_uid=_uid(self.seed, st, se, inst),
            patient_id=f"TT{self.seed:02d}P{patient:04d}",
            patient_name=f"TROLLEY^PATIENT{patient:04d}",
            accession_number=f"A{self.seed:02d}{st:06d}",
            study_date=(self.first_study_date + timedelta(days=st)).strftime("%Y%m%d"),
        )

    def study_refs(self) -> list[StudyReference]:
        return [StudyReference(_uid(self.seed, st)) for st in range(self.studies)]

    def series_refs(self) -> list[SeriesReference]:
        return [
            SeriesReference(_uid(self.seed, st), _uid(self.seed, st, se))
            for st in range(self.studies)
            for se in range(self.series)
        ]

    def instance_refs(self) -> list[InstanceReference]:
        return [item.reference() for item in self]

    def in_study(self, study_uid: str) -> list[GeneratedInstance]:
        return [item for item in self if item.study_uid == study_uid]

    def dataset(self, item: GeneratedInstance) -> Dataset:
        """The full dataset of one instance, pixel data included."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(item.sop_instance_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = item.sop_instance_uid
        ds.StudyInstanceUID = item.study_uid
        ds.SeriesInstanceUID = item.series_uid
        ds.FrameOfReferenceUID = _uid(self.seed, item.study_index, 99_999)
        ds.PatientID = item.patient_id
        ds.PatientName = item.patient_name
        ds.PatientBirthDate = f"19{50 + item.study_index % 50:02d}0101"
        ds.PatientSex = "FO"[item.study_index % 2]
        ds.AccessionNumber = item.accession_number
        ds.StudyID = str(item.study_index + 1)
        ds.StudyDate = item.study_date
        ds.StudyTime = "080000"
        ds.StudyDescription = "CT CHEST SYNTHETIC"
        ds.ReferringPhysicianName = "REFERRER^TROLLEY"
        ds.Modality = "CT"
        ds.SeriesNumber = item.series_index + 1
        ds.SeriesDate = item.study_date
        ds.SeriesDescription = f"AXIAL {item.series_index + 1}"
        ds.ProtocolName = "CHEST ROUTINE"
        ds.BodyPartExamined = "CHEST"
        ds.Manufacturer = "TROLLEY-TASKS"
        ds.InstanceNumber = item.instance_index + 1
        ds.ContentDate = item.study_date
        ds.ContentTime = "080000"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = "1.0"
        ds.ImagePositionPatient = [0, 0, float(item.instance_index)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = self.rows
        ds.Columns = self.columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        rng = np.random.default_rng([self.seed, item.study_index, item.series_index, item.instance_index])
        ds.PixelData = rng.integers(0, 4096, size=(self.rows, self.columns), dtype=np.uint16).tobytes()
        return ds

    def encode(self, item: GeneratedInstance) -> bytes:
        """The instance as a DICOM Part 10 file."""
        buffer = BytesIO()
        self.dataset(item).save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def write(self, directory: Path) -> list[Path]:
        """Write every instance as ``<directory>/<SOPInstanceUID>.dcm``; return the paths."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for item in self:
            path = directory / f"{item.sop_instance_uid}.dcm"
            path.write_bytes(self.encode(item))
            paths.append(path)
        return paths


def generate_cohort(
    studies: int = 2, series: int = 2, instances: int = 3, seed: int = 0, rows: int = 512, columns: int = 512
) -> GeneratedCohort:
    """A reproducible cohort of ``studies`` x ``series`` x ``instances`` CT images. See :class:`GeneratedCohort`."""
    return GeneratedCohort(studies, series, instances, seed, rows, columns)


EXTRA_SERIES: dict[str, tuple[int, str, str]] = {
    "scout": (2, "CT", "SCOUT"),
    "short": (2, "CT", "AXIAL 5MM SHORT"),
    "sr": (1, "SR", "DOSE REPORT"),
    "burned": (1, "OT", "SCREEN SAVE"),
}
"""The extra series of a :class:`ResearchCohort`: instances, Modality, SeriesDescription."""

PRIVATE_CREATOR = "TROLLEY TESTBED"
INSTITUTION = "TROLLEY GENERAL HOSPITAL"


@dataclass(frozen=True)
class ResearchCohort(GeneratedCohort):
    """A cohort the way research exports meet it: each study has its CT series plus a scout (2 instances), a short
    series (2), a structured report (Basic Text SR, 1) and a secondary capture flagged ``BurnedInAnnotation=YES``
    (1); two studies per patient (longitudinal dates); InstitutionName, a private block and an OtherPatientIDs on
    every instance. Small images by default: the filter and de-identification tests need many files, not big ones.
    """

    rows: int = 64
    columns: int = 64

    def __iter__(self) -> Iterator[GeneratedInstance]:
        for st in range(self.studies):
            yield from (self.instance(st, se, i) for se in range(self.series) for i in range(self.instances))
            for offset, (count, _, _) in enumerate(EXTRA_SERIES.values()):
                yield from (self.instance(st, self.series + offset, i) for i in range(count))

    def __len__(self) -> int:
        return self.studies * (self.series * self.instances + sum(c for c, _, _ in EXTRA_SERIES.values()))

    def instance(self, st: int, se: int, inst: int) -> GeneratedInstance:
        base = super().instance(st, se, inst)
        patient = st // 2
        kind = "axial" if se < self.series else list(EXTRA_SERIES)[se - self.series]
        return GeneratedInstance(
            **{
                **base.__dict__,
                "patient_id": f"TT{self.seed:02d}P{patient:04d}",
                "patient_name": f"TROLLEY^PATIENT{patient:04d}",
                "kind": kind,
            }
        )

    def dataset(self, item: GeneratedInstance) -> Dataset:
        ds = super().dataset(item)
        ds.InstitutionName = INSTITUTION
        ds.OtherPatientIDs = f"MRN{item.patient_id}"
        block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", f"private note for {item.patient_name}")
        if item.kind == "axial":
            return ds
        _, modality, description = EXTRA_SERIES[item.kind]
        ds.Modality, ds.SeriesDescription = modality, description
        if item.kind == "scout":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        elif item.kind == "burned":
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
            ds.BurnedInAnnotation = "YES"
            ds.ConversionType = "WSD"
        elif item.kind == "sr":
            return _text_report(ds, item)
        return ds


def _text_report(ds: Dataset, item: GeneratedInstance) -> Dataset:
    """A Basic Text SR (PS3.3 A.35.1) in place of the image: no pixels, one TEXT item naming the patient."""
    for keyword in [e.keyword for e in ds if e.keyword and (e.tag.group == 0x0028 or e.tag == 0x7FE00010)]:
        delattr(ds, keyword)
    for keyword in (
        "ImageType",
        "SliceThickness",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "RescaleIntercept",
        "RescaleSlope",
        "FrameOfReferenceUID",
        "BodyPartExamined",
        "ProtocolName",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.CompletionFlag, ds.VerificationFlag, ds.ValueType = "COMPLETE", "UNVERIFIED", "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "121070", "DCM", "Findings"
    ds.ConceptNameCodeSequence = [title]
    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = [title]
    text.TextValue = f"No findings for {item.patient_name}."
    ds.ContentSequence = [text]
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    return ds
