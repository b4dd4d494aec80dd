"""De-identification in the engine: what the job record keeps of a ``--deid`` export, and how a process gets its
:class:`~trolley_tasks.deid.Deidentifier` back from it.

The job record holds the profile (which names the key's environment variable or file, never the key) and the key's
fingerprint (:meth:`~trolley_tasks.deid.Pseudonyms.fingerprint`). Every process that touches the job's files or
report (a worker fetching, the worker or the CLI writing the report) reads the key from its own environment, like
any other secret, and checks it against the fingerprint: a host without the key, or with another one, pauses the job
with a one-line reason instead of writing files under pseudonyms that do not match the rest of the export.

What an original identifier may and may not reach (docs/deid.md, "What stays where"):

- the output directory (files, names, report, ``.trolley/``): pseudonyms only;
- Redis *values*: the original UIDs, because the ledger must ask the PACS for them and recognise them in a re-run;
  the ledger's key *names* carry digests, never UIDs (:meth:`~trolley_tasks.engine.ledger.LedgerReader.series_key`);
- the linking table: only where the user named it (``--link-table``), mode 0600.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from trolley_tasks.deid import Deidentifier, DeidProfile
from trolley_tasks.engine.ledger import Ledger
from trolley_tasks.errors import ConfigurationError
from trolley_tasks.storage.durable import AtomicFile

UID_TEXT = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+){3,}(?![0-9.])")
"""A UID inside free text (an error message that quotes a URL or a UID): four or more dotted numbers."""


def job_fields(name: str, profile: DeidProfile, key: bytes, link_table: Path | None) -> dict[str, str]:
    """The job record's fields for a de-identified export: the profile (key-free), the key's fingerprint and where
    the linking table goes ('' for none)."""
    return {
        "deid": json.dumps({"name": name, "profile": profile.model_dump(mode="json")}, sort_keys=True),
        "deid_check": Deidentifier(profile, key).names.fingerprint(),
        "link_table": str(link_table.resolve()) if link_table is not None else "",
    }


def profile_of(fields: dict[str, str]) -> tuple[str, DeidProfile] | None:
    """The job's (profile name, profile), or None for a byte-identical export. Needs no key."""
    raw = fields.get("deid")
    if not raw:
        return None
    data = json.loads(raw)
    return data["name"], DeidProfile.model_validate(data["profile"])


def deidentifier_for(fields: dict[str, str]) -> Deidentifier | None:
    """This process's Deidentifier for the job, or None for a byte-identical export.

    Raises
    ------
    MissingCredentialError
        The key's variable or file is missing here (a host condition: the engine pauses the job).
    ConfigurationError
        The key here is not the one the export started with.
    """
    found = profile_of(fields)
    if found is None:
        return None
    name, profile = found
    deid = Deidentifier(profile, profile.read_key(f"[deid.{name}]"))
    if deid.names.fingerprint() != fields.get("deid_check"):
        raise ConfigurationError(
            f"[deid.{name}]: this host's de-identification key is not the one the export started with"
        )
    return deid


def scrub_uids(text: str, deid: Deidentifier | None) -> str:
    """``text`` with every UID in it replaced by its pseudonym (error messages quote URLs and UIDs)."""
    if deid is None or not text:
        return text
    return UID_TEXT.sub(lambda match: deid.uid(match.group(0)), text)


LINK_COLUMNS = ("kind", "original", "pseudonym")


def _link_rows(ledger: Ledger, job_id: str, deid: Deidentifier) -> Iterator[tuple[str, str, str]]:
    studies: set[str] = set()
    for series_uid in ledger.series_uids(job_id):
        study_uid, records = ledger.iter_series_records(job_id, series_uid)
        if study_uid not in studies:
            studies.add(study_uid)
            yield "StudyInstanceUID", study_uid, deid.uid(study_uid)
        yield "SeriesInstanceUID", series_uid, deid.uid(series_uid)
        for uid, record in records:
            if record[0] in ("d", "s"):
                yield "SOPInstanceUID", uid, deid.uid(uid)
    seen: set[tuple[str, str]] = set()
    for _, values in ledger.linked(job_id):
        for kind in ("PatientID", "AccessionNumber"):
            value = values.get(kind, "")
            if value and (kind, value) not in seen:
                seen.add((kind, value))
                yield kind, value, deid.names.identifier(kind, value)


def write_link_table(ledger: Ledger, job_id: str, path: Path, deid: Deidentifier) -> None:
    """The linking table (original, pseudonym) at ``path``, mode 0600 from its first byte, atomically. Only the
    instances written are listed, and the PatientID and AccessionNumber of every study written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path.parent, text=True) as table:
        os.fchmod(table.handle.fileno(), 0o600)
        out = csv.writer(table.handle)
        out.writerow(LINK_COLUMNS)
        for row in _link_rows(ledger, job_id, deid):
            out.writerow(row)
        table.commit(path)
