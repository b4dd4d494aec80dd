"""Series filters against a real Orthanc serving a research-shaped cohort (CT, scout, short series, SR, a burned-in
secondary capture), with real workers: what each rule keeps and excludes, the ledger's ``expected``, the report's
exclusions, and a dry run that queues nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import BasicTextSRStorage

from testbed.cohort import ResearchCohort
from tests.engine.conftest import EngineEnv, Workers
from trolley_tasks.engine.api import dry_run
from trolley_tasks.engine.models import JobState
from trolley_tasks.series_filter import SeriesFilter

pytestmark = pytest.mark.slow

RESEARCH = ResearchCohort(studies=2, series=1, instances=4, seed=21)
"""Per study: AXIAL 1 (4 CT), SCOUT (2 CT), AXIAL 5MM SHORT (2 CT), DOSE REPORT (1 SR), SCREEN SAVE (1 OT, burned)."""


@pytest.fixture(scope="module")
def orthanc(orthanc_factory: Any) -> Any:
    """This module's Orthanc (the engine fixtures' profiles point at it)."""
    return orthanc_factory(RESEARCH)


def kinds_of(series_uids: set[str]) -> list[str]:
    """The cohort's series kinds (axial, scout, ...) among ``series_uids``, sorted, one per series."""
    kinds = {item.series_uid: item.kind for item in RESEARCH}
    return sorted(kinds[uid] for uid in series_uids)


@pytest.mark.parametrize(
    ("rules", "excluded"),
    [
        (SeriesFilter(include_modality=["CT"]), ["burned", "sr"]),
        (SeriesFilter(exclude_modality=["SR", "OT"]), ["burned", "sr"]),
        (SeriesFilter(exclude_series_description="scout|localizer"), ["scout"]),
        (SeriesFilter(include_series_description="^AXIAL"), ["burned", "scout", "sr"]),
        (SeriesFilter(min_instances=3), ["burned", "scout", "short", "sr"]),
        (SeriesFilter(exclude_sop_class=[BasicTextSRStorage]), ["sr"]),
    ],
)
def test_each_rule_keeps_and_excludes_exactly(engine_env: EngineEnv, rules: SeriesFilter, excluded: list[str]) -> None:
    result = dry_run(engine_env.settings, RESEARCH.study_refs(), source="wado-rs", filters=rules)
    dropped = {s.series_uid for s in result.series if s.rule is not None}
    kept = {s.series_uid for s in result.series if s.rule is None}
    assert kinds_of(dropped) == sorted(excluded * RESEARCH.studies)
    assert len(kept) + len(dropped) == 10
    assert result.kept[2] == sum(1 for item in RESEARCH if item.series_uid in kept)
    assert result.sample_size is not None and result.sample_size > 0


def test_export_with_filters_expects_only_what_it_keeps(workers: Workers, fresh: EngineEnv, tmp_path: Path) -> None:
    rules = SeriesFilter(include_modality=["CT"], exclude_series_description="scout|localizer", min_instances=3)
    out = tmp_path / "filtered"
    job = fresh.engine.submit(RESEARCH.study_refs(), source="wado-rs", output=out, filters=rules)
    status = fresh.wait(job, until=lambda s: s.reported_at is not None)  # the report is on disk
    axial = [item for item in RESEARCH if item.kind == "axial"]
    assert status.state is JobState.DONE, status
    assert (status.expected, status.done, status.failed) == (len(axial), len(axial), 0)
    on_disk = sorted(p.name for p in out.rglob("*.dcm") if ".trolley" not in p.parts)
    assert on_disk == sorted(f"{item.sop_instance_uid}.dcm" for item in axial)
    assert sorted(s.series_uid for s in fresh.engine.series(job)) == sorted({item.series_uid for item in axial})
    rules_by_kind = {kinds_of({e.series_uid})[0]: e.rule for e in status.excluded}
    assert rules_by_kind == {
        "scout": "exclude-series-description 'scout|localizer'",
        "short": "min-instances 3 (series has 2)",
        "sr": "include-modality CT (series is SR)",
        "burned": "include-modality CT (series is OT)",
    }
    assert len(status.excluded) == 8
    report = json.loads((out / "trolley-report.json").read_text())
    assert sorted(e["series_uid"] for e in report["excluded_series"]) == sorted(e.series_uid for e in status.excluded)
    csv_rows = [line for line in (out / "trolley-report.csv").read_text().splitlines() if ",excluded," in line]
    assert len(csv_rows) == 8 and any("min-instances 3" in line for line in csv_rows)
    # the filter is part of the export: the same cohort without it is another job, which expects everything
    other = fresh.engine.submit(RESEARCH.study_refs(), source="wado-rs", output=tmp_path / "all")
    assert other != job
    assert fresh.wait(other, until=lambda s: s.reported_at is not None).expected == len(RESEARCH)


def test_dry_run_queues_nothing_and_named_filters_come_from_the_config(
    fresh: EngineEnv, redis_service: Any, tmp_path: Path
) -> None:
    config = tmp_path / "trolley.toml"
    config.write_text(
        fresh.config.read_text() + '\n[filters.ct-series]\ninclude_modality = ["CT"]\nmin_instances = 3\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TROLLEY_")}
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("StudyInstanceUID\n" + "\n".join(ref.study_uid for ref in RESEARCH.study_refs()) + "\n")
    command = [sys.executable, "-m", "trolley_tasks.cli", "--config", str(config), "export", str(cohort)]
    command += ["--source", "wado-rs", "--out", str(tmp_path / "out"), "--filters", "ct-series", "--dry-run"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kept: 2 studies, 2 series, 8 instances" in done.stdout
    assert "excluded: 2 studies, 8 series, 12 instances" in done.stdout
    assert "estimated size:" in done.stdout and "8 instances x" in done.stdout
    client = redis_service.client()
    written = [k for k in client.scan_iter("trolley:*") if k != b"trolley:watchdog:lock"]  # the workers' own lock
    assert written == []
    assert client.llen("trolley.fetch") == 0 and client.llen("trolley.expand") == 0
    assert not (tmp_path / "out").exists()
    unknown = subprocess.run([*command[:-3], "--filters", "nope", "--dry-run"], capture_output=True, text=True, env=env)
    assert unknown.returncode == 2 and "no [filters.nope]" in unknown.stderr
