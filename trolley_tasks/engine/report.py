"""The export report, written by the engine when a job ends: ``<out>/trolley-report.json`` and ``.csv``.

One line per instance (its UIDs, the path relative to the output directory, its size, its status, the attempts,
and the error class and message when it failed), plus the job's id, counts, ``started_at`` / ``finished_at``
(ISO 8601, UTC) and source profile name, and every series the job's filter excluded with its rule (JSON
``excluded_series``; CSV rows with status ``excluded``, the rule and instance count in ``error_message``). Nothing
secret is in the ledger, so nothing secret can be in the report.

In a de-identified export (``--deid``) the report names everything by the pseudonyms the files carry: UIDs, paths,
and every UID quoted in an error message (:func:`~trolley_tasks.engine.deidentify.scrub_uids`). Instances its
profile left out once their header was seen are listed with status ``excluded`` and the reason. The linking table,
when asked for, is written with the report (:func:`~trolley_tasks.engine.deidentify.write_link_table`).

Both files are streamed from the ledger (a million-instance job does not need a million-row list in memory) and
written atomically (a temp file, then rename), so a reader never sees half a report. The CSV opens in a spreadsheet
as is: one header row, one row per instance, failed cohort rows and skipped bad rows at the end.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trolley_tasks.core import InstanceReference
from trolley_tasks.deid import Deidentifier
from trolley_tasks.engine.context import storage_for_layout
from trolley_tasks.engine.deidentify import deidentifier_for, scrub_uids, write_link_table
from trolley_tasks.engine.ledger import Ledger
from trolley_tasks.engine.models import Exclusion, InstanceRecord, InstanceState, JobStatus
from trolley_tasks.errors import TrolleyError
from trolley_tasks.storage.disk import clean_temp_files
from trolley_tasks.storage.durable import AtomicFile

log = logging.getLogger("trolley.engine.report")

REPORT_JSON = "trolley-report.json"
REPORT_CSV = "trolley-report.csv"
CSV_COLUMNS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "path",
    "size",
    "status",
    "attempts",
    "error_class",
    "error_message",
)


def _iso(status: JobStatus, name: str) -> str | None:
    value = getattr(status, name)
    return value.isoformat() if value else None


def job_summary(status: JobStatus, deid: Deidentifier | None = None) -> dict[str, Any]:
    return {
        "job_id": status.job_id,
        "state": status.state.value,
        "source": status.source,
        "output": status.output,
        "layout": status.layout,
        "started_at": _iso(status, "started_at"),
        "finished_at": _iso(status, "finished_at"),
        "counts": {
            "expected": status.expected,
            "done": status.done,
            "fetched": status.done - status.skipped,
            "already_on_disk": status.skipped,
            "failed": status.failed,
            "missing": status.missing,
            "bytes": status.bytes,
            "rows": status.rows,
            "rows_failed": status.rows_failed,
            "rows_skipped": status.rows_skipped,
        },
        "failures_by_class": status.failures_by_class,
        "excluded_series": [_exclusion(item, deid).model_dump() for item in status.excluded],
    }


def _exclusion(item: Exclusion, deid: Deidentifier | None) -> Exclusion:
    """``item`` under its pseudonyms in a de-identified export."""
    if deid is None:
        return item
    uids = {"study_uid": deid.uid(item.study_uid), "series_uid": deid.uid(item.series_uid)}
    if item.instance_uid:
        uids["instance_uid"] = deid.uid(item.instance_uid)
    return item.model_copy(update=uids)


_WHERE = re.compile(r"^.*?: row \d+(?:, column [^:]+)?")


def _withheld(line: str) -> str:
    """A bad row's description for a de-identified export's report: where it is, not what it says (its reason may
    quote a value of the row, a PatientID say). ``trolley-tasks status`` and the submitting command show it whole."""
    where = _WHERE.match(line)
    return f"{where.group(0) if where else 'a cohort row'}: rejected (the reason is withheld in a de-identified export)"


def _records(ledger: Ledger, job_id: str, layout: str, deid: Deidentifier | None) -> Iterator[InstanceRecord]:
    """The ledger's records with their paths filled in where the layout derives them from the UIDs (string work only:
    no filesystem call per instance); in a de-identified export, under the pseudonyms the files carry."""
    storage = storage_for_layout(layout)
    for record in ledger.instances(job_id):
        ref = InstanceReference(record.study_uid, record.series_uid, record.instance_uid)
        if deid is not None:
            ref = deid.reference(ref)
            update = {"study_uid": ref.study_uid, "series_uid": ref.series_uid, "instance_uid": ref.instance_uid}
            record = record.model_copy(update=update | {"message": scrub_uids(record.message, deid)})
        if not record.path and record.state.value in ("done", "skipped"):
            relative = storage.relative_reference_path(ref)
            if relative is not None:
                record = record.model_copy(update={"path": str(relative)})
        yield record


def write_report(ledger: Ledger, job_id: str) -> tuple[Path, Path]:
    """Write both report files into the job's output directory, each atomically and durably (the one writer,
    :mod:`trolley_tasks.storage.durable`), and the linking table of a de-identified export that asked for one;
    return the report's paths. Raises ConfigurationError when the export is de-identified and this host lacks
    its key."""
    status = ledger.status(job_id)
    if status is None:
        raise KeyError(job_id)
    fields = ledger.job_fields(job_id)
    deid = deidentifier_for(fields)
    out = Path(status.output)
    json_path, csv_path = out / REPORT_JSON, out / REPORT_CSV
    with AtomicFile(out, text=True) as json_file, AtomicFile(out, text=True) as csv_file:
        _write_both(ledger, status, deid, json_file.handle, csv.writer(csv_file.handle))
        json_file.commit(json_path)
        csv_file.commit(csv_path)
    if deid is not None and fields.get("link_table"):
        write_link_table(ledger, job_id, Path(fields["link_table"]), deid)
    return json_path, csv_path


def _write_both(ledger: Ledger, status: JobStatus, deid: Deidentifier | None, out: Any, rows: Any) -> None:
    """Stream the report: one JSON document and one CSV table, an instance (or a row) at a time."""
    job_id = status.job_id
    rows.writerow(CSV_COLUMNS)
    summary = json.dumps(job_summary(status, deid), indent=2)
    out.write(summary[:-2] + ',\n  "instances": [')
    n = 0
    for record in _records(ledger, job_id, status.layout, deid):
        if record.state is InstanceState.EXCLUDED:
            continue  # listed once, with the other exclusions, below
        item = {
            "StudyInstanceUID": record.study_uid,
            "SeriesInstanceUID": record.series_uid,
            "SOPInstanceUID": record.instance_uid,
            "path": record.path,
            "size": record.size,
            "status": record.state.value,
            "attempts": record.attempts,
            "error_class": record.error_class,
            "error_message": record.message,
        }
        out.write(("\n    " if n == 0 else ",\n    ") + json.dumps(item))
        rows.writerow([item[c] for c in CSV_COLUMNS])
        n += 1
    out.write('\n  ],\n  "failed_rows": [')
    for n, (_, failure) in enumerate(ledger.row_failures(job_id)):
        row, text = scrub_uids(failure.row, deid), scrub_uids(failure.message, deid)
        item = {"row": row, "error_class": failure.error_class, "error_message": text}
        out.write(("\n    " if n == 0 else ",\n    ") + json.dumps(item))
        message = f"{row}: {text}"
        rows.writerow(["", "", "", "", "", "row-failed", failure.attempts, failure.error_class, message])
    skipped = [_withheld(line) if deid else line for line in ledger.bad_rows(job_id)]
    out.write('\n  ],\n  "skipped_rows": ' + json.dumps(skipped) + "\n}\n")
    for bad in skipped:
        rows.writerow(["", "", "", "", "", "row-skipped", 0, "request-rejected", bad])
    for excluded in status.excluded:  # left out on purpose: the rule, and how many instances it kept out
        excluded = _exclusion(excluded, deid)
        message = f"{excluded.rule}: {excluded.instances} instances"
        where = [excluded.study_uid, excluded.series_uid, excluded.instance_uid]
        rows.writerow([*where, "", "", "excluded", 0, "", message])


def finalize_job(ledger: Ledger, job_id: str) -> bool:
    """What happens once when a job ends: write the report, then give the ledger keys their expiry. Returns True
    when this call wrote the report.

    It is keyed on ``reported_at``: an ended job whose report is on disk is left alone, so a duplicate
    ``trolley.finalize`` (the watchdog asks again when a report is missing) costs one read. A report that cannot be
    written (a full disk) is logged and does not undo the job: the watchdog asks again later, ``trolley-tasks
    report JOB`` writes it on demand, and ``trolley-tasks status`` has everything meanwhile.
    """
    status = ledger.status(job_id)
    if status is None or not status.state.ended or status.reported_at is not None:
        return False
    try:
        write_report(ledger, job_id)
    except (OSError, TrolleyError) as exc:  # a full disk, or this host lacks the de-identification key
        log.error("job %s ended but its report could not be written: %s", job_id, exc)
        return False
    ledger.mark_reported(job_id)
    ledger.expire_job(job_id)
    clean_temp_files(status.output)  # what fetches killed mid-write left behind, now that none can be running
    return True
