"""One DICOM audit message (PS3.15 A.5.1): ``AuditMessage`` XML from typed parts.

Every value goes in through xml.etree (attributes and text), never by pasting into a
string, so a peer's AE title or an error text cannot change the document's shape.
Coded values carry csd-code, codeSystemName and originalText (the schema requires
all three; originalText is DICOM's Code Meaning).
"""

from __future__ import annotations

import base64
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = "0", "4", "8", "12"
CREATE, READ, UPDATE, DELETE, EXECUTE = "C", "R", "U", "D", "E"


@dataclass(frozen=True)
class Code:
    code: str
    system: str
    meaning: str


# EventID (CID 400) and EventTypeCode values used (DCM: PS3.16).
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
SECURITY_CONFIGURATION = Code("110129", "DCM", "Security Configuration")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
# RoleIDCode values (CID 402).
APPLICATION = Code("110150", "DCM", "Application")
APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
DESTINATION = Code("110152", "DCM", "Destination Role ID")
SOURCE = Code("110153", "DCM", "Source Role ID")
# ParticipantObjectIDTypeCode values.
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")

# ActiveParticipant NetworkAccessPointTypeCode.
MACHINE_NAME, IP_ADDRESS = "1", "2"
# ParticipantObjectTypeCode and its role.
PERSON, SYSTEM_OBJECT = "1", "2"
ROLE_PATIENT, ROLE_REPORT = "1", "3"
# AuditSourceTypeCode: "Application Server process or thread".
APPLICATION_SERVER = "4"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a process (AE title, process id) or a person."""
    user_id: str
    requestor: bool
    role: Code | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None
    access_point: str | None = None          # host name or address
    access_point_type: str | None = None     # MACHINE_NAME or IP_ADDRESS


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a study (its UID, the SOP classes and
    instances of it concerned) or a patient (an identifier)."""
    object_id: str
    id_type: Code
    type_code: str
    name: str = ""                           # what it is, in routing-safe words
    role: str | None = None
    # SOPClass UID -> instance UIDs (ParticipantObjectDescription).
    sop_classes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # ParticipantObjectDetail type -> value (base64-encoded in the message).
    details: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AuditRecord:
    event_id: Code
    action: str | None
    when: float                               # epoch seconds (the audit row's ts)
    outcome: str
    participants: tuple[Participant, ...]
    source_id: str
    event_types: tuple[Code, ...] = ()
    outcome_description: str | None = None
    site_id: str | None = None
    objects: tuple[ParticipantObject, ...] = field(default=())


def event_datetime(ts: float) -> str:
    """xsd:dateTime in UTC with microseconds: the moment the event was recorded."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                       "originalText": code.meaning})


def _set(element: ET.Element, name: str, value: str | None) -> None:
    if value is not None and value != "":
        element.set(name, value)


def build(record: AuditRecord) -> ET.Element:
    """The AuditMessage element, children in the schema's order."""
    root = ET.Element("AuditMessage")
    event = ET.SubElement(root, "EventIdentification")
    _set(event, "EventActionCode", record.action)
    event.set("EventDateTime", event_datetime(record.when))
    event.set("EventOutcomeIndicator", record.outcome)
    _coded(event, "EventID", record.event_id)
    for code in record.event_types:
        _coded(event, "EventTypeCode", code)
    if record.outcome_description:
        ET.SubElement(event, "EventOutcomeDescription").text = _printable(record.outcome_description)
    for p in record.participants:
        part = ET.SubElement(root, "ActiveParticipant")
        part.set("UserID", _printable(p.user_id) or "unknown")
        _set(part, "AlternativeUserID", p.alternative_user_id)
        _set(part, "UserName", p.user_name)
        part.set("UserIsRequestor", "true" if p.requestor else "false")
        _set(part, "NetworkAccessPointID", p.access_point)
        if p.access_point:
            _set(part, "NetworkAccessPointTypeCode", p.access_point_type)
        if p.role is not None:
            _coded(part, "RoleIDCode", p.role)
    source = ET.SubElement(root, "AuditSourceIdentification")
    _set(source, "AuditEnterpriseSiteID", record.site_id)
    source.set("AuditSourceID", record.source_id)
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": APPLICATION_SERVER})
    for o in record.objects:
        obj = ET.SubElement(root, "ParticipantObjectIdentification")
        obj.set("ParticipantObjectID", o.object_id)
        obj.set("ParticipantObjectTypeCode", o.type_code)
        _set(obj, "ParticipantObjectTypeCodeRole", o.role)
        _coded(obj, "ParticipantObjectIDTypeCode", o.id_type)
        # Name or Query is required (CP-2399); ours is never a person's name.
        ET.SubElement(obj, "ParticipantObjectName").text = o.name
        for kind, value in o.details:
            ET.SubElement(obj, "ParticipantObjectDetail", {
                "type": kind, "value": base64.b64encode(value.encode("utf-8")).decode("ascii")})
        if o.sop_classes:
            desc = ET.SubElement(obj, "ParticipantObjectDescription")
            for uid, instances in o.sop_classes:
                sop = ET.SubElement(desc, "SOPClass", {"NumberOfInstances": str(max(1, len(instances)))})
                _set(sop, "UID", uid)
                for instance in instances:
                    ET.SubElement(sop, "Instance", {"UID": instance})
    return root


def to_xml(record: AuditRecord) -> bytes:
    """The message as UTF-8 bytes (no XML declaration: syslog's BOM says UTF-8)."""
    return ET.tostring(build(record), encoding="utf-8", xml_declaration=False)


def _printable(text: str) -> str:
    """XML 1.0 cannot carry most control characters, even escaped: a peer's odd byte
    becomes U+FFFD instead of making the whole message unreadable."""
    return "".join(c if c in "\t\n\r" or (" " <= c and c not in "\ufffe\uffff") else "\ufffd"
                   for c in text)


def now() -> float:
    return time.time()
