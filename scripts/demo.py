"""``make demo``: a real export, end to end, on one machine, in about a minute.

1. Make sure Orthanc and its DICOMweb plugin are installed: when they are missing and we run as root, install them
   from Debian packages; otherwise print the one command to run and stop.
2. Start a throwaway Orthanc on free loopback ports and load a generated CT cohort into it.
3. Write ``demo-out/trolley.toml`` with one source profile, ``demo``, and no broker: embedded mode.
4. Run ``trolley-tasks search ... --format csv`` to write the cohort file, then ``trolley-tasks export`` on it,
   as real commands, with their progress bars.
5. Check every file on disk against the generated cohort (parsed, UIDs, bytes), print the summary, stop Orthanc.

Everything lives in ``./demo-out`` (removed at the start of each run), so the demo never touches the user's own
state directory or configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.table import Table

from testbed.cohort import GeneratedCohort, generate_cohort
from testbed.orthanc import INSTALL_HINT, OrthancServer, OrthancUnavailable, find_orthanc

APT_PACKAGES = ("orthanc", "orthanc-dicomweb")
DEMO_DIR = Path("demo-out")
COHORT = {"studies": 4, "series": 3, "instances": 20, "seed": 2024}

console = Console(stderr=True, highlight=False, soft_wrap=True)


def ensure_orthanc() -> None:
    """Install Orthanc from Debian packages when missing (as root); otherwise say how, and exit nonzero."""
    try:
        find_orthanc()
        return
    except OrthancUnavailable as exc:
        missing = str(exc)
    if os.geteuid() != 0:
        console.print(f"[red]{missing}[/]")
        console.print(f"run this once, then 'make demo' again:\n  sudo apt-get install -y {' '.join(APT_PACKAGES)}")
        raise SystemExit(1)
    console.print(f"{missing}: installing {' '.join(APT_PACKAGES)} from Debian packages")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *APT_PACKAGES], check=True, env=env)
    find_orthanc()  # still missing: let the error say so


def trolley_command() -> list[str]:
    """The installed ``trolley-tasks`` script next to this Python, else the module."""
    script = Path(sys.executable).parent / "trolley-tasks"
    return [str(script)] if script.exists() else [sys.executable, "-m", "trolley_tasks.cli"]


def write_config(workdir: Path, server: OrthancServer) -> Path:
    path = workdir / "trolley.toml"
    path.write_text(
        "# Written by 'make demo'. No [broker]: export runs in embedded mode (a private Redis and local workers).\n"
        f'state_dir = "{(workdir / "state").resolve()}"\n\n'
        "[sources.demo]\n"
        'searcher = "qido-rs"\n'
        'downloader = "wado-rs"\n'
        f'url = "{server.dicomweb_url}"\n'
        "max_concurrency = 4\n"
    )
    return path


@dataclass
class Verification:
    expected: int
    files: int
    valid: int
    identical: int
    unexpected: list[str]
    missing: int

    @property
    def ok(self) -> bool:
        return self.files == self.valid == self.expected and not self.unexpected and not self.missing


def verify(out: Path, cohort: GeneratedCohort) -> Verification:
    """Every file under ``out`` parses as DICOM, belongs to the cohort, sits in its study and series, and every
    cohort instance is there. Byte identity with the upload is counted (WADO-RS with ``transfer-syntax=*``)."""
    expected = {item.sop_instance_uid: item for item in cohort}
    found: set[str] = set()
    files = valid = identical = 0
    unexpected: list[str] = []
    for path in sorted(out.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(out).parts)  # .trolley/: temp, quarantine
        if not path.is_file() or hidden or path.name.startswith("trolley-report"):
            continue
        files += 1
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            unexpected.append(str(path.relative_to(out)))
            continue
        item = expected.get(str(ds.SOPInstanceUID))
        if item is None or str(ds.SeriesInstanceUID) != item.series_uid or str(ds.StudyInstanceUID) != item.study_uid:
            unexpected.append(str(path.relative_to(out)))
            continue
        valid += 1
        found.add(item.sop_instance_uid)
        if hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(cohort.encode(item)).digest():
            identical += 1
    return Verification(len(expected), files, valid, identical, unexpected, len(set(expected) - found))


def run(command: list[str], **kwargs: object) -> int:
    console.print(f"[bold]$ {' '.join(command)}[/]")
    return subprocess.run(command, **kwargs).returncode  # type: ignore[call-overload]


def main() -> int:
    ensure_orthanc()
    workdir = DEMO_DIR.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    cohort = generate_cohort(**COHORT)
    server = OrthancServer(workdir / "orthanc")
    console.print(
        f"starting a throwaway Orthanc and loading {len(cohort)} generated CT instances "
        f"({cohort.studies} studies x {cohort.series} series x {cohort.instances})"
    )
    with server:
        server.load_cohort(cohort)
        config = write_config(workdir, server)
        console.print(f"Orthanc on {server.url}; configuration in {config}")
        cli = trolley_command()
        cohort_csv = workdir / "cohort.csv"
        with open(cohort_csv, "w") as csv_out:
            code = run(
                [
                    *cli,
                    "--config",
                    str(config),
                    "search",
                    "--source",
                    "demo",
                    "--date-from",
                    "2024-01-01",
                    "--format",
                    "csv",
                ],
                stdout=csv_out,
            )
        if code != 0:
            console.print(f"[red]search failed with exit code {code}[/]")
            return code
        console.print(f"cohort file: {cohort_csv} ({len(cohort_csv.read_text().splitlines()) - 1} studies)")
        out = workdir / "export"
        code = run([*cli, "--config", str(config), "export", str(cohort_csv), "--source", "demo", "--out", str(out)])
        check = verify(out, cohort)
    report = out / "trolley-report.json"
    summary = json.loads(report.read_text()) if report.exists() else {}
    print_summary(check, out, summary, code)
    return code if code != 0 else (0 if check.ok else 1)


def print_summary(check: Verification, out: Path, report: dict[str, object], code: int) -> None:
    table = Table(title="make demo: verified on disk", title_justify="left", show_header=False)
    table.add_row("export exit code", str(code))
    table.add_row("instances in the cohort", str(check.expected))
    table.add_row("DICOM files on disk", str(check.files))
    table.add_row("parsed, with the expected study/series/SOP UIDs", str(check.valid))
    table.add_row("byte-identical to what Orthanc was given", str(check.identical))
    table.add_row("missing", str(check.missing))
    table.add_row("unexpected or unreadable files", str(len(check.unexpected)))
    job = report.get("job", report) if isinstance(report, dict) else {}
    if isinstance(job, dict) and job.get("job_id"):
        table.add_row("job", f"{job.get('job_id')} ({job.get('state', '')})")
    table.add_row("output", f"{out} (report: trolley-report.json, trolley-report.csv)")
    console.print(table)
    console.print("[green]demo passed[/]" if check.ok and code == 0 else "[red]demo FAILED[/]")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OrthancUnavailable as exc:
        console.print(f"[red]{exc}[/] ({INSTALL_HINT})")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
