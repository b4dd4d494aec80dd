"""MINT (Medical Imaging Network Transport, as Vitrea serves it): study search over HTTP with an XML answer.

``GET {url}/studies?<DICOM keywords>&min_study_date=&max_study_date=&QueryLevel=&IncludeFields=&limit=`` answers
``<studySearchResults xmlns="http://medical.nema.org/mint">`` holding ``study``, ``series`` and ``instance``
elements, each with ``<attr tag="0020000d" vr="UI" val="..."/>`` children (shared/seeds/PROTOCOLS.md). Series
attributes may come after the series' instances, so a series is read whole before its instances are placed.

The answer comes from a server we do not control, so parsing is defensive: defusedxml forbids DTDs and entities
(no entity-expansion bomb, nothing external resolved), the body is capped at the profile's ``max_answer_bytes``
(64 MiB by default), and anything
malformed is a :class:`~trolley_tasks.errors.PayloadInvalidError` that says where.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import requests
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import XMLParser
from pydantic import ValidationError, field_validator
from pydicom import DataElement, Dataset
from pydicom.sequence import Sequence

from trolley_tasks.core import ExtendedQuery, Query, QueryLevels, Study
from trolley_tasks.errors import PayloadInvalidError, UnSupportedParameterError
from trolley_tasks.searchers.base import SearcherBase
from trolley_tasks.searchers.qido_rs_query import query_string
from trolley_tasks.searchers.tree import TreeBuilder, dataset_uid
from trolley_tasks.transports.http import HTTPEndpoint, read_body, redact_url, request, retrying

MINT_NAMESPACE = "http://medical.nema.org/mint"

_NS = f"{{{MINT_NAMESPACE}}}"
_NUMERIC_VRS = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float}
_SINGLE_VALUED_VRS = {"LT", "ST", "UT", "UR"}
_BULK_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}
_DEPTH = {QueryLevels.STUDY: 0, QueryLevels.SERIES: 1, QueryLevels.INSTANCE: 2}


class MintQuery(ExtendedQuery):
    """A MINT study search. ``include_fields`` must be valid for the query level (``trolley_tasks.fields``).

    Parameters
    ----------
    limit
        At most this many studies; 0 means all (the MINT default the server is told explicitly).
    """

    limit: int = 0

    @field_validator("limit")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("limit cannot be negative")
        return value

    def as_parameters(self) -> dict[str, str]:
        """The MINT query parameters (dicomtrolley's name), in a stable order: the matching keys that are set,
        dates as ``YYYYMMDD``, ``QueryLevel``, ``IncludeFields`` and ``limit``.

        Unlike dicomtrolley, ``limit=0`` is sent rather than left out: the server is told "all" instead of being
        left to its own default, which may be a cap.
        """
        params: dict[str, str] = {}
        for name in (
            "StudyInstanceUID",
            "AccessionNumber",
            "PatientName",
            "PatientID",
            "ModalitiesInStudy",
            "SeriesInstanceUID",
        ):
            value = getattr(self, name)
            if value:
                params[name] = value
        params.update(self.extended_values())
        if self.min_study_date and self.max_study_date:
            params["min_study_date"] = f"{self.min_study_date:%Y%m%d}"
            params["max_study_date"] = f"{self.max_study_date:%Y%m%d}"
        params["QueryLevel"] = self.query_level.value
        if self.include_fields:
            params["IncludeFields"] = ",".join(self.include_fields)
        params["limit"] = str(self.limit)
        return params


@dataclass(eq=False)
class MintStudy(Study):
    """A study as MINT describes it: also MINT's own ``studyUUID`` (not a DICOM UID) and ``lastModified``."""

    mint_uuid: str = ""
    last_modified: str = ""


def _value(vr: str, val: str | None) -> Any:
    if val is None or val == "" or vr in _BULK_VRS:
        return None
    if vr in _NUMERIC_VRS:
        convert = _NUMERIC_VRS[vr]
        parts = [convert(part) for part in val.split("\\")]
        return parts[0] if len(parts) == 1 else parts
    if vr in _SINGLE_VALUED_VRS:
        return val
    parts_text = val.split("\\")
    return parts_text[0] if len(parts_text) == 1 else parts_text


def _element(attr: ET.Element) -> DataElement:
    tag_text, vr = attr.get("tag", ""), attr.get("vr", "")
    if len(tag_text) != 8 or not vr:
        raise ValueError(f"attr needs an 8-hex-digit tag and a vr, got tag={tag_text!r} vr={vr!r}")
    tag = int(tag_text, 16)
    if vr == "SQ":
        items = [_dataset(item) for item in attr if item.tag == f"{_NS}item"]
        return DataElement(tag, vr, Sequence(items))
    return DataElement(tag, vr, _value(vr, attr.get("val")))


def _dataset(element: ET.Element) -> Dataset:
    """The ``attr`` children of one MINT element (in any order among its other children) as a Dataset."""
    ds = Dataset()
    for attr in element:
        if attr.tag == f"{_NS}attr":
            ds.add(_element(attr))
    return ds


def parse_mint_studies_response(response: requests.Response) -> list[MintStudy]:
    """A whole MINT answer (a ``requests.Response``, read to the end) as studies, every level read: dicomtrolley's
    entry point for a response a script already has. :class:`Mint` streams, caps and parses to the query level
    instead. Raises :class:`~trolley_tasks.errors.PayloadInvalidError` as :func:`parse_mint_xml` does."""
    studies = parse_mint_xml(response.content, QueryLevels.INSTANCE, source=redact_url(response.url or ""))
    return [study for study in studies if isinstance(study, MintStudy)]


def parse_mint_xml(body: bytes | list[bytes], level: QueryLevels, *, source: str | None = None) -> list[Study]:
    """A MINT study search answer as the object tree, down to ``level`` (deeper elements are not read).

    Raises
    ------
    PayloadInvalidError
        If the answer is not well-formed XML, uses a DTD or entities, is not a ``studySearchResults`` in the MINT
        namespace, or holds an attribute or UID that cannot be read.
    """
    chunks = [body] if isinstance(body, bytes) else body
    parser = XMLParser(forbid_dtd=True)
    try:
        for chunk in chunks:
            parser.feed(chunk)
        root = parser.close()
    except ET.ParseError as exc:
        raise PayloadInvalidError(f"MINT answer is not well-formed XML: {exc}", source=source) from exc
    except DefusedXmlException as exc:
        raise PayloadInvalidError(f"MINT answer uses a forbidden XML feature: {exc!r}", source=source) from exc
    except (LookupError, ValueError) as exc:  # an encoding expat does not know, or a multi-byte one it refuses
        raise PayloadInvalidError(f"MINT answer declares an unreadable encoding: {exc}", source=source) from exc
    if root.tag != f"{_NS}studySearchResults":
        raise PayloadInvalidError(
            f"MINT answer's root is {root.tag!r}, expected studySearchResults in namespace {MINT_NAMESPACE}",
            source=source,
        )
    depth = _DEPTH[QueryLevels(level)]
    builder = TreeBuilder(source=source, study_class=MintStudy)
    try:
        for study_el in root.iterfind(f"{_NS}study"):
            study_ds = _dataset(study_el)
            study = builder.add(study_ds, QueryLevels.STUDY)
            assert isinstance(study, MintStudy)
            study.mint_uuid = study_el.get("studyUUID", study.mint_uuid)
            study.last_modified = study_el.get("lastModified", study.last_modified)
            study_uid = dataset_uid(study_ds, "StudyInstanceUID", source=source)
            if depth < 1:
                continue
            for series_el in study_el.iterfind(f"{_NS}series"):
                series_ds = _dataset(series_el)
                series_ds.StudyInstanceUID = study_uid
                builder.add(series_ds, QueryLevels.SERIES)
                series_uid = dataset_uid(series_ds, "SeriesInstanceUID", source=source)
                if depth < 2:
                    continue
                for instance_el in series_el.iterfind(f"{_NS}instance"):
                    instance_ds = _dataset(instance_el)
                    instance_ds.StudyInstanceUID = study_uid
                    instance_ds.SeriesInstanceUID = series_uid
                    builder.add(instance_ds, QueryLevels.INSTANCE)
    except (ValueError, TypeError, OverflowError) as exc:
        raise PayloadInvalidError(f"MINT answer holds an unreadable attr: {exc}", source=source) from exc
    return builder.studies()


class Mint(HTTPEndpoint, SearcherBase):
    """A MINT server's study search.

    Parameters
    ----------
    session, source, timeout
        As for every HTTP client (:class:`~trolley_tasks.transports.http.HTTPEndpoint`).
    url
        The MINT root, for example ``https://server/mint``; searches go to ``{url}/studies``.
    """

    def ensure_query_type(self, query: Query) -> MintQuery:
        """``query`` as a MintQuery; UnSupportedParameterError when a value would be lost or is invalid for MINT."""
        try:
            return MintQuery.init_from_query(query)
        except ValidationError as exc:
            raise UnSupportedParameterError(f"MINT cannot run {query.to_short_string()}: {exc}") from exc

    def find_studies(self, query: Query) -> list[Study]:
        mint_query = self.ensure_query_type(query)
        url = f"{self.url}/studies?{query_string(mint_query.as_parameters())}"

        def once() -> list[Study]:
            response = request(
                self.session,
                "GET",
                url,
                source=self.source,
                headers={"Accept": "application/xml"},
                timeout=self.timeout,
            )
            # too broad a question: asking again cannot help (read_body raises request-rejected, never retried)
            body = read_body(response, limit=self.max_answer_bytes, source=self.source)
            return parse_mint_xml([body], mint_query.query_level, source=self.source)

        return retrying(once, tries=self.request_tries)
