"""Which of mfconsole's audit events become which DICOM audit message (PS3.15 A.5.3).

One audit row in, one AuditRecord out (or None: an event the ARR is not told of, such
as a retry scheduled or a rule's routing plan). The table in docs/operations.md
("Audit export") says the same in words; keep both in step.

Privacy: the audit row holds no patient data (its columns are routing-safe by
contract). A patient participant is added only when the exporter hands a patient
identifier in (``Context.patient``: include_patient_ids, hashed by default). UIDs
(study, SOP class, SOP instance) are sent: they identify objects, not patients, and
PS3.15 names the study of every transfer by its Study Instance UID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mfconsole.auditlog import message as m

# Events exported, by the DICOM audit message they become.
TRANSFERRED = {"stored": m.CREATE, "conflict": m.UPDATE, "duplicate": m.CREATE,
               "delivered": m.READ, "delivered_with_warning": m.READ, "dead_lettered": m.READ}
ACCESSED = {"replayed": m.UPDATE, "discarded": m.DELETE, "phi_revealed": m.READ}
ALERTS = {"association_rejected": m.NODE_AUTHENTICATION,
          "config_edited": m.SOFTWARE_CONFIGURATION, "reloaded": m.SOFTWARE_CONFIGURATION,
          "reload_refused": m.SOFTWARE_CONFIGURATION, "handler_reloaded": m.SOFTWARE_CONFIGURATION,
          "rekeyed": m.SECURITY_CONFIGURATION}
ACTIVITY = {"engine_started": m.APPLICATION_START, "engine_stopped": m.APPLICATION_STOP}
EXPORTED = frozenset({*TRANSFERRED, *ACCESSED, *ALERTS, *ACTIVITY, "refused"})


@dataclass(frozen=True)
class Context:
    """What the rows do not say: who we are, and the peers behind configured names."""
    source_id: str                                   # AuditSourceID (app_name)
    hostname: str                                    # our NetworkAccessPointID
    process_id: str                                  # AlternativeUserID of our process
    site_id: str | None = None
    # listener name -> its AE title; destination name -> (AE title or name, host)
    listener_ae: Callable[[str], str | None] = lambda name: None
    destination_peer: Callable[[str], tuple[str, str] | None] = lambda name: None
    # audit row -> the patient identifier of its object to send (hashed unless configured raw), or
    # None: not included, or no longer readable (purged)
    patient: Callable[[dict[str, Any]], str | None] | None = None
    patient_hashed: bool = True


def record_of(row: dict[str, Any], ctx: Context) -> m.AuditRecord | None:
    """The audit message of one audit row (with the objects columns study_uid and
    sop_class_uid joined), or None when the event is not exported."""
    event = row["event"]
    if event in TRANSFERRED:
        return _transferred(row, ctx, TRANSFERRED[event])
    if event in ACCESSED:
        return _accessed(row, ctx, ACCESSED[event])
    if event in ALERTS or event == "refused":
        return _alert(row, ctx)
    if event in ACTIVITY:
        return _activity(row, ctx)
    return None


def _base(row: dict[str, Any], ctx: Context, event_id: m.Code, action: str, outcome: str,
          participants: list[m.Participant], objects: list[m.ParticipantObject] = (),  # type: ignore[assignment]
          types: tuple[m.Code, ...] = (), description: str | None = None) -> m.AuditRecord:
    return m.AuditRecord(event_id=event_id, action=action, when=float(row["ts"]), outcome=outcome,
                         participants=tuple(participants), source_id=ctx.source_id,
                         event_types=types, outcome_description=description, site_id=ctx.site_id,
                         objects=tuple(objects))


def _us(ctx: Context, *, ae: str | None, requestor: bool, role: m.Code | None) -> m.Participant:
    return m.Participant(user_id=ae or ctx.source_id, requestor=requestor, role=role,
                         alternative_user_id=ctx.process_id, access_point=ctx.hostname,
                         access_point_type=m.MACHINE_NAME)


def _peer_host(peer: str | None) -> str | None:
    """"host:port" (as the listener writes it, an IPv6 address with or without
    brackets) -> host."""
    if not peer:
        return None
    host = peer.rsplit(":", 1)[0] if ":" in peer else peer
    return host.strip("[]") or None


def _address_type(host: str) -> str:
    return m.IP_ADDRESS if host.replace(".", "").isdigit() or ":" in host else m.MACHINE_NAME


def _remote(user_id: str | None, host: str | None, *, requestor: bool, role: m.Code | None
            ) -> m.Participant:
    return m.Participant(user_id=user_id or (host or "unknown"), requestor=requestor, role=role,
                         access_point=host, access_point_type=_address_type(host) if host else None)


def _person(actor: str) -> m.Participant:
    """The operator behind an action: the login name first, the whole description
    (uid, sudo, via which socket) as UserName."""
    return m.Participant(user_id=actor.split(" ", 1)[0], user_name=actor, requestor=True)


def _objects(row: dict[str, Any], ctx: Context) -> list[m.ParticipantObject]:
    out: list[m.ParticipantObject] = []
    if row.get("study_uid"):
        instance = (row["sop_instance_uid"],) if row.get("sop_instance_uid") else ()
        out.append(m.ParticipantObject(
            object_id=row["study_uid"], id_type=m.STUDY_INSTANCE_UID, type_code=m.SYSTEM_OBJECT,
            role=m.ROLE_REPORT, name=f"mfconsole object {row['object_id']}",
            sop_classes=((row.get("sop_class_uid") or "", instance),)))
    if ctx.patient is not None and row.get("object_id") is not None:
        patient = ctx.patient(row)
        if patient:
            out.append(m.ParticipantObject(
                object_id=patient, id_type=m.PATIENT_NUMBER, type_code=m.PERSON, role=m.ROLE_PATIENT,
                name="patient ID, keyed hash (HMAC-SHA256)" if ctx.patient_hashed else "patient ID"))
    return out


def _transferred(row: dict[str, Any], ctx: Context, action: str) -> m.AuditRecord:
    event = row["event"]
    if event in ("stored", "conflict", "duplicate"):
        # A peer sent it to us: the peer is the source, our listener's AE the destination.
        peers = [_remote(row.get("calling_ae"), _peer_host(row.get("peer")), requestor=True, role=m.SOURCE),
                 _us(ctx, ae=ctx.listener_ae(row.get("listener") or ""), requestor=False,
                     role=m.DESTINATION)]
        outcome = m.SUCCESS
        description = "duplicate: already stored" if event == "duplicate" else None
    else:
        user, host = ctx.destination_peer(row.get("destination") or "") or (row.get("destination"), None)
        peers = [_us(ctx, ae=None, requestor=True, role=m.SOURCE),
                 _remote(user, host, requestor=False, role=m.DESTINATION)]
        outcome = {"delivered": m.SUCCESS, "delivered_with_warning": m.MINOR_FAILURE}.get(
            event, m.SERIOUS_FAILURE)
        description = None if event == "delivered" else _said(row)
    return _base(row, ctx, m.INSTANCES_TRANSFERRED, action, outcome, peers, _objects(row, ctx),
                 description=description)


def _accessed(row: dict[str, Any], ctx: Context, action: str) -> m.AuditRecord:
    peers = [_person(row["actor"])] if row.get("actor") else []
    peers.append(_us(ctx, ae=None, requestor=not peers, role=m.APPLICATION))
    return _base(row, ctx, m.INSTANCES_ACCESSED, action, m.SUCCESS, peers, _objects(row, ctx),
                 description=_said(row))


def _alert(row: dict[str, Any], ctx: Context) -> m.AuditRecord:
    event = row["event"]
    if event == "refused":
        # TLS: the peer did not authenticate; anything else (an abort over a limit, an
        # object refused) is a use of the service beyond what it allows.
        kind = m.NODE_AUTHENTICATION if row.get("status") == "TLS" else m.USE_OF_RESTRICTED_FUNCTION
    else:
        kind = ALERTS[event]
    failed = event in ("refused", "association_rejected", "reload_refused") or row.get("status") == "errors"
    peers = [_us(ctx, ae=ctx.listener_ae(row.get("listener") or ""), requestor=not row.get("actor"),
                 role=m.APPLICATION)]
    if row.get("actor"):
        peers.insert(0, _person(row["actor"]))
    if row.get("peer") or row.get("calling_ae"):
        peers.append(_remote(row.get("calling_ae"), _peer_host(row.get("peer")), requestor=False,
                             role=None))
    return _base(row, ctx, m.SECURITY_ALERT, m.EXECUTE, m.MINOR_FAILURE if failed else m.SUCCESS,
                 peers, types=(kind,), description=_said(row))


def _activity(row: dict[str, Any], ctx: Context) -> m.AuditRecord:
    peers = [_us(ctx, ae=None, requestor=False, role=m.APPLICATION)]
    return _base(row, ctx, m.APPLICATION_ACTIVITY, m.EXECUTE, m.SUCCESS, peers,
                 types=(ACTIVITY[row["event"]],), description=row.get("detail") or None)


def _said(row: dict[str, Any]) -> str | None:
    """Status and detail of the row: routing-safe words (audit rows hold no PHI)."""
    words = " ".join(w for w in ((row.get("status") or ""), (row.get("detail") or "")) if w)
    return words or None
