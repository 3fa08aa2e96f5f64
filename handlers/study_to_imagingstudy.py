"""A whole study → one FHIR R4 ImagingStudy (study level: runs once the study is stable,
on every object of it held for the destination; headers only, never pixel data).

| ImagingStudy | from |
|---|---|
| identifier | ``urn:dicom:uid`` / ``urn:oid:<StudyInstanceUID>``; AccessionNumber with type ACSN (v2-0203) |
| status | ``available`` |
| subject | Reference(Patient) by identifier: PatientID, system from IssuerOfPatientID (below); no PatientID: a data-absent-reason extension (or MappingError with ``REQUIRE_PATIENT_ID``) |
| started | StudyDate + StudyTime, with TimezoneOffsetFromUTC (below) |
| modality | the series' modalities, each once, DCM code system |
| numberOfSeries / numberOfInstances | distinct Series / SOP Instance UIDs listed |
| description | StudyDescription |
| endpoint | ``ENDPOINT`` when set |
| series[] | uid, number, modality, description, numberOfInstances, bodySite, started (SeriesDate + SeriesTime) |
| series.instance[] | uid, sopClass (``urn:ietf:rfc:3986`` / ``urn:oid:<uid>``), number, title |

Times (FHIR dateTime): a time needs a UTC offset in FHIR. With TimezoneOffsetFromUTC
(0008,0201) the time is written with that offset; without it, the time is read in
``ASSUME_TIMEZONE`` when that is set, else only the date is sent (a local time cannot
be written correctly). Seconds are added when DICOM gives only hours or minutes.

Tolerant of vendor data: a missing or unreadable value leaves its element out; an
object without Series or SOP Instance UID is left out of ``series``; a series without
a readable Modality gets ``MISSING_MODALITY`` (R4 requires one). Only a study without
a Study Instance UID raises MappingError (it names the attribute, never a value).

To adapt: copy this file under a new name, change the settings below or ``imaging_study``,
bump ``VERSION``, and check the output with a FHIR validator (tests validate it with
fhir.resources' R4B models).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from mfconsole.dicomvalues import code_from, first_item, parse_da, parse_tm, text_of, value_of
from mfconsole.handlers.api import MappingError

VERSION = "1.0.0"
LEVEL = "study"

# Reference to the Endpoint resource that serves the images (e.g. WADO-RS), written in
# ImagingStudy.endpoint: e.g. "Endpoint/pacs-wado". None: no endpoint.
ENDPOINT = None
# IANA zone in which a StudyTime/SeriesTime without TimezoneOffsetFromUTC is local
# time (e.g. "Europe/Berlin"). None: such a time is left out (the date is kept).
ASSUME_TIMEZONE = None
# Identifier.system of the Patient ID when the object names no issuer as an OID or URI
# (e.g. "urn:oid:1.2.3.4" for your MRN). None: no system (IssuerOfPatientID, if any,
# goes in assigner.display).
PATIENT_ID_SYSTEM = None
# True: a study without Patient ID dead-letters instead of going out with a subject
# marked data-absent.
REQUIRE_PATIENT_ID = False
# Series.modality is required in R4: the code used when a series has none (DICOM "OT").
MISSING_MODALITY = "OT"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DATA_ABSENT = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
# Coding systems of CodingSchemeDesignators used for anatomy (AnatomicRegionSequence).
SCHEMES = {"SCT": "http://snomed.info/sct", "SRT": "http://snomed.info/sct", "DCM": DCM,
           "LN": "http://loinc.org", "FMA": "http://purl.org/sig/ont/fma"}

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_CS = re.compile(r"[A-Z0-9_]+( [A-Z0-9_]+)*")
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_URI = re.compile(r"[a-z][a-z0-9+.-]*:\S+")


def handle_study(study, ctx):
    if not study:
        raise MappingError("the study holds no object")
    return imaging_study([obj.dataset for obj in study])


def imaging_study(datasets):
    first = datasets[0]
    study_uid = next((u for u in (_uid(ds, "StudyInstanceUID") for ds in datasets) if u), "")
    if not study_uid:
        raise MappingError("StudyInstanceUID (0020,000D) is missing or not a valid UID")
    out = {"resourceType": "ImagingStudy",
           "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}]}
    accession = _text(first, "AccessionNumber")
    if accession:
        out["identifier"].append({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                                  "value": accession})
    out["status"] = "available"
    out["subject"] = subject(first)
    started = started_at(first, "StudyDate", "StudyTime")
    if started:
        out["started"] = started
    series = series_list(datasets)
    modalities = list(dict.fromkeys(s["modality"]["code"] for s in series))
    if modalities:
        out["modality"] = [{"system": DCM, "code": m} for m in modalities]
    if ENDPOINT:
        out["endpoint"] = [{"reference": ENDPOINT}]
    out["numberOfSeries"] = len(series)
    out["numberOfInstances"] = sum(s["numberOfInstances"] for s in series)
    description = _text(first, "StudyDescription")
    if description:
        out["description"] = description
    if series:
        out["series"] = series
    return out


def subject(ds):
    """Reference(Patient) by identifier: the resource is found by Patient ID, not by id."""
    patient_id = _text(ds, "PatientID")
    if not patient_id:
        if REQUIRE_PATIENT_ID:
            raise MappingError("PatientID (0010,0020) is missing")
        return {"type": "Patient", "extension": [{"url": DATA_ABSENT, "valueCode": "unknown"}]}
    identifier = {"value": patient_id}
    system = patient_id_system(ds)
    if system:
        identifier["system"] = system
    else:
        issuer = _text(ds, "IssuerOfPatientID")
        if PATIENT_ID_SYSTEM:
            identifier["system"] = PATIENT_ID_SYSTEM
        if issuer:
            identifier["assigner"] = {"display": issuer}
    return {"type": "Patient", "identifier": identifier}


def patient_id_system(ds):
    """A URI for the issuer: the qualifiers' Universal Entity ID (ISO → urn:oid:, URI
    as is), else IssuerOfPatientID when it is itself an OID."""
    qualifiers = first_item(ds, "IssuerOfPatientIDQualifiersSequence")
    if qualifiers is not None:
        entity, kind = _text(qualifiers, "UniversalEntityID"), _text(qualifiers, "UniversalEntityIDType")
        if kind == "ISO" and _OID.fullmatch(entity):
            return f"urn:oid:{entity}"
        if kind in ("URI", "URL") and _URI.fullmatch(entity):
            return entity
    issuer = _text(ds, "IssuerOfPatientID")
    return f"urn:oid:{issuer}" if _OID.fullmatch(issuer) else None


def series_list(datasets):
    """Series in order of first arrival, each with its distinct instances."""
    by_uid = {}
    for ds in datasets:
        series_uid, instance_uid = _uid(ds, "SeriesInstanceUID"), _uid(ds, "SOPInstanceUID")
        if not series_uid or not instance_uid:
            continue
        entry = by_uid.setdefault(series_uid, {"first": ds, "instances": {}})
        entry["instances"].setdefault(instance_uid, ds)
    return [one_series(uid, e["first"], e["instances"]) for uid, e in by_uid.items()]


def one_series(uid, ds, instances):
    out = {"uid": uid}
    number = _unsigned(ds, "SeriesNumber")
    if number is not None:
        out["number"] = number
    modality = _text(ds, "Modality").upper()
    out["modality"] = {"system": DCM, "code": modality if _CS.fullmatch(modality) else MISSING_MODALITY}
    description = _text(ds, "SeriesDescription")
    if description:
        out["description"] = description
    out["numberOfInstances"] = len(instances)
    site = body_site(ds)
    if site:
        out["bodySite"] = site
    started = started_at(ds, "SeriesDate", "SeriesTime")
    if started:
        out["started"] = started
    listed = [i for i in (instance(u, one) for u, one in instances.items()) if i]
    if listed:
        out["instance"] = listed
    return out


def instance(uid, ds):
    sop_class = _uid(ds, "SOPClassUID")
    if not sop_class:
        return None          # sopClass is required in R4: the instance is counted, not listed
    out = {"uid": uid, "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{sop_class}"}}
    number = _unsigned(ds, "InstanceNumber")
    if number is not None:
        out["number"] = number
    title = instance_title(ds)
    if title:
        out["title"] = title
    return out


def instance_title(ds):
    """DocumentTitle (encapsulated documents), the SR's concept name, or ContentLabel."""
    title = _text(ds, "DocumentTitle")
    if title:
        return title
    concept = code_from(first_item(ds, "ConceptNameCodeSequence"))
    if concept and concept.meaning:
        return concept.meaning.strip()
    return _text(ds, "ContentLabel")


