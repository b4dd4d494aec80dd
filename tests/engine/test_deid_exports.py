"""De-identified exports (``--deid``) against a real Orthanc serving the research cohort, with real workers.

After an export with ``basic``: no byte of an original identifier in any output file, file name, report, log line or
Redis key name; pixels byte-identical; one new SeriesInstanceUID per original series; one date shift per patient;
the linking table only where asked, mode 0600. A re-run with the same key fetches nothing and gives the same files;
another key gives other pseudonyms; an instance whose header says ``BurnedInAnnotation YES`` is left out at fetch
time and reported; a missing key refuses the export with exit 2."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import BasicTextSRStorage

from testbed.cohort import INSTITUTION, ResearchCohort
from tests.conftest import service_missing
from tests.engine.conftest import EngineEnv, Workers, celery_workers
from trolley_tasks.deid import BUILT_IN, Deidentifier
from trolley_tasks.engine.api import EngineClient, dry_run
from trolley_tasks.engine.models import JobState, JobStatus
from trolley_tasks.engine.settings import load_settings
from trolley_tasks.errors import MissingCredentialError

pytestmark = pytest.mark.slow

RESEARCH = ResearchCohort(studies=4, series=1, instances=4, seed=22)
"""Two patients of two studies each; per study AXIAL (4 CT), SCOUT (2), SHORT (2), an SR and a burned-in SC."""
KEY, OTHER_KEY = "first research key, long enough", "another research key, long enough"
IMAGES = [item for item in RESEARCH if item.kind in ("axial", "scout", "short")]


@pytest.fixture(scope="module")
def orthanc(orthanc_factory: Any) -> Any:
    return orthanc_factory(RESEARCH)


@pytest.fixture(scope="module")
def deid_env(engine_env: EngineEnv) -> Iterator[tuple[EngineClient, Workers]]:
    """An engine and two workers whose configuration adds ``[deid.other]`` (another key; a profile that leaves the
    secondary capture to the header check, where its BurnedInAnnotation shows), and whose environment holds both
    keys."""
    config = engine_env.tmp / "deid.toml"
    config.write_text(
        engine_env.config.read_text()
        + f'\n[deid.other]\nkey_env = "OTHER_DEID_KEY"\nexclude_sop_classes = ["{BasicTextSRStorage}"]\n'
    )
    spool = engine_env.tmp / "deid-worker-tmp"  # the workers' TMPDIR: C-GET's arrivals wait there
    spool.mkdir(exist_ok=True)
    keys = {"TROLLEY_DEID_KEY": KEY, "OTHER_DEID_KEY": OTHER_KEY, "TMPDIR": str(spool)}
    with celery_workers(config, 2, engine_env.tmp, environment=keys) as running:
        engine = EngineClient(load_settings(config))
        yield engine, running
        engine.close()


def originals() -> set[bytes]:
    """Every identifying value of the cohort, as bytes: what must never reach the output side."""
    needles = {INSTITUTION, "REFERRER^TROLLEY", "TROLLEY^PATIENT", "MRNTT"}
    for item in RESEARCH:
        needles |= {item.patient_id, item.accession_number, item.study_date}
        needles |= {item.study_uid, item.series_uid, item.sop_instance_uid}
    return {needle.encode() for needle in needles}


def export(
    engine: EngineClient, out: Path, profile: str = "basic", source: str = "wado-rs", **options: Any
) -> JobStatus:
    """Submit a de-identified export of the cohort and wait until its report (and linking table) is on disk."""
    job = engine.submit(RESEARCH.study_refs(), source=source, output=out, deid=profile, **options)
    deadline = time.monotonic() + 180
    while (status := engine.status(job)).reported_at is None:
        assert time.monotonic() < deadline, f"job {job} did not end: {status}"
        time.sleep(0.2)
    return status


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_worker_without_the_key_pauses_the_job_then_resume_finishes_it(
    engine_env: EngineEnv, fresh: EngineEnv, tmp_path: Path, monkeypatch: Any
) -> None:
    """Runs before the module's keyed workers exist: only the worker started here takes the job's messages."""
    monkeypatch.setenv("TROLLEY_DEID_KEY", KEY)
    engine = fresh.engine
    job = engine.submit(RESEARCH.study_refs(), source="wado-rs", output=tmp_path / "out", deid="basic")
    with celery_workers(engine_env.config, 1, engine_env.tmp, environment={"TROLLEY_DEID_KEY": None}):
        paused = fresh.wait(job, until=lambda s: s.state is JobState.PAUSED)
    assert "TROLLEY_DEID_KEY" in paused.pause_reason and paused.done == 0, paused
    assert not list((tmp_path / "out").rglob("*.dcm"))
    with celery_workers(
        engine_env.config, 1, engine_env.tmp, environment={"TROLLEY_DEID_KEY": "a key, but not that one"}
    ):
        engine.resume(job)
        again = fresh.wait(job, until=lambda s: s.state is JobState.PAUSED and s.pause_reason != paused.pause_reason)
        assert "not the one the export started with" in again.pause_reason and again.done == 0, again
    with celery_workers(engine_env.config, 1, engine_env.tmp, environment={"TROLLEY_DEID_KEY": KEY}):
        engine.resume(job)
        done = fresh.wait(job, until=lambda s: s.reported_at is not None)
    assert (done.state, done.done) == (JobState.DONE, len(IMAGES))


def test_basic_export_leaves_no_original_anywhere(
    deid_env: tuple[EngineClient, Workers], fresh: EngineEnv, redis_service: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    engine, workers = deid_env
    monkeypatch.setenv("TROLLEY_DEID_KEY", KEY)
    out, link = tmp_path / "research", tmp_path / "private" / "link.csv"
    status = export(engine, out, link_table=link)
    assert status.state is JobState.DONE, status
    assert (status.expected, status.done, status.failed) == (len(IMAGES), len(IMAGES), 0)
    rules = sorted({item.rule for item in status.excluded})
    assert rules == [
        "deid: secondary capture (screenshots carry names in pixels)",
        "deid: structured report (free text, not cleaned: E.3.3 Clean Structured Content is not offered)",
    ]
    written = files(out)
    deid = Deidentifier(BUILT_IN["basic"], KEY.encode())
    needles = originals()
    assert sorted(name for name in written if name.endswith(".dcm")) == sorted(
        f"{deid.uid(i.study_uid)}/{deid.uid(i.series_uid)}/{deid.uid(i.sop_instance_uid)}.dcm" for i in IMAGES
    )
    for name, data in written.items():  # every file, its name, the report, .trolley: no original byte
        assert [n for n in needles if n in data or n in name.encode()] == [], name
    assert [n for n in needles if n in workers.log.read_bytes()] == []
    key_names = b"\n".join(redis_service.client().scan_iter("*", count=1000))
    assert [n for n in needles if n in key_names] == []
    # pixels byte-identical; one new series UID per original series; one date shift per patient
    series_map: dict[str, set[str]] = {}
    shifts: dict[str, set[int]] = {}
    for item in IMAGES:
        path = out / deid.uid(item.study_uid) / deid.uid(item.series_uid) / f"{deid.uid(item.sop_instance_uid)}.dcm"
        ds, original = pydicom.dcmread(path), RESEARCH.dataset(item)
        assert ds.PixelData == original.PixelData
        series_map.setdefault(item.series_uid, set()).add(ds.SeriesInstanceUID)
        days = datetime.strptime(original.StudyDate, "%Y%m%d") - datetime.strptime(ds.StudyDate, "%Y%m%d")
        shifts.setdefault(item.patient_id, set()).add(days.days)
    assert all(len(new) == 1 for new in series_map.values()) and len(series_map) == 3 * RESEARCH.studies
    assert all(len(days) == 1 and next(iter(days)) > 0 for days in shifts.values()) and len(shifts) == 2
    # the linking table: only where named, 0600, originals to the pseudonyms the files carry
    assert link.stat().st_mode & 0o777 == 0o600
    rows = list(csv.DictReader(link.read_text().splitlines()))
    pairs = {(row["kind"], row["original"]): row["pseudonym"] for row in rows}
    for item in IMAGES:
        assert pairs[("SOPInstanceUID", item.sop_instance_uid)] == deid.uid(item.sop_instance_uid)
        assert pairs[("PatientID", item.patient_id)] == deid.names.identifier("PatientID", item.patient_id)
        assert pairs[("AccessionNumber", item.accession_number)] == deid.names.identifier(
            "AccessionNumber", item.accession_number
        )
    report = json.loads((out / "trolley-report.json").read_text())
    assert {i["SOPInstanceUID"] for i in report["instances"]} == {deid.uid(i.sop_instance_uid) for i in IMAGES}
    # a report asked for on a host without the key: refused in one line, the report on disk left as it was
    monkeypatch.delenv("TROLLEY_DEID_KEY")
    before = (out / "trolley-report.csv").read_bytes()
    with pytest.raises(MissingCredentialError, match="TROLLEY_DEID_KEY"):
        engine.write_report(status.job_id)
    assert (out / "trolley-report.csv").read_bytes() == before


def test_rerun_fetches_nothing_same_key_same_files_other_key_other_names(
    deid_env: tuple[EngineClient, Workers], fresh: EngineEnv, tmp_path: Path, monkeypatch: Any
) -> None:
    engine, _ = deid_env
    monkeypatch.setenv("TROLLEY_DEID_KEY", KEY)
    monkeypatch.setenv("OTHER_DEID_KEY", OTHER_KEY)
    first = export(engine, tmp_path / "a")
    link = tmp_path / "again-link.csv"  # the ledger knows the originals, the files the pseudonyms:
    again = export(engine, tmp_path / "a", new_job=True, link_table=link)
    assert again.job_id != first.job_id and again.state is JobState.DONE
    assert (again.done, again.skipped) == (len(IMAGES), len(IMAGES))
    kinds = {(row["kind"], row["original"]) for row in csv.DictReader(link.read_text().splitlines())}
    assert {("PatientID", item.patient_id) for item in IMAGES} <= kinds  # from the search, nothing was fetched
    elsewhere = export(engine, tmp_path / "b")
    assert elsewhere.done == len(IMAGES) and elsewhere.skipped == 0
    dicom_a = {n: data for n, data in files(tmp_path / "a").items() if n.endswith(".dcm")}
    dicom_b = {n: data for n, data in files(tmp_path / "b").items() if n.endswith(".dcm")}
    assert dicom_a == dicom_b and len(dicom_b) == len(IMAGES)  # the same key gives byte-identical files
    # another key, and a profile that leaves the secondary capture to the header check
    other = export(engine, tmp_path / "c", profile="other")
    assert other.state is JobState.DONE, other
    assert other.expected == len(IMAGES) and other.done == len(IMAGES)
    burned = [e for e in other.excluded if e.instance_uid]
    assert len(burned) == RESEARCH.studies and {e.rule for e in burned} == {"deid: BurnedInAnnotation YES"}
    names_c = {n for n in files(tmp_path / "c") if n.endswith(".dcm")}
    assert len(names_c) == len(IMAGES) and not names_c & set(dicom_b)
    csv_text = (tmp_path / "c" / "trolley-report.csv").read_text()
    assert csv_text.count(",excluded,") == 2 * RESEARCH.studies  # the SR series, and each burned-in instance
    assert [n for n in originals() if n in csv_text.encode()] == []


@pytest.mark.parametrize("source", ["c-get", "c-move"])
def test_dimse_arrivals_are_deidentified_and_an_excluded_one_leaves_no_file_behind(
    deid_env: tuple[EngineClient, Workers],
    engine_env: EngineEnv,
    fresh: EngineEnv,
    tmp_path: Path,
    monkeypatch: Any,
    source: str,
) -> None:
    """C-GET and C-MOVE hand storage a file already on disk (the arrival). De-identified, it is read, rewritten
    into the output and removed; one the header check leaves out (the burned-in secondary capture, under a profile
    that fetches it) is removed too, without a byte of it in the output."""
    engine, _ = deid_env
    monkeypatch.setenv("OTHER_DEID_KEY", OTHER_KEY)
    status = export(engine, tmp_path / "out", profile="other", source=source)
    assert (status.state, status.done, status.failed) == (JobState.DONE, len(IMAGES), 0), status
    assert len([e for e in status.excluded if e.instance_uid]) == RESEARCH.studies
    deid = Deidentifier(BUILT_IN["basic"], OTHER_KEY.encode())
    for item in IMAGES:
        path = tmp_path / "out" / deid.uid(item.study_uid) / deid.uid(item.series_uid)
        ds = pydicom.dcmread(path / f"{deid.uid(item.sop_instance_uid)}.dcm")
        assert ds.PixelData == RESEARCH.dataset(item).PixelData and ds.PatientIdentityRemoved == "YES"
    written = files(tmp_path / "out")
    assert [n for n in originals() if any(n in data or n in name.encode() for name, data in written.items())] == []
    spools = [engine_env.tmp / "deid-worker-tmp", Path(fresh.settings.state_dir) / "spool"]
    assert [p for spool in spools for p in spool.rglob("*") if p.is_file()] == []


def test_missing_key_refuses_the_export_with_exit_2(fresh: EngineEnv, redis_service: Any, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TROLLEY_")}
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("StudyInstanceUID\n" + "\n".join(ref.study_uid for ref in RESEARCH.study_refs()) + "\n")
    command = [sys.executable, "-m", "trolley_tasks.cli", "--config", str(fresh.config), "export", str(cohort)]
    command += ["--source", "wado-rs", "--out", str(tmp_path / "out"), "--deid", "basic"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "TROLLEY_DEID_KEY" in done.stderr
    assert not (tmp_path / "out").exists()
    assert [k for k in redis_service.client().scan_iter("trolley:{*") if b":job" in k] == []
    link_only = subprocess.run([*command[:-2], "--link-table", str(tmp_path / "l.csv")], capture_output=True, env=env)
    assert link_only.returncode == 2 and b"--link-table needs --deid" in link_only.stderr


def _dciodvfy_errors(path: Path) -> set[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")}


def test_exported_files_pass_dciodvfy_without_new_errors(
    deid_env: tuple[EngineClient, Workers], fresh: EngineEnv, tmp_path: Path, monkeypatch: Any
) -> None:
    if shutil.which("dciodvfy") is None:
        service_missing("dciodvfy is not installed; apt-get install -y dicom3tools")
    engine, _ = deid_env
    monkeypatch.setenv("TROLLEY_DEID_KEY", KEY)
    export(engine, tmp_path / "out")
    deid = Deidentifier(BUILT_IN["basic"], KEY.encode())
    for item in IMAGES:
        original = tmp_path / "original.dcm"
        original.write_bytes(RESEARCH.encode(item))
        cleaned = tmp_path / "out" / deid.uid(item.study_uid) / deid.uid(item.series_uid)
        cleaned = cleaned / f"{deid.uid(item.sop_instance_uid)}.dcm"
        assert pydicom.dcmread(cleaned).SOPInstanceUID == deid.uid(item.sop_instance_uid)
        assert _dciodvfy_errors(cleaned) - _dciodvfy_errors(original) == set()


def test_dry_run_shows_what_the_profile_leaves_out(engine_env: EngineEnv) -> None:
    result = dry_run(engine_env.settings, RESEARCH.study_refs(), source="wado-rs", deid="basic")
    kinds = {item.series_uid: item.kind for item in RESEARCH}
    dropped = sorted((kinds[s.series_uid], s.rule) for s in result.series if s.rule is not None)
    assert dropped == sorted(
        [("burned", "deid: secondary capture (screenshots carry names in pixels)")] * RESEARCH.studies
        + [("sr", "deid: structured report (free text, not cleaned: E.3.3 Clean Structured Content is not offered)")]
        * RESEARCH.studies
    )
    assert result.kept[2] == len(IMAGES)


def test_a_bad_row_is_reported_by_where_it_is_not_by_what_it_says(
    deid_env: tuple[EngineClient, Workers], fresh: EngineEnv, tmp_path: Path, monkeypatch: Any
) -> None:
    """A bad row's reason quotes the row's value, which may be patient data: the de-identified report keeps only its
    place."""
    engine, _ = deid_env
    monkeypatch.setenv("TROLLEY_DEID_KEY", KEY)
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(f"StudyInstanceUID\n{RESEARCH.study_refs()[0].study_uid}\nTROLLEY^SECRET\n")
    job = engine.submit(cohort, source="wado-rs", output=tmp_path / "out", deid="basic", skip_bad_rows=True)
    assert any("TROLLEY^SECRET" in line for line in engine.bad_rows(job))  # the operator's view keeps it whole
    deadline = time.monotonic() + 120
    while engine.status(job).reported_at is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    report = (tmp_path / "out" / "trolley-report.csv").read_text()
    assert "row 3, column StudyInstanceUID: rejected" in report and "SECRET" not in report
    assert b"SECRET" not in (tmp_path / "out" / "trolley-report.json").read_bytes()


def test_rerun_of_the_same_export_fetches_again_only_a_deleted_file_under_its_pseudonyms(
    deid_env: tuple[EngineClient, Workers], fresh: EngineEnv, tmp_path: Path, monkeypatch: Any
) -> None:
    """The ledger keeps no path for a layout made of UIDs: a re-run looks for each done instance where the layout
    puts it under its pseudonyms, finds all but the deleted one, and fetches that one alone, as it was."""
    engine, workers = deid_env
    monkeypatch.setenv("TROLLEY_DEID_KEY", KEY)
    first = export(engine, tmp_path)
    before = {n: data for n, data in files(tmp_path).items() if n.endswith(".dcm")}
    deleted = sorted(before)[3]
    (tmp_path / deleted).unlink()
    told = workers.log.read_text().count("no longer in the output")
    again = export(engine, tmp_path)
    assert again.job_id == first.job_id and again.state is JobState.DONE and again.done == len(IMAGES)
    assert {n: data for n, data in files(tmp_path).items() if n.endswith(".dcm")} == before
    assert workers.log.read_text().count("1 done instance(s) no longer in the output") - told == 1
    assert workers.log.read_text().count("no longer in the output") - told == 1  # every other file was found
