"""DICOM JSON to Datasets: our converter gives what pydicom's ``Dataset.from_json`` gives, element by element; and the
tree builder's ``adopt`` never lets a parent share an element with its child."""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import pytest
from pydicom import Dataset, config

from trolley_tasks.core import QueryLevels
from trolley_tasks.errors import PayloadInvalidError
from trolley_tasks.formats.dicom_json import _keep_bulk_data_empty, dataset_from_json, datasets_from_json
from trolley_tasks.searchers.tree import build_tree

STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.2", "1.2.826.0.1.3680043.8.498.1.2.3"


def orthanc_instance(sop: str = SOP) -> dict[str, Any]:
    """An instance as Orthanc 1.10's QIDO-RS answers it (the attributes it sends by default)."""
    return {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00080018": {"vr": "UI", "Value": [sop]},
        "00080020": {"vr": "DA", "Value": ["20240101"]},
        "00080030": {"vr": "TM", "Value": ["080000"]},
        "00080050": {"vr": "SH", "Value": ["A12000000"]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "00080090": {"vr": "PN", "Value": [{"Alphabetic": "REFERRER^TROLLEY"}]},
        "0008103E": {"vr": "LO", "Value": ["AXIAL 1"]},
        "00081190": {"vr": "UR", "Value": [f"http://pacs/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{sop}"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "TROLLEY^PATIENT0000"}]},
        "00100020": {"vr": "LO", "Value": ["TT12P0000"]},
        "0020000D": {"vr": "UI", "Value": [STUDY]},
        "0020000E": {"vr": "UI", "Value": [SERIES]},
        "00200011": {"vr": "IS", "Value": [1]},
        "00200013": {"vr": "IS", "Value": [1]},
        "00280010": {"vr": "US", "Value": [512]},
    }


EDGE_CASES: dict[str, dict[str, Any]] = {
    "orthanc instance": orthanc_instance(),
    "multi-valued numbers": {
        "00280030": {"vr": "DS", "Value": [0.5, 0.5]},
        "00200037": {"vr": "DS", "Value": [1, 0, 0, 0, 1, 0]},
        "00181310": {"vr": "US", "Value": [0, 512, 512, 0]},
        "00201208": {"vr": "IS", "Value": ["12"]},
        "00181050": {"vr": "DS", "Value": ["1.25"]},
        "00280106": {"vr": "SS", "Value": [-1024]},
        "00189087": {"vr": "FD", "Value": [1000]},
        "00209241": {"vr": "FL", "Value": [0.25]},
        "00081160": {"vr": "UL", "Value": [1, 2]},
    },
    "multi-valued strings": {
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "AXIAL"]},
        "00080061": {"vr": "CS", "Value": ["CT", "SR"]},
    },
    "empty and null values": {
        "00100030": {"vr": "DA"},
        "00100040": {"vr": "CS", "Value": []},
        "00080090": {"vr": "PN", "Value": [None]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", None]},
        "00200013": {"vr": "IS", "Value": [None]},
        "00081115": {"vr": "SQ", "Value": []},
        "00081111": {"vr": "SQ"},
    },
    "person name components": {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}]},
        "00080090": {"vr": "PN", "Value": [{"Alphabetic": "A^B", "Phonetic": "やまだ^たろう"}]},
        "00081070": {"vr": "PN", "Value": [{"Ideographic": "山田"}, {"Alphabetic": "C^D"}]},
        "00081050": {"vr": "PN", "Value": [{}]},
    },
    "sequences": {
        "00081115": {
            "vr": "SQ",
            "Value": [
                {
                    "0020000E": {"vr": "UI", "Value": [SERIES]},
                    "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [SOP]}}, None, {}]},
                }
            ],
        }
    },
    "handed to pydicom": {
        "00209165": {"vr": "AT", "Value": ["00100020", "0020000D"]},
        "00291010": {"vr": "OB", "InlineBinary": "AAECAw=="},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://pacs/bulk/1"},
        "00420011": {"vr": "OB", "BulkDataURI": ["http://pacs/bulk/2"]},
        "00080080": {"vr": "LO", "Value": "not a list"},
    },
}


