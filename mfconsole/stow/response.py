"""Reading a STOW-RS answer (PS3.18 10.5.3): the status line says little, the body
says what happened to each instance.

FailedSOPSequence (0008,1198) names the instances that were not stored, each with a
FailureReason (0008,1197); ReferencedSOPSequence (0008,1199) names the stored ones,
with a WarningReason (0008,1196) when the archive changed something. An absent
FailedSOPSequence means nothing failed. Bodies come as DICOM JSON
(application/dicom+json) or the Native DICOM Model XML (application/dicom+xml).

Only UIDs and reason codes are taken from the body; nothing else in it (it may echo
patient data) is kept, logged or put in a reason.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from mfconsole.contract import Outcome
from mfconsole.stow.status import stow_http, stow_instance

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

# A peer controls it: bound it.
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class Answer:
    """What the body says per SOP Instance UID."""
    failed: dict[str, int | None] = field(default_factory=dict)   # FailureReason
    stored: dict[str, int | None] = field(default_factory=dict)   # WarningReason or None

    def names(self, uid: str) -> bool:
        return uid in self.failed or uid in self.stored


def parse(content_type: str, body: bytes) -> Answer | None:
    """The per-instance results in ``body``; None when it holds none we can read (no
    body, HTML from a proxy, malformed)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    head = body.lstrip()[:1]
    try:
        if kind.endswith("json") or (head == b"{" and not kind.endswith("xml")):
            return _from_json(json.loads(body))
        if kind.endswith("xml") or head == b"<":
            return _from_xml(body)
    except (ValueError, TypeError, AttributeError, ET.ParseError):
        return None
    return None


def _code(value: Any) -> int | None:
    """A reason code: US in DICOM JSON is a number, but archives also send strings.
    Four characters are read as hex, the way status codes are written ("A700",
    "0110"); no meaningful status is a four-digit decimal number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= 0xFFFF else None
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.lower().startswith("0x"):
                code = int(text, 16)
            elif len(text) == 4:
                code = int(text, 16)
            else:
                code = int(text, 10)
        except ValueError:
            return None
        return code if 0 <= code <= 0xFFFF else None
    return None


# -- DICOM JSON (PS3.18 F.2) ---------------------------------------------------------

def _json_values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def _from_json(doc: Any) -> Answer | None:
    if not isinstance(doc, dict) or not (FAILED_SOP_SEQUENCE in doc or REFERENCED_SOP_SEQUENCE in doc):
        return None
    answer = Answer()
    for item in _json_values(doc, FAILED_SOP_SEQUENCE):
        uid = _first_uid(_json_values(item, REFERENCED_SOP_INSTANCE_UID)) if isinstance(item, dict) else None
        if uid:
            reasons = _json_values(item, FAILURE_REASON)
            answer.failed[uid] = _code(reasons[0]) if reasons else None
    for item in _json_values(doc, REFERENCED_SOP_SEQUENCE):
        uid = _first_uid(_json_values(item, REFERENCED_SOP_INSTANCE_UID)) if isinstance(item, dict) else None
        if uid:
            reasons = _json_values(item, WARNING_REASON)
            answer.stored[uid] = _code(reasons[0]) if reasons else None
    return answer


def _first_uid(values: list[Any]) -> str | None:
    return values[0].strip("\0 ") if values and isinstance(values[0], str) else None


# -- Native DICOM Model XML (PS3.19 A.1) ------------------------------------------------

def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attribute(parent: ET.Element, tag: str) -> ET.Element | None:
    for child in parent:
        if _local(child.tag) == "DicomAttribute" and child.get("tag", "").upper() == tag.upper():
            return child
    return None


def _xml_value(parent: ET.Element, tag: str) -> str | None:
    attr = _attribute(parent, tag)
    if attr is None:
        return None
    for child in attr:
        if _local(child.tag) == "Value" and child.text:
            return child.text.strip()
    return None


def _from_xml(body: bytes) -> Answer | None:
    # Entity declarations are how an XML body expands into gigabytes; a STOW
    # response never needs one.
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        return None
    root = ET.fromstring(body)
    if _local(root.tag) != "NativeDicomModel":
        return None
    failed, stored = _attribute(root, FAILED_SOP_SEQUENCE), _attribute(root, REFERENCED_SOP_SEQUENCE)
    if failed is None and stored is None:
        return None
    answer = Answer()
    for seq, into, reason_tag in ((failed, answer.failed, FAILURE_REASON),
                                  (stored, answer.stored, WARNING_REASON)):
        for item in (seq if seq is not None else []):
            if _local(item.tag) != "Item":
                continue
            uid = _xml_value(item, REFERENCED_SOP_INSTANCE_UID)
            if uid:
                reason = _xml_value(item, reason_tag)
                into[uid] = _code(reason) if reason is not None else None
    return answer


# -- classification --------------------------------------------------------------------

def per_instance(http_status: int, answer: Answer | None, uids: list[str],
                 retry_after_s: float | None = None) -> list[Outcome]:
    """One Outcome per instance: what the body says about it, else what the status
    line says about the whole request (for a 2xx: stored, since an instance absent
    from FailedSOPSequence did not fail)."""
    whole = stow_http(http_status, retry_after_s)
    out: list[Outcome] = []
    for uid in uids:
        if answer is not None and uid in answer.failed:
            out.append(stow_instance(answer.failed[uid], http_status, stored=False))
        elif answer is not None and uid in answer.stored:
            out.append(stow_instance(answer.stored[uid], http_status, stored=True))
        else:
            out.append(whole)
    return out


def explains(answer: Answer | None, uids: list[str]) -> bool:
    """Whether the body says anything about any of these instances."""
    return answer is not None and any(answer.names(uid) for uid in uids)
