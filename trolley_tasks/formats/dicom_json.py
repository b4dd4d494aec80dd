"""DICOM JSON (PS3.18 Annex F.2) to pydicom Datasets, for QIDO-RS answers and WADO-RS metadata.

The result is what pydicom's :meth:`~pydicom.dataset.Dataset.from_json` gives (``tests/test_dicom_json.py`` compares
the two element by element), with four differences:

- **No fetching.** An element given by ``BulkDataURI`` (PS3.18 F.2.5, for example PixelData in WADO-RS metadata)
  is kept with an empty value. A searcher must never start downloading pixel data behind the caller's back, and
  a URI from the server is not something we follow blindly.
- **Errors are the server's.** A body that is not JSON, not a list of objects, or holds an element pydicom cannot
  decode is the server's fault: :class:`~trolley_tasks.errors.PayloadInvalidError`, with the source, never a
  ``ValueError`` that the engine would take for a bug.
- **Plain values are converted here, not by pydicom's JSON converter.** pydicom builds a
  ``JsonDataElementConverter`` per element and calls ``inspect.signature`` on the bulk data handler each time. The
  expansion of every study-level cohort row parses an instance-level answer, and this was most of the 37% of a
  WADO-RS worker's CPU that expansion took (docs/performance.md). Measured with ``python -m bench.qido_expansion``
  (one study of 2 x 50 CT instances as Orthanc 1.10 answers it, 22 attributes an instance, median of 30): this
  function took 512 us an instance through pydicom's converter, and 177 us with the values converted here. Only a
  ``"Value"`` of a plain VR, a PN given as components, or a sequence of those is converted here; anything else
  (InlineBinary, BulkDataURI, AT, a malformed PN) goes to pydicom's converter as before. A single value of most VRs
  is also handed to ``DataElement`` as already converted (see :data:`_SINGLE_VALUE`), which skips pydicom's
  setter. With that and no validation (below), the same answer took 12.7 ms instead of 21.0 (process time, median
  of 30, three alternating rounds against the tree before), and ``QidoRS.find_study_by_id`` 22 ms instead of 31.
- **No value validation.** pydicom checks each value against its VR and names one that fails in a warning
  (``Invalid value for VR DA: '1961-07-14'.``): a patient's birth date in a worker's log. Values are kept as the
  server sent them, without that check (``config.IGNORE``); the UIDs the tree is built on are checked by
  :mod:`~trolley_tasks.searchers.tree`.
"""

from __future__ import annotations

import json
from typing import Any

from pydicom import DataElement, Dataset, config
from pydicom.dataelem import empty_value_for_VR
from pydicom.jsonrep import convert_to_python_number
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import FLOAT_VR, INT_VR, VR, PersonName

from trolley_tasks.errors import PayloadInvalidError

_NUMBER_VRS = frozenset((INT_VR - {VR.AT}) | {VR.US_SS} | FLOAT_VR)
"""The VRs whose JSON values pydicom turns into int or float (``jsonrep.convert_to_python_number``)."""
_OTHER_VALUE_KEYS = ("InlineBinary", "BulkDataURI")
_DATE_TIME_VRS = frozenset((VR.DA, VR.DT, VR.TM))


def _same_value(value: Any) -> Any:
    return value


_SINGLE_VALUE: dict[str, Any] = {
    **{vr: _same_value for vr in VR if vr not in {VR.AT, VR.DS, VR.IS, VR.PN, VR.SQ, VR.UI, VR.UN} and " " not in vr},
    VR.UI: lambda value: UID(value, config.IGNORE),
    VR.PN: lambda value: PersonName(value, validation_mode=config.IGNORE),
}
"""A single value of these VRs becomes what pydicom's ``DataElement._convert`` makes of it without validation (the
value itself, a UID, a PersonName); ``DataElement`` is then told it is converted. The other VRs (DS and IS make
their own types, AT a tag, UN may take the tag's VR) and every multi-valued element go through pydicom's setter."""
_PN_COMPONENTS = ("Alphabetic", "Ideographic", "Phonetic")


def _keep_bulk_data_empty(tag: str, vr: str, uri: str) -> None:
    """The bulk data handler: the element stays, without value; the URI is not fetched (see module docstring)."""
    return None


def _person_name(value: dict[str, str]) -> str:
    """A PN value from its JSON components (PS3.18 F.2.2), joined as pydicom's converter joins them."""
    count = 3 if "Phonetic" in value else 2 if "Ideographic" in value else 1
    return "=".join(value.get(name, "") for name in _PN_COMPONENTS[:count])


