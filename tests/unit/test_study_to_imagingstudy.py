"""handlers/study_to_imagingstudy.py on generated and pydicom's bundled studies: every
output validated as FHIR R4 (tests/fhir_models.py), odd and missing values, several
series, time zones."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import dicomgen
from fhir_models import validate
from harness import CANARY_ID, CANARY_NAME
from mfconsole.handlers.api import Context, DicomObject, MappingError

REPO = Path(__file__).resolve().parents[2]
CTX = Context(route="r", destination="fhir", destination_kind="fhir")
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def handler():
    spec = importlib.util.spec_from_file_location("study_to_imagingstudy_t",
                                                  REPO / "handlers" / "study_to_imagingstudy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def objs(*datasets: Dataset) -> list[DicomObject]:
    return [DicomObject(ds) for ds in datasets]


def image(study: str, series: str, **values) -> Dataset:
    ds = dicomgen.make_image(study, pixel_bytes=16)
    ds.SeriesInstanceUID = series
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def test_contract_and_a_two_series_study(handler):
    assert handler.LEVEL == "study" and handler.VERSION
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    a = image(study, s1, AccessionNumber="ACC1", StudyDescription="CT  chest ", StudyTime="101112",
              TimezoneOffsetFromUTC="+0100", SeriesNumber="3", SeriesDescription="axial",
              InstanceNumber="1", BodyPartExamined="CHEST", SeriesDate="20260101", SeriesTime="1012")
    b = image(study, s1, InstanceNumber="2", TimezoneOffsetFromUTC="+0100")
    c = image(study, s2, Modality="MR", SOPClassUID=MR, InstanceNumber="1")
    out = handler.handle_study(objs(a, b, copy.deepcopy(b), c), CTX)   # b twice: counted once
    validate(out)
    assert out["identifier"] == [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{study}"},
        {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
         "value": "ACC1"}]
    assert out["status"] == "available"
    assert out["subject"] == {"type": "Patient", "identifier": {"value": CANARY_ID}}
    assert out["started"] == "2026-01-01T10:11:12+01:00"
    assert out["modality"] == [{"system": handler.DCM, "code": "CT"}, {"system": handler.DCM, "code": "MR"}]
    assert (out["numberOfSeries"], out["numberOfInstances"]) == (2, 3)
    assert out["description"] == "CT chest"
    first, second = out["series"]
    assert first["uid"] == s1 and first["number"] == 3 and first["description"] == "axial"
    assert first["numberOfInstances"] == 2 and first["bodySite"] == {"display": "CHEST"}
    assert first["started"] == "2026-01-01T10:12:00+01:00"
    assert [i["number"] for i in first["instance"]] == [1, 2]
    assert first["instance"][0] == {"uid": a.SOPInstanceUID, "number": 1,
                                    "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{CT}"}}
    assert second["modality"]["code"] == "MR" and second["numberOfInstances"] == 1
    assert "endpoint" not in out and CANARY_NAME not in str(out)   # no name in an ImagingStudy


@pytest.mark.parametrize("date, tm, offset, zone, expected", [
    ("20260315", "", "", None, "2026-03-15"),
    ("20260315", "0930", "", None, "2026-03-15"),                 # local time, no zone: date only
    ("20260315", "0930", "-0500", None, "2026-03-15T09:30:00-05:00"),
    ("20260315", "09", "+0000", None, "2026-03-15T09:00:00+00:00"),
    ("20260315", "093001.123", "+0530", None, "2026-03-15T09:30:01.123+05:30"),
    ("20260315", "09:30:01", "+1400", None, "2026-03-15T09:30:01+14:00"),
    ("20260315", "0930", "+1500", None, "2026-03-15"),            # not an offset
    ("20260315", "0930", "", "Europe/Berlin", "2026-03-15T09:30:00+01:00"),
    ("20260715", "0930", "", "Europe/Berlin", "2026-07-15T09:30:00+02:00"),   # DST
    ("20260715", "0930", "", "No/Such_Zone", "2026-07-15"),
    ("2026.07.15", "", "", None, "2026-07-15"),
    ("20261399", "0930", "+0100", None, None),                    # not a date
    ("", "0930", "+0100", None, None),
    ("20260715", "2561", "+0100", None, "2026-07-15"),            # not a time
])
def test_started(handler, date, tm, offset, zone, expected):
    handler.ASSUME_TIMEZONE = zone
    ds = image(generate_uid(), generate_uid(), StudyDate=date, StudyTime=tm)
    if offset:
        ds.TimezoneOffsetFromUTC = offset
    out = handler.handle_study(objs(ds), CTX)
    validate(out)
    assert out.get("started") == expected


def test_odd_and_missing_values_leave_elements_out(handler):
    study, series = generate_uid(), generate_uid()
    odd = image(study, series, Modality="ct!", SeriesNumber="-3", InstanceNumber="1.5",
                AccessionNumber="   ", StudyDescription="", IssuerOfPatientID="HOSP A")
    del odd.PatientID
    bare = Dataset()
    bare.StudyInstanceUID = study           # no series, no SOP Instance UID: not listed
    no_class = image(study, series)
    del no_class.SOPClassUID                # counted, not listed (sopClass is required)
    bad_uid = image(study, "1.2.abc")       # not a UID: not listed
    out = handler.handle_study(objs(odd, bare, no_class, bad_uid), CTX)
    validate(out)
    assert out["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{study}"}]
    assert out["subject"] == {"type": "Patient", "extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]}
    assert "description" not in out and out["numberOfSeries"] == 1
    (s,) = out["series"]
    assert s["modality"]["code"] == "OT" and "number" not in s
    assert s["numberOfInstances"] == 2 and [i.get("number") for i in s["instance"]] == [None]
    handler.REQUIRE_PATIENT_ID = True
    with pytest.raises(MappingError) as err:
        handler.handle_study(objs(odd), CTX)
    assert "PatientID" in str(err.value)


def test_no_study_uid_is_the_only_mapping_error(handler):
    ds = image(generate_uid(), generate_uid())
    ds.StudyInstanceUID = "not-a-uid-" + CANARY_ID
    with pytest.raises(MappingError) as err:
        handler.handle_study(objs(ds), CTX)
    assert "StudyInstanceUID" in str(err.value) and CANARY_ID not in str(err.value)


def test_patient_issuer_and_endpoint(handler):
    ds = image(generate_uid(), generate_uid(), IssuerOfPatientID="1.2.3.4")
    out = handler.handle_study(objs(ds), CTX)
    assert out["subject"]["identifier"] == {"value": CANARY_ID, "system": "urn:oid:1.2.3.4"}
    q = Dataset()
    q.UniversalEntityID, q.UniversalEntityIDType = "https://hosp.example/mrn", "URI"
    ds.IssuerOfPatientID = "HOSP"
    ds.IssuerOfPatientIDQualifiersSequence = [q]
    handler.ENDPOINT = "Endpoint/wado"
    out = handler.handle_study(objs(ds), CTX)
    validate(out)
    assert out["subject"]["identifier"] == {"value": CANARY_ID, "system": "https://hosp.example/mrn"}
    assert out["endpoint"] == [{"reference": "Endpoint/wado"}]
    del ds.IssuerOfPatientIDQualifiersSequence
    handler.PATIENT_ID_SYSTEM = "urn:oid:9.9"
    out = handler.handle_study(objs(ds), CTX)
    assert out["subject"]["identifier"] == {"value": CANARY_ID, "system": "urn:oid:9.9",
                                            "assigner": {"display": "HOSP"}}


def test_bundled_files_sr_title_and_anatomy(handler):
    """pydicom's CT_small, MR_small and test-SR as one study (their UIDs rewritten into
    it), plus an SR from dicomgen: titles from the SR concept name."""
    study = generate_uid()
    datasets = []
    for name in ("CT_small.dcm", "MR_small.dcm", "test-SR.dcm"):
        ds = dcmread(get_testdata_file(name), stop_before_pixels=True)
        ds.StudyInstanceUID = study
        datasets.append(ds)
    sr = dicomgen.make_sr(study)
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "51185008", "SCT", "Chest"
    sr.AnatomicRegionSequence = [region]
    out = handler.handle_study(objs(*datasets, sr), CTX)
    validate(out)
    assert out["numberOfInstances"] == 4
    codes = [s["modality"]["code"] for s in out["series"]]
    assert codes[:2] == ["CT", "MR"] and "SR" in codes
    titles = [i.get("title") for s in out["series"] for i in s["instance"]]
    assert any(titles), titles
    sr_series = next(s for s in out["series"] if s["uid"] == sr.SeriesInstanceUID)
    assert sr_series["bodySite"] == {"system": "http://snomed.info/sct", "code": "51185008", "display": "Chest"}
