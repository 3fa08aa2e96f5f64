"""Any DICOM Structured Report → HL7 v2.5.1 ORU^R01. Other objects are filtered (None).

Basic Text, Enhanced, Comprehensive (3D), Key Object Selection, X-Ray Radiation Dose
and every other SR class: the mapping walks the content tree, whatever the template.

Message: MSH PID PV1 ORC OBR (mfconsole.hl7.header: the same for every handler), then
  * two RAD-28 identification OBXs: ``HD ^SR Instance UID`` and ``HD ^Study Instance UID``
    (IHE RAD TF-2 "Structured Report Export"), which link the result to the document
    and the study;
  * one OBX per content item, in document order. OBX-3 is the item's concept name
    (code^meaning^scheme), or a fixed text when the item has none (below); OBX-4 is the
    item's position in the tree, "1" for the root, "1.2.3" for the third child of the
    second child — the same numbers DICOM by-reference relationships use; OBX-11 is
    the report status (F final, P preliminary), or X for an item whose value is missing.

| SR value type | OBX-2 | OBX-5 (OBX-6) |
|---|---|---|
| CONTAINER | TX | its heading (concept meaning): the section titles read in order |
| TEXT | TX | the text, one repetition per line (``LINE_BREAKS``) |
| NUM | NM | the number; OBX-6 its unit (UCUM code^meaning^UCUM). No value: CWE with the qualifier (e.g. "Value unknown"), else empty NM with OBX-11 X |
| CODE | CWE | code^meaning^scheme (^^^^version) |
| DATE / TIME | DT / TM | as written (fraction cut to 4 digits) |
| DATETIME | TS | DTM as written, UTC offset kept (TS rather than DTM: DTM is not a 2.5.1 value type) |
| PNAME | XPN | family^given^middle^suffix^prefix |
| UIDREF | ST | the UID |
| IMAGE / COMPOSITE / WAVEFORM | RP | SOP Instance UID^^IM (image) or AP (other)^DICOM |
| SCOORD / SCOORD3D / TCOORD | ST | graphic type and coordinates as text |
| by-reference | ST | the target's position (= that item's OBX-4) |

Left out on purpose: relationship types (the nesting in OBX-4 carries the structure),
referenced frames and presentation states, the SOP Class UID of references.

To adapt: copy this file under a new name, change ``observation`` or the settings
below, bump ``VERSION`` (it travels in MSH-21), and run
``mfconsole handlers run NAME FILE.dcm`` to see what it produces.
"""

from __future__ import annotations

from mfconsole.handlers.sr import BY_REFERENCE
from mfconsole.hl7 import datatypes as hl7
from mfconsole.hl7.header import Observation, linkage, oru_r01
from mfconsole.hl7.message import is_empty

VERSION = "1.0.0"

# OBR-24 diagnostic service section (HL7 Table 0074).
SERVICE_SECTION = "RAD"
# "repeat": line breaks of TEXT as TX repetitions (the HL7 standard); "br": as \.br\.
LINE_BREAKS = "repeat"
# True: an SR without Patient ID dead-letters instead of going out with PID-3 "".
REQUIRE_PATIENT_ID = False

# OBX-3 text for items without a concept name (RAD-28 calls report text "SR Text").
UNNAMED = {"TEXT": "SR Text", "CONTAINER": "Section", "IMAGE": "Image Reference",
           "COMPOSITE": "Composite Reference", "WAVEFORM": "Waveform Reference",
           BY_REFERENCE: "Referenced Content Item"}


def handle(obj, ctx):
    doc = obj.sr
    if doc is None:
        return None
    observations = linkage(obj.dataset, is_sr=True)
    observations += [observation(item) for item in doc.walk()]
    return oru_r01(obj.dataset, ctx, observations, service_section=SERVICE_SECTION,
                   fallback_service_text=doc.title.meaning if doc.title else "",
                   require_patient_id=REQUIRE_PATIENT_ID)


def observation(item):
    """The OBX of one content item."""
    value_type, value, units = convert(item)
    missing = is_empty(value) and item.value_type != "CONTAINER"
    return Observation(
        value_type,
        hl7.ce(item.concept, UNNAMED.get(item.value_type, item.value_type.title())),
        value,
        sub_id=item.position,
        units=units,
        status="X" if missing else None,
        observed_at=hl7.dtm(item.observed_at),
    )


def convert(item):
    """(OBX-2, OBX-5, OBX-6) of one content item."""
    v = item.value
    match item.value_type:
        case "CONTAINER":
            return "TX", item.name, None
        case "TEXT":
            return "TX", hl7.tx(v, LINE_BREAKS), None
        case "NUM":
            if v.value is None and v.qualifier is not None:
                return "CWE", hl7.cwe(v.qualifier), None
            return "NM", hl7.nm(v.value) if v.value is not None else "", \
                hl7.ce(v.unit) if v.unit else None
        case "CODE":
            return "CWE", hl7.cwe(v), None
        case "DATE":
            return "DT", hl7.dt(item.text), None
        case "TIME":
            return "TM", hl7.tm(item.text), None
        case "DATETIME":
            return "TS", hl7.dtm(item.text), None
        case "PNAME":
            return "XPN", hl7.xpn(v), None
        case "IMAGE" | "COMPOSITE" | "WAVEFORM":
            kind = "IM" if item.value_type == "IMAGE" else "AP"
            return "RP", (v.sop_instance_uid, "", kind, "DICOM") if v and v.sop_instance_uid else "", None
        case "SCOORD" | "SCOORD3D":
            return "ST", " ".join([v.graphic_type, *(f"{n:g}" for n in v.data)]), None
        case "TCOORD":
            numbers = [*map(str, v.sample_positions), *(f"{n:g}" for n in v.time_offsets), *v.datetimes]
            return "ST", " ".join([v.range_type, *numbers]), None
        case _:     # UIDREF, by-reference (the target's position), unknown value types
            return "ST", item.text if item.value_type != BY_REFERENCE else v, None
