"""MSH, PID, PV1, ORC, OBR (and OBX) of an HL7 v2.5.1 ORU^R01 from any DICOM header.

Reusable by every handler that reports on a DICOM object, SR or not::

    from mfconsole.hl7 import header
    observations = header.linkage(ds) + [header.Observation("TX", ("", "Note"), "Done")]
    return header.oru_r01(ds, ctx, observations)

Mapping (IHE RAD TF-2 RAD-28 "Structured Report Export" where it says something;
HL7 v2.5.1 chapter 7 and IHE Scheduled Workflow conventions otherwise):

| HL7 | DICOM |
|---|---|
| MSH-3..6 | ctx sending/receiving application/facility (HD namespace ID) |
| MSH-7 / MSH-10 / MSH-11 | ctx.now() / ctx.message_control_id (fixed per delivery) / ctx.processing_id |
| MSH-9 / MSH-12 / MSH-18 | ``ORU^R01^ORU_R01`` / ``2.5.1`` / ``UNICODE UTF-8`` (what ``to_bytes`` writes) |
| MSH-21 | ctx.handler_name ``^`` ctx.handler_version: which mapping produced the message |
| PID-3 | Patient ID ``^^^`` Issuer of Patient ID ``&`` Universal Entity ID ``&`` type ``^`` Identifier Type Code; then Other Patient IDs Sequence as repetitions |
| PID-5 / -7 / -8 | Patient's Name (XPN) / Birth Date / Sex (Table 0001: M F O, else U) |
| PV1-2 | ``U`` (patient class unknown: a DICOM header does not say) |
| ORC-1 | ``RE`` (observations to follow) |
| ORC-2, OBR-2 / ORC-3, OBR-3 | Placer / Filler Order Number (Imaging Service Request) with their issuers, from the Referenced Request Sequence (SR) or Request Attributes Sequence (images); the filler number falls back to the Accession Number |
| OBR-4 | Procedure Code Sequence, else Requested Procedure Code Sequence, else Performed Procedure Code Sequence (SR); else the text of Study / Requested Procedure Description; else the document title or SOP class name |
| OBR-7 | Observation DateTime, else Content Date/Time, else Study Date/Time (RAD-28 uses the first two) |
| OBR-16 | Requesting Physician, else Referring Physician's Name (XCN) |
| OBR-18 / OBR-19 | Accession Number / Requested Procedure ID (IHE SWF placer fields) |
| OBR-22 | Content Date/Time, else Instance Creation Date/Time (report status change) |
| OBR-24 | ``service_section`` argument (e.g. ``RAD``), empty by default |
| OBR-25, every OBX-11 | ``F`` when Completion Flag is COMPLETE and Verification Flag VERIFIED; ``P`` for any other SR; ``F`` for objects without these flags |
| OBR-32 | first Verifying Observer (name, and the code value of its Identification Code Sequence as id) |
| OBX (``linkage``) | RAD-28: ``HD`` ``^SR Instance UID`` (SR only), ``HD`` ``^Study Instance UID`` |

A value DICOM leaves empty where HL7 requires one (PID-3, PID-5) is sent as HL7's
explicit null ``""``: the result still reaches the receiver, whose unmatched-result
workflow is the right place to reconcile it. ``require_patient_id=True`` raises
``MappingError`` instead (the delivery dead-letters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from pydicom.uid import UID

from mfconsole.dicomvalues import code_from, first_item, text_of, value_of
from mfconsole.hl7.datatypes import ce, cnn, dt, dtm, dtm_of, sex, ts_now, xcn, xpn
from mfconsole.hl7.message import NULL, HL7Error, HL7Message, Repeat, Segment, msh_segment, segment

__all__ = ["MappingError", "Observation", "ORU_R01", "VERSION", "msh", "pid", "pv1", "orc",
           "obr", "obx", "obx_segments", "linkage", "result_status", "oru_r01"]

ORU_R01 = ("ORU", "R01", "ORU_R01")
VERSION = "2.5.1"
CHARSET = "UNICODE UTF-8"


class MappingError(HL7Error):
    """The object cannot be mapped. The message names DICOM attributes and HL7 fields,
    never values."""


@dataclass(frozen=True)
class Observation:
    """One OBX: OBX-2 value type, OBX-3 identifier (CE components), OBX-5 value,
    OBX-4 sub-id, OBX-6 units (CE), OBX-11 status (None: the report's), OBX-14."""

    value_type: str
    identifier: Sequence[str]
    value: Any
    sub_id: str = ""
    units: Sequence[str] | None = None
    status: str | None = None
    observed_at: str = ""


def msh(ctx: Any, message_type: Sequence[str] = ORU_R01) -> Segment:
    control_id = getattr(ctx, "message_control_id", "")
    if not control_id:
        raise MappingError("MSH-10: the context has no message control id")
    profile = (ctx.handler_name, ctx.handler_version) if ctx.handler_name else None
    return msh_segment(
        ctx.sending_application, ctx.sending_facility,
        ctx.receiving_application, ctx.receiving_facility,
        ts_now(ctx.now()), None, tuple(message_type), control_id,
        ctx.processing_id or "P", VERSION,
        None, None, None, None, None, CHARSET, None, None, profile)


def _issuer(ds: Any, keyword: str) -> tuple[str, str, str]:
    """HD (namespace, universal id, type) from an Issuer ... Sequence / Qualifiers item."""
    item = first_item(ds, keyword)
    if item is None:
        return "", "", ""
    return (text_of(item, "LocalNamespaceEntityID"), text_of(item, "UniversalEntityID"),
            text_of(item, "UniversalEntityIDType"))


def _patient_id(ds: Any) -> tuple[Any, ...] | None:
    pid_value = text_of(ds, "PatientID")
    if not pid_value:
        return None
    qualifiers = first_item(ds, "IssuerOfPatientIDQualifiersSequence")
    namespace = text_of(ds, "IssuerOfPatientID")
    universal, universal_type, id_type = "", "", ""
    if qualifiers is not None:
        universal = text_of(qualifiers, "UniversalEntityID")
        universal_type = text_of(qualifiers, "UniversalEntityIDType")
        id_type = text_of(qualifiers, "IdentifierTypeCode")
    return (pid_value, "", "", (namespace, universal, universal_type), id_type)


def pid(ds: Any, *, require_patient_id: bool = False) -> Segment:
    ids = []
    main = _patient_id(ds)
    if main is not None:
        ids.append(main)
    for item in value_of(ds, "OtherPatientIDsSequence") or ():
        other = _patient_id(item)
        if other is not None:
            ids.append(other)
    if main is None and require_patient_id:
        raise MappingError("PID-3: Patient ID (0010,0020) is empty")
    if not ids:
        ids = [NULL]
    name = xpn(text_of(ds, "PatientName"))
    return segment("PID", "1", None, Repeat(*ids), None, name if any(name) else NULL, None,
                   dt(text_of(ds, "PatientBirthDate")), sex(text_of(ds, "PatientSex")))


def pv1(patient_class: str = "U") -> Segment:
    return segment("PV1", "1", patient_class)


def _request(ds: Any) -> Any:
    """Where the order lives: the SR's Referenced Request Sequence, an image's Request
    Attributes Sequence, or the top level."""
    return (first_item(ds, "ReferencedRequestSequence")
            or first_item(ds, "RequestAttributesSequence") or ds)


def _order_numbers(ds: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(placer EI, filler EI); the filler number falls back to the Accession Number."""
    req = _request(ds)
    placer = text_of(req, "PlacerOrderNumberImagingServiceRequest")
    filler = text_of(req, "FillerOrderNumberImagingServiceRequest")
    placer_ei = (placer, *_issuer(req, "OrderPlacerIdentifierSequence")) if placer else ()
    if filler:
        filler_ei = (filler, *_issuer(req, "OrderFillerIdentifierSequence"))
    else:
        accession = _accession(ds)
        filler_ei = (accession, *_issuer(ds, "IssuerOfAccessionNumberSequence")) if accession else ()
    return placer_ei, filler_ei


def _accession(ds: Any) -> str:
    return text_of(ds, "AccessionNumber") or text_of(_request(ds), "AccessionNumber")


def orc(ds: Any, order_control: str = "RE") -> Segment:
    placer, filler = _order_numbers(ds)
    return segment("ORC", order_control, placer, filler)


def result_status(ds: Any) -> str:
    """OBR-25 / OBX-11: F (final) or P (preliminary), from the SR flags."""
    completion = text_of(ds, "CompletionFlag").upper()
    verification = text_of(ds, "VerificationFlag").upper()
    if not completion and not verification:
        return "F"
    return "F" if completion == "COMPLETE" and verification == "VERIFIED" else "P"


def _service(ds: Any, fallback_text: str) -> tuple[str, ...]:
    req = _request(ds)
    for holder, keyword in ((ds, "ProcedureCodeSequence"), (req, "RequestedProcedureCodeSequence"),
                            (ds, "RequestedProcedureCodeSequence"),
                            (ds, "PerformedProcedureCodeSequence")):
        code = code_from(first_item(holder, keyword))
        if code is not None and code.value:
            return ce(code)
    text = (text_of(ds, "StudyDescription") or text_of(req, "RequestedProcedureDescription")
            or fallback_text)
    if not text:
        sop_class = text_of(ds, "SOPClassUID")
        text = UID(sop_class).name if sop_class else "DICOM object"
    return ("", text)


def _observation_time(ds: Any) -> str:
    offset = text_of(ds, "TimezoneOffsetFromUTC")
    return (dtm(text_of(ds, "ObservationDateTime"))
            or dtm_of(text_of(ds, "ContentDate"), text_of(ds, "ContentTime"), offset)
            or dtm_of(text_of(ds, "StudyDate"), text_of(ds, "StudyTime"), offset))


def _report_time(ds: Any) -> str:
    offset = text_of(ds, "TimezoneOffsetFromUTC")
    return (dtm_of(text_of(ds, "ContentDate"), text_of(ds, "ContentTime"), offset)
            or dtm_of(text_of(ds, "InstanceCreationDate"), text_of(ds, "InstanceCreationTime"),
                      offset))


def _ordering_provider(ds: Any) -> tuple[str, ...] | None:
    name = text_of(_request(ds), "RequestingPhysician") or text_of(ds, "ReferringPhysicianName")
    parts = xcn(name)
    return parts if any(parts) else None


def _interpreter(ds: Any) -> tuple[tuple[str, ...]] | None:
    observer = first_item(ds, "VerifyingObserverSequence")
    if observer is None:
        return None
    code = code_from(first_item(observer, "VerifyingObserverIdentificationCodeSequence"))
    value = cnn(text_of(observer, "VerifyingObserverName"), code.value if code else "")
    return value if any(value[0]) else None


def obr(ds: Any, status: str, *, service_section: str = "",
        fallback_service_text: str = "") -> Segment:
    placer, filler = _order_numbers(ds)
    fields: list[Any] = [None] * 32
    fields[0] = "1"                                             # OBR-1
    fields[1] = placer                                          # OBR-2
    fields[2] = filler                                          # OBR-3
    fields[3] = _service(ds, fallback_service_text)             # OBR-4
    fields[6] = _observation_time(ds)                           # OBR-7
    fields[15] = _ordering_provider(ds)                         # OBR-16
    fields[17] = _accession(ds)                                 # OBR-18
    fields[18] = text_of(_request(ds), "RequestedProcedureID")  # OBR-19
    fields[21] = _report_time(ds)                               # OBR-22
    fields[23] = service_section                                # OBR-24
    fields[24] = status                                         # OBR-25
    fields[31] = _interpreter(ds)                               # OBR-32
    return segment("OBR", *fields)


def obx(set_id: int, o: Observation, status: str) -> Segment:
    return segment("OBX", str(set_id), o.value_type, tuple(o.identifier), o.sub_id, o.value,
                   tuple(o.units) if o.units else None, None, None, None, None,
                   o.status or status, None, None, o.observed_at)


def obx_segments(observations: Iterable[Observation], status: str) -> list[Segment]:
    """OBX segments numbered 1..n (OBX-1) in order."""
    return [obx(n, o, status) for n, o in enumerate(observations, start=1)]


def linkage(ds: Any, *, is_sr: bool | None = None) -> list[Observation]:
    """RAD-28's identification OBXs: the SR Instance UID (for an SR) and the Study
    Instance UID, so the receiver can link the result to the DICOM document and study."""
    out = []
    if is_sr if is_sr is not None else "ContentSequence" in ds:
        out.append(Observation("HD", ("", "SR Instance UID"), text_of(ds, "SOPInstanceUID")))
    study = text_of(ds, "StudyInstanceUID")
    if study:
        out.append(Observation("HD", ("", "Study Instance UID"), study))
    return out


def oru_r01(ds: Any, ctx: Any, observations: Iterable[Observation], *,
            status: str | None = None, service_section: str = "",
            fallback_service_text: str = "", require_patient_id: bool = False) -> HL7Message:
    """MSH, PID, PV1, ORC, OBR and one OBX per observation."""
    status = status or result_status(ds)
    return HL7Message([
        msh(ctx), pid(ds, require_patient_id=require_patient_id), pv1(), orc(ds),
        obr(ds, status, service_section=service_section,
            fallback_service_text=fallback_service_text),
        *obx_segments(observations, status),
    ])

