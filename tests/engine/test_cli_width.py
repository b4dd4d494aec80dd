"""Readable at 80 columns: ``search`` never splits a UID over lines, ``jobs`` and ``status`` fit.

The commands run as a user runs them (a subprocess, ``COLUMNS=80``) against the real Orthanc and the test Redis; the
table helper is also rendered directly with rich at width 80, with UIDs of the longest legal length (64)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from tests.engine.conftest import EngineEnv
from trolley_tasks.cli.tables import fit_table

WIDTH = 80


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TROLLEY_CONFIG=str(config), COLUMNS=str(WIDTH))
    env.pop("TROLLEY_BROKER__URL", None)
    command = [sys.executable, "-m", "trolley_tasks.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def assert_whole(text: str, identifiers: list[str]) -> None:
    lines = text.splitlines()
    assert lines and max(len(line) for line in lines) <= WIDTH, max(lines, key=len)
    for identifier in identifiers:
        assert any(identifier in line for line in lines), f"{identifier} is split across lines:\n{text}"


def test_three_uids_of_64_characters_stay_whole_at_80_columns() -> None:
    uid = "1.2.826.0.1.3680043.8.498." + "1" * 38
    rows = [
        {"StudyInstanceUID": uid[:-1] + "1", "SeriesInstanceUID": uid[:-1] + "2", "SOPInstanceUID": uid[:-1] + "3"}
        | {"PatientName": "Doe^Jane", "Modality": "CT", "StudyDescription": "a description longer than any column"}
    ]
    columns = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientName", "Modality", "StudyDescription"]
    fitted = fit_table(columns, rows, WIDTH, whole=columns[:3])
    out = io.StringIO()
    Console(file=out, width=WIDTH, color_system=None).print(fitted.table)
    assert len(uid) == 64
    assert_whole(out.getvalue(), [rows[0][c] for c in columns[:3]])
    # stacked, the UIDs leave room for one more column; the rest are named so the command can say so
    assert "Modality" in out.getvalue()
    assert fitted.left_out == ["PatientName", "StudyDescription"]


def test_search_at_80_columns(engine_env: EngineEnv, orthanc) -> None:  # type: ignore[no-untyped-def]
    found = run_cli(engine_env.config, "search", "--source", "wado-rs", "--level", "instance")
    assert found.returncode == 0, found.stderr
    uids = [i.sop_instance_uid for i in orthanc.cohort] + [s.series_uid for s in orthanc.cohort.series_refs()]
    assert_whole(found.stdout, uids)
    assert "18 found" in found.stdout

    chosen = run_cli(
        engine_env.config,
        "search",
        "--source",
        "wado-rs",
        "--level",
        "series",
        "--columns",
        "SeriesInstanceUID,Modality",
    )
    assert chosen.returncode == 0, chosen.stderr
    assert_whole(chosen.stdout, [s.series_uid for s in orthanc.cohort.series_refs()])
    assert "Modality" in chosen.stdout and "PatientID" not in chosen.stdout

    wrong = run_cli(engine_env.config, "search", "--source", "wado-rs", "--columns", "SOPInstanceUID")
    assert wrong.returncode == 2 and "not shown at level study" in wrong.stderr


def test_jobs_and_status_fit_80_columns(fresh: EngineEnv, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # no workers: the job stays queued, which is all the listing needs; cancelled at the end
    job = fresh.engine.submit(orthanc.cohort.study_refs(), source="wado-rs", output=tmp_path / "a-long" / "output-dir")
    try:
        listed = run_cli(fresh.config, "jobs")
        assert listed.returncode == 0, listed.stderr
        assert_whole(listed.stdout, [job, "expanding"])
        shown = run_cli(fresh.config, "status", job)
        assert shown.returncode == 0, shown.stderr
        assert_whole(shown.stdout, [job])
    finally:
        fresh.engine.cancel(job)
