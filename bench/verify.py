"""What the bench knows about every instance it uploaded, and the check of every download against it.

Each instance is encoded once, as it is uploaded, and remembered by three digests: of the whole file, of the dataset
after the file meta group, and of the pixel data. A download then counts as

- **byte-identical**: the file is the uploaded file (WADO-RS and WADO-URI return the stored bytes);
- **dataset-identical**: the dataset after the file meta is byte for byte the uploaded one (C-GET and C-MOVE deliver a
  dataset; the receiver writes its own file meta);
- **valid**: pydicom reads it, its SOPInstanceUID is one we asked for and its pixels are ours (a client that
  re-encodes);
- or it is a failure: unreadable, unknown, a duplicate, or under a path that names another instance.

"The one asked for": every path component that is a UID (dots or dicomtrolley's underscores, ``.dcm`` or not) must be
the study, series or instance UID of the file's content. A run passes when every instance of the cohort is there once
and nothing else is.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from testbed.cohort import GeneratedCohort, GeneratedInstance
from trolley_tasks.deid import Deidentifier

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UID_RE = re.compile(r"^\d+(\.\d+)+$")
SKIPPED_NAMES = {"trolley-report.json", "trolley-report.csv"}


def dataset_offset(data: bytes) -> int:
    """Where the dataset starts in a Part 10 file: after the preamble, ``DICM`` and the explicit VR LE group 0002."""
    if data[128:132] != b"DICM":
        raise ValueError("not a Part 10 file")
    offset = 132
    while offset + 8 <= len(data) and struct.unpack_from("<H", data, offset)[0] == 0x0002:
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", data, offset + 8)[0]
            offset += 12 + length
        else:
            length = struct.unpack_from("<H", data, offset + 6)[0]
            offset += 8 + length
    return offset


def _sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Expected:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    file_sha: str
    dataset_sha: str
    pixel_sha: str
    size: int


@dataclass
class Catalogue:
    """Every uploaded instance, by SOPInstanceUID and by digest."""

    instances: dict[str, Expected] = field(default_factory=dict)
    by_file: dict[str, str] = field(default_factory=dict)
    by_dataset: dict[str, str] = field(default_factory=dict)

    def add(self, item: GeneratedInstance, data: bytes, pixels: bytes) -> None:
        offset = dataset_offset(data)
        expected = Expected(
            item.study_uid,
            item.series_uid,
            item.sop_instance_uid,
            _sha(data),
            _sha(memoryview(data)[offset:]),
            _sha(pixels),
            len(data),
        )
        self.instances[item.sop_instance_uid] = expected
        self.by_file[expected.file_sha] = item.sop_instance_uid
        self.by_dataset[expected.dataset_sha] = item.sop_instance_uid

    def subset(self, uids: Iterable[str]) -> Catalogue:
        """The catalogue of some of the instances (one study of a larger cohort, for example)."""
        part = Catalogue()
        for uid in uids:
            expected = self.instances[uid]
            part.instances[uid] = expected
            part.by_file[expected.file_sha] = uid
            part.by_dataset[expected.dataset_sha] = uid
        return part

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.instances.values())


def pseudonymous(catalogue: Catalogue, deid: Deidentifier) -> Catalogue:
    """The catalogue a de-identified export is checked against: every instance under its pseudonyms, known by its
    pixel data only (the header is rewritten, so no file or dataset digest can match; the pixels must)."""
    renamed = Catalogue()
    for uid, item in catalogue.instances.items():
        new = deid.uid(uid)
        renamed.instances[new] = Expected(
            deid.uid(item.study_uid), deid.uid(item.series_uid), new, "", "", item.pixel_sha, item.size
        )
    return renamed


def encode_all(cohort: GeneratedCohort, catalogue: Catalogue) -> Iterator[bytes]:
    """Encode each instance of ``cohort`` (for upload), recording it in ``catalogue`` on the way."""
    from io import BytesIO

    for item in cohort:
        dataset = cohort.dataset(item)
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        catalogue.add(item, data, dataset.PixelData)
        yield data


@dataclass
class Verdict:
    """The check of one output directory."""

    expected: int
    byte_identical: int = 0
    dataset_identical: int = 0
    valid_only: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def verified(self) -> int:
        return self.byte_identical + self.dataset_identical + self.valid_only

    @property
    def ok(self) -> bool:
        return not self.problems and self.verified == self.expected

    def as_dict(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "verified": self.verified,
            "byte_identical": self.byte_identical,
            "dataset_identical": self.dataset_identical,
            "valid_not_identical": self.valid_only,
            "ok": self.ok,
            "problems": self.problems[:20],
            "problem_count": len(self.problems),
        }

    def summary(self) -> str:
        kinds = [f"{self.byte_identical} byte-identical"]
        if self.dataset_identical:
            kinds.append(f"{self.dataset_identical} dataset-identical")
        if self.valid_only:
            kinds.append(f"{self.valid_only} valid (re-encoded)")
        head = f"{self.verified}/{self.expected} verified ({', '.join(kinds)})"
        return head if self.ok else f"{head}; {len(self.problems)} problems, first: {self.problems[:3]}"


def _files(root: Path) -> Iterator[Path]:
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".trolley"]  # the engine's quarantine and temp files
        for name in names:
            if name not in SKIPPED_NAMES and not name.startswith("."):
                yield Path(folder) / name


def _uid_components(path: Path, root: Path) -> list[str]:
    names = []
    for part in path.relative_to(root).parts:
        part = part.removesuffix(".dcm")
        candidate = part if "." in part else part.replace("_", ".")
        if _UID_RE.match(candidate):
            names.append(candidate)
    return names


def _identify(path: Path, catalogue: Catalogue) -> tuple[str | None, str, str]:
    """(SOPInstanceUID or None, kind, problem)."""
    data = path.read_bytes()
    uid = catalogue.by_file.get(_sha(data))
    if uid is not None:
        return uid, "byte", ""
    try:
        uid = catalogue.by_dataset.get(_sha(memoryview(data)[dataset_offset(data) :]))
    except (ValueError, struct.error):
        uid = None
    if uid is not None:
        return uid, "dataset", ""
    try:
        dataset = pydicom.dcmread(path)
        uid = str(dataset.SOPInstanceUID)
        expected = catalogue.instances.get(uid)
        if expected is None:
            return None, "", f"{path.name}: SOPInstanceUID {uid} was not asked for"
        if _sha(dataset.PixelData) != expected.pixel_sha:
            return None, "", f"{path.name}: pixel data of {uid} differs from the uploaded instance"
        return uid, "valid", ""
    except Exception as exc:  # anything pydicom cannot read is an invalid download
        return None, "", f"{path.name}: not a readable DICOM file ({type(exc).__name__}: {exc})"


def verify(root: Path, catalogue: Catalogue, threads: int = 2) -> Verdict:
    """Check every file under ``root`` against ``catalogue`` (see the module docstring)."""
    verdict = Verdict(expected=len(catalogue.instances))
    files = sorted(_files(root)) if root.exists() else []
    seen: set[str] = set()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda p: (p, _identify(p, catalogue)), files))
    for path, (uid, kind, problem) in results:
        if uid is None:
            verdict.problems.append(problem)
            continue
        if uid in seen:
            verdict.problems.append(f"{uid}: downloaded twice ({path.relative_to(root)})")
            continue
        expected = catalogue.instances[uid]
        named = _uid_components(path, root)
        if any(name not in (expected.study_uid, expected.series_uid, uid) for name in named):
            verdict.problems.append(f"{path.relative_to(root)} holds instance {uid}: not the one its path names")
            continue
        seen.add(uid)
        if kind == "byte":
            verdict.byte_identical += 1
        elif kind == "dataset":
            verdict.dataset_identical += 1
        else:
            verdict.valid_only += 1
    missing = set(catalogue.instances) - seen
    if missing:
        verdict.problems.append(f"{len(missing)} instances missing, e.g. {sorted(missing)[:2]}")
    return verdict
