"""``trolley-tasks`` as a real subprocess: embedded-mode exports from the Orthanc fixture, Ctrl-C, bad inputs.

Embedded mode here is the real thing: a private Redis in the test's state directory and real ``celery worker``
processes started by the command, fetching from the real Orthanc over WADO-RS.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "trolley_tasks.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env or clean_env(), cwd="/"
    )


def export_args(cohort: list[str], out: Path, config: Path, *options: str) -> list[str]:
    """``--config CONFIG export COHORT... --source orthanc --out OUT OPTIONS``: the global option before the command."""
    return ["--config", str(config), "export", *cohort, "--source", "orthanc", "--out", str(out), *options]


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any TROLLEY_* setting of the developer's, so only the test's config counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TROLLEY_")}
    env.update(extra)
    return env


def write_config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / "trolley.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n\n[sources.orthanc]\nurl = "{url}"\n{extra}')
    return path


def dicom_files(out: Path) -> dict[str, Path]:
    """SOPInstanceUID -> path of every DICOM file under ``out`` (reports and quarantine left out)."""
    found = {}
    for path in out.rglob("*"):
        if (
            path.is_file()
            and not path.name.startswith("trolley-report")
            and not any(part.startswith(".") for part in path.relative_to(out).parts)
        ):
            found[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return found


def report(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "trolley-report.json").read_text())
    return data


def test_embedded_export_from_a_search_csv(orthanc: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, orthanc.dicomweb_url)
    search = run_cli(
        "search", "--source", "orthanc", "--config", str(config), "--date-from", "2024-01-01", "--format", "csv"
    )
    assert search.returncode == 0, search.stderr
    (tmp_path / "cohort.csv").write_text(search.stdout)
    assert len(list(csv.DictReader(io.StringIO(search.stdout)))) == orthanc.cohort.studies

    out = tmp_path / "out"
    result = run_cli(*export_args([str(tmp_path / "cohort.csv")], out, config, "--workers", "2"))
    assert result.returncode == 0, result.stderr
    expected = {item.sop_instance_uid: item for item in orthanc.cohort}
    files = dicom_files(out)
    assert set(files) == set(expected)
    for uid, path in files.items():
        assert path.read_bytes() == orthanc.cohort.encode(expected[uid])  # WADO-RS transfer-syntax=*: identical
    summary = report(out)
    assert summary["state"] == "done"
    assert summary["counts"]["expected"] == summary["counts"]["done"] == len(expected)
    assert summary["counts"]["failed"] == 0 and summary["source"] == "orthanc"
    rows = list(csv.DictReader((out / "trolley-report.csv").open()))
    assert {row["SOPInstanceUID"] for row in rows} == set(expected)
    assert all(row["status"] == "done" and (out / row["path"]).is_file() for row in rows)
    assert "all 18 instances on disk" in result.stderr
    # no terminal: progress went to the log as plain lines, and nothing secret or huge
    assert "trolley.progress" in result.stderr

    again = run_cli(*export_args([str(tmp_path / "cohort.csv")], out, config, "--workers", "1"))
    assert again.returncode == 0, again.stderr
    assert {uid: p.stat().st_mtime_ns for uid, p in dicom_files(out).items()} == {
        uid: p.stat().st_mtime_ns for uid, p in files.items()
    }  # the same job: nothing fetched or written twice


def test_series_level_search_csv_exports_exactly_those_series(orthanc: Any, tmp_path: Path) -> None:
    config = write_config(
        tmp_path, orthanc.dicomweb_url, f'downloader = "wado-uri"\nwado_uri_url = "{orthanc.wado_url}"\n'
    )
    patient = orthanc.cohort.instance(1, 0, 0).patient_id
    search = run_cli(
        "search",
        "--source",
        "orthanc",
        "--patient-id",
        patient,
        "--level",
        "series",
        "--format",
        "csv",
        "--config",
        str(config),
    )
    assert search.returncode == 0, search.stderr
    lines = search.stdout.splitlines()
    assert len(lines) == 1 + orthanc.cohort.series
    (tmp_path / "cohort.csv").write_text("\n".join(lines[:2]) + "\n")  # the header and one series
    chosen = next(csv.DictReader(io.StringIO(search.stdout)))["SeriesInstanceUID"]

    out = tmp_path / "out"
    result = run_cli(*export_args([str(tmp_path / "cohort.csv")], out, config, "--workers", "1", "--layout", "flat"))
    assert result.returncode == 0, result.stderr
    wanted = {item.sop_instance_uid for item in orthanc.cohort if item.series_uid == chosen}
    assert set(dicom_files(out)) == wanted
    assert all(path.parent == out for path in dicom_files(out).values())  # flat layout


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9/dicom-web",
        '[sources.orthanc.auth]\ntype = "bearer"\ntoken_env = "TT_SUBPROCESS_TOKEN"\n',
    )
    (tmp_path / "good").mkdir()
    good = write_config(tmp_path / "good", "http://127.0.0.1:9/dicom-web")
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("StudyInstanceUID,AccessionNumber\n1.2.3,A1\n1.2.3.,A2\n")
    out = str(tmp_path / "out")
    cases = {
        "missing config": (
            ["export", str(cohort), "-s", "orthanc", "-o", out, "-c", str(tmp_path / "no.toml")],
            "no.toml: no such configuration file",
        ),
        "unknown source": (
            ["export", str(cohort), "-s", "pacs", "-o", out, "-c", str(good)],
            "no [sources.pacs] (known sources: orthanc)",
        ),
        "malformed row": (
            ["export", str(cohort), "-s", "orthanc", "-o", out, "-c", str(good)],
            "row 3, column StudyInstanceUID",
        ),
        "invalid uid": (
            ["export", "--study-uid", "1.2.abc", "-s", "orthanc", "-o", out, "-c", str(good)],
            "--study-uid",
        ),
        "missing secret": (
            ["search", "-s", "orthanc", "-c", str(config)],
            "token_env: environment variable TT_SUBPROCESS_TOKEN is not set",
        ),
    }
    for name, (args, message) in cases.items():
        result = run_cli(*args, env=clean_env())
        assert result.returncode == 2, (name, result.stderr)
        assert message in one_error_line(result), name
    assert not (tmp_path / "out").exists()


def test_ctrl_c_pauses_and_the_same_command_resumes_without_refetching(orthanc: Any, tmp_path: Path) -> None:
    # one instance per request at 3 requests/s: slow enough to interrupt in the middle
    config = write_config(tmp_path, orthanc.dicomweb_url, 'rate_limit = "3/s"\n')
    out = tmp_path / "out"
    uids = " ".join(f"--study-uid {ref.study_uid}" for ref in orthanc.cohort.study_refs()).split()
    args = export_args(uids, out, config, "--workers", "2", "--batch-size", "1")
    process = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), cwd="/"
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and len([p for p in out.rglob("*.dcm")]) >= 3:
                break
            time.sleep(0.1)
        assert process.poll() is None, process.communicate()[1]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "paused" in stderr and "Traceback" not in stderr
    before = {uid: path.stat().st_mtime_ns for uid, path in dicom_files(out).items()}
    assert 3 <= len(before) < len(orthanc.cohort)

    listed = run_cli("--config", str(config), "jobs", "--json")  # the global options also go before the command
    assert listed.returncode == 0, listed.stderr
    (job,) = json.loads(listed.stdout)
    assert job["state"] == "paused" and job["done"] >= len(before)

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    after = dicom_files(out)
    assert set(after) == {item.sop_instance_uid for item in orthanc.cohort}
    assert {uid: after[uid].stat().st_mtime_ns for uid in before} == before  # nothing fetched twice
    summary = report(out)
    assert summary["job_id"] == job["job_id"] and summary["counts"]["done"] == len(orthanc.cohort)


def test_failures_exit_1_with_a_table_and_retry_failed_reruns_them(orthanc: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, orthanc.dicomweb_url)
    item = orthanc.cohort.instance(0, 0, 0)
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(
        "StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID\n"
        f"{item.study_uid},{item.series_uid},{item.sop_instance_uid}\n"
        f"{item.study_uid},{item.series_uid},1.2.3.999\n"  # the PACS has no such instance
    )
    out = tmp_path / "out"
    args = ["export", str(cohort), "--source", "orthanc", "--out", str(out), "--workers", "1", "-c", str(config)]
    # the global option after the command name, as older scripts write it (export_args puts it before)
    result = run_cli(*args)
    assert result.returncode == 1, result.stderr
    assert "not-found" in result.stderr and "1 instances failed" in result.stderr
    assert set(dicom_files(out)) == {item.sop_instance_uid}
    summary = report(out)
    assert summary["counts"]["failed"] == 1 and summary["failures_by_class"] == {"not-found": 1}
    job = summary["job_id"]

    status = run_cli("-c", str(config), "status", job, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "done-with-failures"

    retried = run_cli("retry-failed", job, "--workers", "1", "-c", str(config))
    assert retried.returncode == 1, retried.stderr  # still not on the PACS: still failed, and said so
    assert "re-queued 1 failed instances" in retried.stderr

    unknown = run_cli("status", "tnosuchjob", "-c", str(config))
    assert unknown.returncode == 2
    assert "no job 'tnosuchjob'" in one_error_line(unknown)


def test_flower_gets_its_password_from_the_environment_only(redis_service: Any, tmp_path: Path) -> None:
    import requests

    from testbed.orthanc import free_port

    config = tmp_path / "trolley.toml"
    config.write_text('[flower]\nusername = "watcher"\npassword_env = "TT_FLOWER_PW"\n')
    port = free_port()
    env = clean_env(TROLLEY_BROKER__URL=redis_service.broker_url, TT_FLOWER_PW="s3cret-pw")
    process = subprocess.Popen(
        [*CLI, "flower", "--port", str(port), "-c", str(config)],
        env=env,
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                anonymous = requests.get(url, timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None, process.communicate()[0]
                time.sleep(0.2)
        assert anonymous.status_code == 401
        assert requests.get(url, auth=("watcher", "s3cret-pw"), timeout=5).status_code == 200
        assert b"s3cret-pw" not in Path(f"/proc/{process.pid}/cmdline").read_bytes()
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert b"s3cret-pw" not in output
