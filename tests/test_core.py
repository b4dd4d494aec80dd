"""The reference, level and tree semantics of trolley_tasks.core, and Query validation."""

from __future__ import annotations

from datetime import datetime

import pytest
from pydantic import ValidationError
from pydicom import Dataset

from trolley_tasks.core import (
    DICOMObjectLevels,
    ExtendedQuery,
    Instance,
    InstanceReference,
    Query,
    QueryLevels,
    Series,
    SeriesReference,
    Study,
    StudyReference,
    is_valid_uid,
    to_instance_refs,
    to_references,
    to_series_level_refs,
    validate_uid,
)
from trolley_tasks.errors import InvalidUIDError, NoReferencesFoundError, UnSupportedParameterError


def make_study(series: int = 2, instances: int = 3) -> Study:
    study = Study("1.1", data=Dataset())
    for se in range(series):
        s = study.add_series(Series(f"1.1.{se + 1}"))
        for i in range(instances):
            s.add_instance(Instance(f"1.1.{se + 1}.{i + 1}"))
    return study


def test_levels_are_ordered_study_highest() -> None:
    assert DICOMObjectLevels.STUDY > DICOMObjectLevels.SERIES > DICOMObjectLevels.INSTANCE
    for level in DICOMObjectLevels:
        assert QueryLevels.from_object_level(level).to_object_level() == level
    assert QueryLevels.from_object_level(DICOMObjectLevels.SERIES) is QueryLevels.SERIES


def test_references_are_frozen_hashable_and_levelled() -> None:
    a = InstanceReference("1.2", "1.2.3", "1.2.3.4")
    b = InstanceReference("1.2", "1.2.3", "1.2.3.4")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.level is DICOMObjectLevels.INSTANCE
    assert SeriesReference("1.2", "1.2.3").level is DICOMObjectLevels.SERIES
    assert StudyReference("1.2").level is DICOMObjectLevels.STUDY
    with pytest.raises(AttributeError):
        a.instance_uid = "9"  # type: ignore[misc]
    assert a.series() == SeriesReference("1.2", "1.2.3")


def test_seed_example_instance_contained_references_is_itself() -> None:
    # seeds: Instance.contained_references(max_level=Series) -> (InstanceReference,)
    instance = make_study().series[0].instances[0]
    assert instance.contained_references(max_level=DICOMObjectLevels.SERIES) == (
        InstanceReference("1.1", "1.1.1", "1.1.1.1"),
    )


def test_seed_example_study_broken_up_into_series_references() -> None:
    # seeds: Study.contained_references(max_level=Series) -> (SeriesReference, SeriesReference, ...)
    refs = make_study().contained_references(max_level=DICOMObjectLevels.SERIES)
    assert refs == (SeriesReference("1.1", "1.1.1"), SeriesReference("1.1", "1.1.2"))


def test_study_at_study_level_is_its_own_reference_and_instances_are_all() -> None:
    study = make_study()
    assert study.contained_references(DICOMObjectLevels.STUDY) == (StudyReference("1.1"),)
    assert len(study.contained_references(DICOMObjectLevels.INSTANCE)) == 6


def test_study_without_deeper_information_cannot_be_broken_up() -> None:
    with pytest.raises(NoReferencesFoundError):
        Study("1.5").contained_references(DICOMObjectLevels.SERIES)
    with pytest.raises(NoReferencesFoundError):
        StudyReference("1.5").contained_references(DICOMObjectLevels.INSTANCE)
    # a series without its instances must not be silently dropped from an instance-level expansion
    study = make_study()
    study.add_series(Series("1.1.9"))
    with pytest.raises(NoReferencesFoundError):
        study.contained_references(DICOMObjectLevels.INSTANCE)


def test_tree_navigation() -> None:
    study = make_study()
    assert [s.uid for s in study.children()] == ["1.1.1", "1.1.2"]
    assert len(study.all_instances()) == 6 and len(study.all_series()) == 2
    series = study.get("1.1.2")
    assert series.parent is study and series.get("1.1.2.3").parent is series
    assert series.get("1.1.2.3").reference() == InstanceReference("1.1", "1.1.2", "1.1.2.3")
    assert series.reference() == SeriesReference("1.1", "1.1.2")
    assert series.all_instances()[0].all_instances() == [series.instances[0]]
    with pytest.raises(KeyError):
        study.get("1.1.7")
    assert study.max_object_depth() is DICOMObjectLevels.INSTANCE
    assert Study("1.7").max_object_depth() is DICOMObjectLevels.STUDY
    shallow = Study("1.8")
    shallow.add_series(Series("1.8.1"))
    assert shallow.max_object_depth() is DICOMObjectLevels.SERIES