def _pydicom(obj: dict[str, Any]) -> Dataset | type[Exception]:
    try:
        return Dataset.from_json(obj, bulk_data_uri_handler=_keep_bulk_data_empty)
    except Exception as exc:  # the oracle's error, for the cases pydicom refuses
        return type(exc)


def _same(ours: Dataset, theirs: Dataset) -> None:
    assert list(ours.keys()) == list(theirs.keys())
    for mine, other in zip(ours, theirs, strict=True):
        assert (mine.tag, mine.VR) == (other.tag, other.VR)
        if mine.VR == "SQ":
            assert len(mine.value) == len(other.value)
            for item, other_item in zip(mine.value, other.value, strict=True):
                _same(item, other_item)
        else:
            assert type(mine.value) is type(other.value), mine
            assert mine.value == other.value, mine


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_converter_gives_what_pydicom_gives(name: str) -> None:
    document = EDGE_CASES[name]
    for key, mapping in document.items():  # element by element, so that one pydicom refusal does not hide others
        obj = {key: mapping}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = _pydicom(obj)
            if isinstance(expected, Dataset):
                _same(dataset_from_json(obj), expected)
            else:
                with pytest.raises(PayloadInvalidError):
                    dataset_from_json(obj)


def test_dates_and_times_follow_pydicoms_datetime_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = {
        "00080020": {"vr": "DA", "Value": ["20240101"]},
        "00080030": {"vr": "TM", "Value": ["080000"]},
        "0008002A": {"vr": "DT", "Value": ["20240101080000"]},
    }
    monkeypatch.setattr(config, "datetime_conversion", True)
    ours, theirs = dataset_from_json(obj), Dataset.from_json(obj)
    _same(ours, theirs)
    assert type(ours.StudyDate).__name__ == "DA"  # not the string: the setting is followed


def test_whole_answer_round_trip() -> None:
    body = json.dumps([orthanc_instance(f"{SOP}.{n}") for n in range(3)]).encode()
    datasets = datasets_from_json(body)
    assert [str(ds.SOPInstanceUID) for ds in datasets] == [f"{SOP}.{n}" for n in range(3)]
    assert datasets[0].PatientName == "TROLLEY^PATIENT0000" and datasets[0].InstanceNumber == 1


def test_a_value_that_fails_validation_is_kept_and_not_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom names such a value in a warning, and a birth date is patient data; ours keeps it without a word."""
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.WARN)  # pydicom's default
    obj = orthanc_instance() | {
        "00100030": {"vr": "DA", "Value": ["1961-07-14"]},
        "00080060": {"vr": "CS", "Value": ["ct"]},
    }
    with pytest.warns(UserWarning, match="'ct'"):  # what pydicom does with it
        Dataset.from_json(obj)
    caplog.clear()
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        (ds,) = datasets_from_json(json.dumps([obj]).encode())
    assert ds.PatientBirthDate == "1961-07-14" and ds.Modality == "ct"
    assert not caplog.records and not raised, [*caplog.messages, *map(str, raised)]


@pytest.mark.parametrize("adopt", [True, False])
def test_parents_never_share_elements_with_their_children(adopt: bool) -> None:
    answers = datasets_from_json(json.dumps([orthanc_instance(f"{SOP}.{n}") for n in range(2)]).encode())
    study = build_tree(answers, QueryLevels.INSTANCE, adopt=adopt)[0]
    instance = study.series[0].instances[0]
    assert (instance.data is answers[0]) is adopt
    assert study.data.PatientID == "TT12P0000" and study.series[0].data.Modality == "CT"
    assert "SOPInstanceUID" not in study.data and "SOPInstanceUID" not in study.series[0].data
    study.data.PatientID = "CHANGED"
    study.series[0].data.Modality = "MR"
    assert instance.data.PatientID == "TT12P0000" and instance.data.Modality == "CT"
    assert answers[1].PatientID == "TT12P0000"