def body_site(ds):
    """AnatomicRegionSequence's code (system from its scheme), else BodyPartExamined as
    a display-only Coding (no code is invented for it)."""
    code = code_from(first_item(ds, "AnatomicRegionSequence"))
    if code is not None and code.value and code.scheme in SCHEMES:
        coding = {"system": SCHEMES[code.scheme], "code": code.value.strip()}
        if code.meaning.strip():
            coding["display"] = code.meaning.strip()
        return coding
    part = _text(ds, "BodyPartExamined")
    return {"display": part} if part else None


# -- values ------------------------------------------------------------------------------

def started_at(ds, date_keyword, time_keyword):
    """A FHIR dateTime from a DA and a TM (and the object's UTC offset), or None."""
    _, day = parse_da(_text(ds, date_keyword))
    if day is None:
        return None
    written, clock = parse_tm(_text(ds, time_keyword))
    if clock is None:
        return day.isoformat()
    zone = utc_offset(_text(ds, "TimezoneOffsetFromUTC"))
    if zone is None and ASSUME_TIMEZONE:
        try:
            from zoneinfo import ZoneInfo
            local = datetime.combine(day, clock).replace(tzinfo=ZoneInfo(ASSUME_TIMEZONE))
            zone = timezone(local.utcoffset())
        except Exception:      # an unknown zone name: as if none were set
            zone = None
    if zone is None:
        return day.isoformat()
    digits = written.replace(":", "").split(".")[0]
    fraction = written.split(".")[1] if "." in written else ""
    text = f"{day.isoformat()}T{clock.hour:02d}:{clock.minute:02d}:{clock.second:02d}"
    if fraction and len(digits) == 6:
        text += "." + fraction
    offset = zone.utcoffset(None)
    if not timedelta(hours=-12) <= offset <= timedelta(hours=14):
        return day.isoformat()
    sign, minutes = ("-" if offset < timedelta(0) else "+"), abs(int(offset.total_seconds())) // 60
    return f"{text}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def utc_offset(text):
    """DICOM TimezoneOffsetFromUTC ("+0100", "-0500") → a timezone, or None."""
    m = re.fullmatch(r"([+-])(\d{2})(\d{2})", text or "")
    if not m or int(m[3]) > 59:
        return None
    delta = timedelta(hours=int(m[2]), minutes=int(m[3]))
    if delta > timedelta(hours=14):
        return None
    return timezone(-delta if m[1] == "-" else delta)


def _text(ds, keyword):
    """Single-line text: trimmed, inner whitespace runs made one space (FHIR strings
    must not be blank); "" when absent or unreadable."""
    try:
        return " ".join(text_of(ds, keyword).split())
    except Exception:
        return ""


def _uid(ds, keyword):
    uid = _text(ds, keyword)
    return uid if len(uid) <= 64 and _UID.fullmatch(uid) else ""


def _unsigned(ds, keyword):
    """An IS value as a FHIR unsignedInt, or None (missing, not a whole number, < 0)."""
    value = value_of(ds, keyword)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    if not number.is_integer() or not 0 <= number <= 2147483647:
        return None
    return int(number)