def test_to_references_and_kin() -> None:
    study = make_study()
    single = study.series[0].instances[0]
    assert to_instance_refs(single) == [single.reference()]
    assert len(to_instance_refs([study, study.series[0]])) == 6  # duplicates removed, order kept
    assert to_series_level_refs([study, single]) == [
        SeriesReference("1.1", "1.1.1"),
        SeriesReference("1.1", "1.1.2"),
        single.reference(),
    ]
    assert to_references(StudyReference("1.1"), DICOMObjectLevels.STUDY) == [StudyReference("1.1")]
    with pytest.raises(NoReferencesFoundError):
        to_series_level_refs([StudyReference("1.1")])


@pytest.mark.parametrize("uid", ["1", "1.2.840.10008.1.2.1", "0.0", "1." + "2" * 62])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)
    assert validate_uid(uid) == uid


@pytest.mark.parametrize(
    "uid",
    ["", ".", "1.", ".1", "1..2", "1.2a", "../etc", "1/2", "1.2\x00", " 1.2", "1." + "2" * 63, None, 12],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError, match="DICOM UID"):
        validate_uid(uid, "StudyInstanceUID")
    assert isinstance(InvalidUIDError("x"), ValueError)


def test_references_validate_their_uids() -> None:
    with pytest.raises(InvalidUIDError, match="SOPInstanceUID"):
        InstanceReference("1.2", "1.2.3", "../../etc/passwd")
    with pytest.raises(InvalidUIDError):
        Study("not-a-uid")


def test_query_defaults_and_short_string() -> None:
    q = Query(PatientID="1234", query_level=QueryLevels.INSTANCE)
    assert q.to_short_string() == "Query(PatientID=1234, query_level=INSTANCE)"
    dated = Query(min_study_date=datetime(2020, 3, 1), max_study_date=datetime(2020, 3, 3))
    assert "min_study_date=2020-03-01" in dated.to_short_string()


def test_query_rejects_bad_input() -> None:
    with pytest.raises(ValidationError, match="both"):
        Query(min_study_date=datetime(2020, 3, 1))
    with pytest.raises(ValidationError, match="after"):
        Query(min_study_date=datetime(2020, 3, 3), max_study_date=datetime(2020, 3, 1))
    with pytest.raises(ValidationError, match="not DICOM keywords"):
        Query(include_fields=["PatientBirthDate", "NotAKeyword"])
    with pytest.raises(ValidationError, match="extra"):
        Query(Unknown="x")  # type: ignore[call-arg]


def test_seed_query_example_validates() -> None:
    q = Query(
        ModalitiesInStudy="CT*",
        min_study_date=datetime(year=2020, month=3, day=1),
        max_study_date=datetime(year=2020, month=3, day=3),
        include_fields=["PatientBirthDate", "ReferringPhysicianName"],
    )
    assert q.include_fields == ["PatientBirthDate", "ReferringPhysicianName"]


class LimitedQuery(Query):
    limit: int = 0


def test_init_from_query_keeps_values_and_refuses_loss() -> None:
    q = Query(PatientID="1", query_level=QueryLevels.SERIES)
    converted = LimitedQuery.init_from_query(q)
    assert isinstance(converted, LimitedQuery)
    assert converted.PatientID == "1" and converted.query_level is QueryLevels.SERIES
    assert Query.init_from_query(LimitedQuery(PatientID="1")).PatientID == "1"  # default limit: nothing lost
    with pytest.raises(UnSupportedParameterError, match="limit"):
        Query.init_from_query(LimitedQuery(limit=5))


def test_extended_query_checks_include_fields_per_level() -> None:
    ExtendedQuery(include_fields=["PatientBirthDate"])
    ExtendedQuery(include_fields=["Modality"], query_level=QueryLevels.SERIES)
    ExtendedQuery(include_fields=["Rows"], query_level=QueryLevels.INSTANCE)
    with pytest.raises(ValidationError, match="cannot be returned at query_level STUDY"):
        ExtendedQuery(include_fields=["Rows"])
    with pytest.raises(ValidationError, match="SERIES"):
        ExtendedQuery(include_fields=["Rows"], query_level=QueryLevels.SERIES)


def test_the_package_root_names_the_public_api() -> None:
    import trolley_tasks
    from trolley_tasks.core import StudyReference as CoreStudyReference
    from trolley_tasks.trolley import Trolley as TrolleyClass

    assert trolley_tasks.StudyReference is CoreStudyReference and trolley_tasks.Trolley is TrolleyClass
    assert all(getattr(trolley_tasks, name, None) is not None for name in trolley_tasks.__all__)
