"""MINT answers written from the wire format in shared/seeds/PROTOCOLS.md, and a fake MINT server that serves a
generated cohort with them. There is no public MINT server; this is the stand-in for the parser and the contract.
"""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Callable, Iterable, Sequence
from xml.sax.saxutils import quoteattr

from testbed.cohort import GeneratedCohort, GeneratedInstance
from tests.fakehttp import FakeHTTPServer, FakeRequest, Reply

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def attr(tag: str, vr: str, val: str | None) -> str:
    value = "" if val is None else f" val={quoteattr(val)}"
    return f'<attr tag="{tag}" vr="{vr}"{value}/>'


def study_attrs(item: GeneratedInstance, series_count: int, instance_count: int) -> list[str]:
    return [
        attr("00080020", "DA", item.study_date),
        attr("00080050", "SH", item.accession_number),
        attr("00080061", "CS", "CT"),
        attr("00100010", "PN", item.patient_name),
        attr("00100020", "LO", item.patient_id),
        attr("0020000d", "UI", item.study_uid),
        attr("00201206", "IS", str(series_count)),
        attr("00201208", "IS", str(instance_count)),
        attr("00081030", "LO", None),  # present but empty
    ]


def mint_xml(
    items: Iterable[GeneratedInstance],
    level: str,
    *,
    syntax_for_series: Sequence[str] = (EXPLICIT_LE,),
    series_attrs_last: bool = True,
) -> bytes:
    """A studySearchResults answer for ``items`` at ``level`` (STUDY, SERIES or INSTANCE).

    Series attributes come after the series' instances when ``series_attrs_last`` (real Vitrea answers do this);
    each series gets a transfer syntax from ``syntax_for_series`` in turn.
    """
    tree: dict[str, dict[str, list[GeneratedInstance]]] = {}
    for item in items:
        tree.setdefault(item.study_uid, {}).setdefault(item.series_uid, []).append(item)
    out = [
        f'<studySearchResults xmlns="http://medical.nema.org/mint" QueryLevel="{level}" queryfields="" '
        'includefields="">'
    ]
    for study_uid, series_map in tree.items():
        first = next(iter(series_map.values()))[0]
        total = sum(len(v) for v in series_map.values())
        out.append(
            f'<study studyUUID="{uuid.uuid5(uuid.NAMESPACE_OID, study_uid)}" version="3" '
            'lastModified="2022-04-29T03:18:09.191Z">'
        )
        out.extend(study_attrs(first, len(series_map), total))
        if level in ("SERIES", "INSTANCE"):
            for n, (series_uid, instances) in enumerate(series_map.items()):
                syntax = syntax_for_series[n % len(syntax_for_series)]
                s_attrs = [
                    attr("0020000e", "UI", series_uid),
                    attr("00080060", "CS", "CT"),
                    attr("00200011", "IS", str(instances[0].series_index + 1)),
                    attr("00201209", "IS", str(len(instances))),
                ]
                out.append("<series>")
                if not series_attrs_last:
                    out.extend(s_attrs)
                if level == "INSTANCE":
                    for inst in instances:
                        out.append("<instance>")
                        out.append(attr("00080018", "UI", inst.sop_instance_uid))
                        out.append(attr("00020010", "UI", syntax))
                        out.append(attr("00200013", "IS", str(inst.instance_index + 1)))
                        out.append(attr("00280010", "US", "512"))
                        out.append("</instance>")
                if series_attrs_last:
                    out.extend(s_attrs)
                out.append("</series>")
        out.append("</study>")
    out.append("</studySearchResults>")
    return "\n".join(out).encode()


def _matches(pattern: str, value: str) -> bool:
    return not pattern or fnmatch.fnmatchcase(value, pattern)  # DICOM's * and ? are fnmatch's


def mint_handler(cohort: GeneratedCohort) -> Callable[[FakeRequest], Reply]:
    """A request handler answering MINT study searches over ``cohort`` (exact or ``*`` matching)."""

    def handle(request: FakeRequest) -> Reply:
        if request.path.rstrip("/") != "/mint/studies":
            return Reply(404, b"<html><body>not found</body></html>", {"Content-Type": "text/html"})
        items = [
            item
            for item in cohort
            if _matches(request.param("PatientID"), item.patient_id)
            and _matches(request.param("StudyInstanceUID"), item.study_uid)
            and _matches(request.param("AccessionNumber"), item.accession_number)
            and _matches(request.param("PatientName"), item.patient_name)
            and _matches(request.param("SeriesInstanceUID"), item.series_uid)
            and (not request.param("min_study_date") or request.param("min_study_date") <= item.study_date)
            and (not request.param("max_study_date") or item.study_date <= request.param("max_study_date"))
        ]
        body = mint_xml(items, request.param("QueryLevel", "STUDY"))
        return Reply(200, body, {"Content-Type": "application/xml"})

    return handle


def start_mint_server(cohort: GeneratedCohort) -> FakeHTTPServer:
    """A fake MINT server for ``cohort``; its MINT root is ``server.url + "/mint"``."""
    return FakeHTTPServer(mint_handler(cohort))