def _plain_values(vr: str, values: list[Any]) -> list[Any] | None:
    """The element values of a ``"Value"`` list, or None when pydicom's converter must decide (AT, odd PN)."""
    if vr == "SQ":
        return [_dataset(item if item is not None else {}) for item in values]
    if vr == "PN":
        if not all(isinstance(item, dict) or item is None for item in values):
            return None  # pydicom warns and keeps it as it came
        return [_person_name(item) if item is not None else empty_value_for_VR(vr) for item in values]
    if vr == "AT":
        return None
    return [item if item is not None else empty_value_for_VR(vr) for item in values]


def _kept_as_is(vr: str) -> bool:
    """False for DA, DT and TM when pydicom is set to turn them into its date and time types."""
    return not (config.datetime_conversion and vr in _DATE_TIME_VRS)


def _element(key: str, mapping: dict[str, Any]) -> DataElement:
    """One DICOM JSON attribute (``{"vr": ..., "Value": [...]}``) as a DataElement, as pydicom would make it."""
    vr = mapping["vr"]
    values = mapping.get("Value")
    if isinstance(values, list) and "InlineBinary" not in mapping and "BulkDataURI" not in mapping:
        converted = _plain_values(vr, values) if values else []
        if converted is not None:
            value: Any = converted
            if not converted:
                value = empty_value_for_VR(vr)
            elif len(converted) == 1 and vr != "SQ":
                value = converted[0]
            if vr in _NUMBER_VRS:
                value = convert_to_python_number(value, vr)
            single = _SINGLE_VALUE.get(vr)
            if single is not None and isinstance(value, str | int | float) and _kept_as_is(vr):
                tag = BaseTag(int(key, 16))
                return DataElement(tag, vr, single(value), already_converted=True, validation_mode=config.IGNORE)
            try:
                return DataElement(int(key, 16), vr, value, validation_mode=config.IGNORE)
            except Exception as exc:  # as pydicom's from_json words it
                raise ValueError(f"Data element '{key}' could not be loaded from JSON: {value}") from exc
    if not any(name in mapping for name in ("Value", *_OTHER_VALUE_KEYS)):
        return DataElement(int(key, 16), vr, empty_value_for_VR(vr), validation_mode=config.IGNORE)
    value_key = next(name for name in ("Value", *_OTHER_VALUE_KEYS) if name in mapping)
    return DataElement.from_json(Dataset, key, vr, mapping[value_key], value_key, _keep_bulk_data_empty)


def _dataset(obj: dict[str, Any]) -> Dataset:
    elements = [_element(key, mapping) for key, mapping in obj.items()]
    if not any(element.VR == VR.SQ or element.tag.is_private for element in elements):
        # what Dataset.add does for these, without its checks per element (private creators, sequences)
        return Dataset({element.tag: element for element in elements})
    dataset = Dataset()
    for element in elements:
        dataset.add(element)
    return dataset


def dataset_from_json(obj: Any, *, source: str | None = None, what: str = "DICOM JSON") -> Dataset:
    """One DICOM JSON object (``{"0020000D": {"vr": "UI", "Value": [...]}, ...}``) as a Dataset.

    Raises
    ------
    PayloadInvalidError
        If ``obj`` is not a JSON object or an element cannot be decoded.
    """
    if not isinstance(obj, dict):
        raise PayloadInvalidError(
            f"{what}: expected a JSON object per DICOM object, got {type(obj).__name__}", source=source
        )
    try:
        return _dataset(obj)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PayloadInvalidError(f"{what}: an element could not be decoded: {exc}", source=source) from exc


def datasets_from_json(body: bytes, *, source: str | None = None, what: str = "DICOM JSON") -> list[Dataset]:
    """A DICOM JSON body (a JSON array of objects, PS3.18 F.2.1) as Datasets, in the server's order.

    An empty body counts as an empty array: some servers answer "no match" with 200 and nothing, next to the
    standard 204 (PS3.18 8.3.4.4) and ``[]``.

    Raises
    ------
    PayloadInvalidError
        If the body is not UTF-8 JSON, not an array, or holds an undecodable object.
    """
    if not body.strip():
        return []
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadInvalidError(f"{what}: the answer is not JSON ({exc})", source=source) from exc
    if not isinstance(parsed, list):
        raise PayloadInvalidError(
            f"{what}: expected a JSON array of DICOM objects, got {type(parsed).__name__}", source=source
        )
    return [dataset_from_json(item, source=source, what=what) for item in parsed]
