"""DICOM audit messages (mfconsole/auditlog): every exported event makes a message the
DICOM audit message schema (PS3.15 A.5.1, tests/golden/dicom-audit-message.rng)
accepts, with the event codes docs/operations.md lists; values are values, never
markup; no patient data unless asked for; RFC 5424/5425 framing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from harness import CANARY_ID, CANARY_NAME
from mfconsole.auditlog import events, message, syslog

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
SCHEMA = etree.RelaxNG(etree.parse(str(GOLDEN / "dicom-audit-message.rng")))

STUDY, SOP_CLASS, SOP = "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5.6"


def row(event: str, **extra: Any) -> dict[str, Any]:
    base = {"id": 7, "ts": 1_760_000_000.25, "event": event, "listener": "modalities",
            "destination": None, "object_id": None, "delivery_id": None, "sop_instance_uid": None,
            "calling_ae": None, "peer": None, "status": None, "detail": None, "actor": None,
            "study_uid": None, "sop_class_uid": None, "transfer_syntax": None}
    base.update(extra)
    return base


OBJECT = dict(object_id=42, sop_instance_uid=SOP, study_uid=STUDY, sop_class_uid=SOP_CLASS)
ACTOR = "alice (uid 1000, via sudo from bob) via control socket"
CTX = events.Context(source_id="mfconsole", hostname="router1", process_id="4242",
                     site_id="General Hospital", listener_ae={"modalities": "MF_SCP"}.get,
                     destination_peer={"pacs": ("PACS", "10.1.2.3")}.get)

# event row -> (EventID, action, outcome, EventTypeCode or None)
CASES = {
    "stored": (row("stored", calling_ae="CT1", peer="127.0.0.1:5555", **OBJECT),
               ("110104", "C", "0", None)),
    "duplicate": (row("duplicate", calling_ae="CT1", peer="[::1]:5555", **OBJECT),
                  ("110104", "C", "0", None)),
    "conflict": (row("conflict", calling_ae="CT1", peer="127.0.0.1:5555", **OBJECT),
                 ("110104", "U", "0", None)),
    "delivered": (row("delivered", destination="pacs", delivery_id=3, status="0x0000", **OBJECT),
                  ("110104", "R", "0", None)),
    "delivered_with_warning": (row("delivered_with_warning", destination="pacs", status="0xB000",
                                   **OBJECT), ("110104", "R", "4", None)),
    "dead_lettered": (row("dead_lettered", destination="pacs", status="0xA700",
                          detail="out of resources", **OBJECT), ("110104", "R", "8", None)),
    "replayed": (row("replayed", destination="pacs", actor=ACTOR, detail="from dead letter", **OBJECT),
                 ("110103", "U", "0", None)),
    "discarded": (row("discarded", destination="pacs", actor=ACTOR,
                      detail="by alice: dead letter discarded", **OBJECT), ("110103", "D", "0", None)),
    "phi_revealed": (row("phi_revealed", destination="pacs", actor=ACTOR,
                         detail="patient fields shown to alice", **OBJECT), ("110103", "R", "0", None)),
    "association_rejected": (row("association_rejected", calling_ae="EVIL", peer="10.9.9.9:4000",
                                 detail="calling AE title not allowed (called AE MF_SCP)"),
                             ("110113", "E", "4", "110126")),
    "refused_tls": (row("refused", peer="10.9.9.9:4000", status="TLS",
                        detail="TLS handshake failed: certificate verify failed"),
                    ("110113", "E", "4", "110126")),
    "refused_abort": (row("refused", peer="10.9.9.9:4000", status="abort",
                          detail="object exceeds store.max_object_mb"), ("110113", "E", "4", "110132")),
    "config_edited": (row("config_edited", listener=None, status="ok", actor=ACTOR,
                          detail="by alice: destinations[0].port"), ("110113", "E", "0", "110131")),
    "reload_refused": (row("reload_refused", listener=None, status="errors", detail="refused: …"),
                       ("110113", "E", "4", "110131")),
    "engine_started": (row("engine_started", listener=None, detail="version=1 pid=4242"),
                       ("110100", "E", "0", "110120")),
    "engine_stopped": (row("engine_stopped", listener=None), ("110100", "E", "0", "110121")),
}


def xml_of(r: dict[str, Any], ctx: events.Context = CTX) -> etree._Element:
    record = events.record_of(r, ctx)
    assert record is not None
    return etree.fromstring(message.to_xml(record))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_exported_event_is_a_valid_dicom_audit_message(case):
    r, (event_id, action, outcome, type_code) = CASES[case]
    doc = xml_of(r)
    assert SCHEMA.validate(doc), SCHEMA.error_log
    ident = doc.find("EventIdentification")
    assert ident.find("EventID").get("csd-code") == event_id
    assert ident.find("EventID").get("codeSystemName") == "DCM"
    assert ident.get("EventActionCode") == action
    assert ident.get("EventOutcomeIndicator") == outcome
    assert ident.get("EventDateTime") == "2025-10-09T08:53:20.250000Z"
    types = [e.get("csd-code") for e in ident.findall("EventTypeCode")]
    assert types == ([type_code] if type_code else [])
    source = doc.find("AuditSourceIdentification")
    assert source.get("AuditSourceID") == "mfconsole"
    assert source.get("AuditEnterpriseSiteID") == "General Hospital"


def test_a_transfer_names_the_peers_and_the_study():
    doc = xml_of(CASES["stored"][0])
    parts = {p.find("RoleIDCode").get("csd-code"): p for p in doc.findall("ActiveParticipant")}
    assert parts["110153"].get("UserID") == "CT1"                       # source: the modality
    assert parts["110153"].get("NetworkAccessPointID") == "127.0.0.1"
    assert parts["110153"].get("NetworkAccessPointTypeCode") == "2"
    assert parts["110152"].get("UserID") == "MF_SCP"                    # destination: us
    assert parts["110152"].get("AlternativeUserID") == "4242"
    (study,) = doc.findall("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == STUDY
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    sop = study.find("ParticipantObjectDescription/SOPClass")
    assert (sop.get("UID"), sop.get("NumberOfInstances"), sop.find("Instance").get("UID")) == (SOP_CLASS, "1", SOP)
    sent = xml_of(CASES["delivered"][0])
    parts = {p.find("RoleIDCode").get("csd-code"): p for p in sent.findall("ActiveParticipant")}
    assert parts["110152"].get("UserID") == "PACS" and parts["110152"].get("NetworkAccessPointID") == "10.1.2.3"
    assert parts["110153"].get("UserIsRequestor") == "true"


def test_an_operator_action_names_the_operator_as_requestor():
    doc = xml_of(CASES["phi_revealed"][0])
    person = doc.findall("ActiveParticipant")[0]
    assert person.get("UserID") == "alice" and person.get("UserName") == ACTOR
    assert person.get("UserIsRequestor") == "true"


def test_values_are_values_never_markup():
    hostile = 'CT"/><Injected x="1'
    r = row("association_rejected", calling_ae=hostile, peer="10.0.0.1:1",
            detail="a\x00b\x1bc </EventOutcomeDescription><x/> & more")
    doc = xml_of(r)
    assert SCHEMA.validate(doc), SCHEMA.error_log
    assert doc.find(".//Injected") is None and doc.find(".//x") is None
    assert [p.get("UserID") for p in doc.findall("ActiveParticipant")][-1] == hostile
    assert doc.find("EventIdentification/EventOutcomeDescription").text == (
        "a\ufffdb\ufffdc </EventOutcomeDescription><x/> & more")


def test_no_patient_participant_unless_asked_and_then_only_what_is_handed_in():
    r = CASES["delivered"][0]
    assert not [o for o in xml_of(r).findall("ParticipantObjectIdentification")
                if o.get("ParticipantObjectTypeCode") == "1"]
    hashed = events.Context(**{**CTX.__dict__, "patient": lambda row: "ab" * 32})
    doc = xml_of(r, hashed)
    assert SCHEMA.validate(doc), SCHEMA.error_log
    (patient,) = [o for o in doc.findall("ParticipantObjectIdentification")
                  if o.get("ParticipantObjectTypeCode") == "1"]
    assert patient.get("ParticipantObjectID") == "ab" * 32
    assert patient.get("ParticipantObjectTypeCodeRole") == "1"
    assert patient.find("ParticipantObjectIDTypeCode").get("csd-code") == "2"
    assert "hash" in patient.find("ParticipantObjectName").text


def test_canary_phi_never_in_a_message_built_from_audit_rows():
    """Audit rows hold no PHI; nothing the exporter adds brings any unless configured."""
    for r, _ in CASES.values():
        text = message.to_xml(events.record_of(r, CTX)).decode()
        assert CANARY_ID not in text and CANARY_NAME.split("^")[0] not in text


@pytest.mark.parametrize("event", ["retry_scheduled", "filtered", "routing_plan", "requeued",
                                   "destination_paused", "association_accepted"])
def test_events_not_exported(event):
    assert events.record_of(row(event), CTX) is None
    assert event not in events.EXPORTED


def test_syslog_message_and_octet_counting_frame():
    body = message.to_xml(events.record_of(CASES["stored"][0], CTX))
    msg = syslog.format_message(body, ts=1_760_000_000.25, hostname="router 1", app_name="mfconsole",
                                procid="4242")
    header, rest = msg.split(b" - ", 1)
    assert re.fullmatch(rb"<85>1 2025-10-09T08:53:20\.250000Z router1 mfconsole 4242 IHE\+RFC-3881",
                        header)
    assert rest.startswith(syslog.BOM) and rest[len(syslog.BOM):] == body
    framed = syslog.frame(msg)
    length, _, payload = framed.partition(b" ")
    assert int(length) == len(payload) == len(msg)
    warn = syslog.format_message(b"<x/>", ts=0, hostname="h", app_name="a", procid="1",
                                 severity=syslog.WARNING)
    assert warn.startswith(b"<84>1 1970-01-01T00:00:00.000000Z h a 1 IHE+RFC-3881 - \xef\xbb\xbf")


def test_the_schema_is_the_strict_one():
    """The golden schema rejects what PS3.15 forbids (so passing it means something)."""
    doc = xml_of(CASES["stored"][0])
    doc.find("ParticipantObjectIdentification").remove(
        doc.find("ParticipantObjectIdentification/ParticipantObjectName"))
    assert not SCHEMA.validate(doc)
    doc = xml_of(CASES["stored"][0])
    doc.find("EventIdentification").set("EventOutcomeIndicator", "1")
    assert not SCHEMA.validate(doc)
    doc = xml_of(CASES["stored"][0])
    del doc.find("EventIdentification/EventID").attrib["originalText"]
    assert not SCHEMA.validate(doc)
