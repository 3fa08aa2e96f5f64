"""A scripted engine client with fixed data, for snapshot tests: every clock, port and
host name is frozen here, so a screen renders the same on every machine. (Pilot tests
run against a real engine; this only pins layouts.)"""

from __future__ import annotations

from typing import Any

from mfconsole.client import Client, ClientError

NOW = 1_790_000_000.0           # the snapshot's clock; the console computes ages from it


def _history(peak: int) -> list[int]:
    return [(i * 7) % (peak + 1) for i in range(60)]


SNAPSHOT: dict[str, Any] = {
    "generated_at": NOW,
    "data_dir": "/srv/mfconsole/var",
    "engine": {"running": True, "pid": 4242, "uptime_s": 3 * 3600 + 25 * 60 + 7,
               "config": "/srv/mfconsole/config.toml", "version": "0.1.0"},
    "objects": 18_234,
    "dead_letters": 315,
    "handlers": ["sr_to_oru"],
    "listeners": [
        {"name": "modalities", "ae_title": "MF_SCP", "host": "0.0.0.0", "port": 11112, "tls": True,
         "calling_aets": ["CT01", "MR02"], "state": "listening",
         "session": {"received": 1204, "duplicates": 3, "refused": 1, "rejected": 2},
         "lifetime": {"received": 18_234, "duplicates": 41, "refused": 9, "rejected": 17},
         "rate": 4.2, "history": _history(9)},
    ],
    "destinations": [
        {"name": "pacs", "kind": "dimse", "target": "PACS@pacs.example.org:104", "state": "up",
         "counts": {"pending": 12, "in_flight": 2, "delivered": 17_900, "dead": 312},
         "failures": 0, "next_attempt_at": None, "last_status": None, "last_error": None,
         "oldest_pending_at": NOW - 4, "session": {"sent": 1180, "filtered": 0, "errored": 12,
                                                    "retries": 3},
         "lifetime": {"sent": 17_900, "filtered": 0, "errored": 312, "retries": 40},
         "health": {"outcomes": 50, "failed_share": 0.86, "failing": True, "status": "0x0122",
                    "last_failure": "attempt 1: permanent/message: 0x0122 peer does not support "
                                    "this SOP class (1.2.840.10008.5.1.4.1.1.2, CT Image Storage)"},
         "rate": 3.9, "history": _history(8)},
        {"name": "archive", "kind": "stow", "target": "https://archive.example.org/dicom-web",
         "state": "down", "counts": {"pending": 1204, "delivered": 16_500, "dead": 3},
         "failures": 7, "next_attempt_at": NOW + 95, "last_status": "transport",
         "last_error": "cannot connect to archive.example.org:443: refused",
         "oldest_pending_at": NOW - 3 * 3600 - 60, "session": {"sent": 0, "filtered": 0,
                                                               "errored": 0, "retries": 7},
         "lifetime": {"sent": 16_500, "filtered": 0, "errored": 3, "retries": 1_950},
         "rate": 0.0, "history": [0] * 60},
        {"name": "ehr", "kind": "mllp", "target": "ehr.example.org:2575", "state": "paused",
         "pause_reason": "by engine: application reject (CR)",
         "counts": {"pending": 40, "delivered": 220, "filtered": 980}, "failures": 0,
         "next_attempt_at": None, "last_status": "CR", "last_error": "by engine: application reject (CR)",
         "oldest_pending_at": NOW - 600, "session": {"sent": 12, "filtered": 40, "errored": 0,
                                                     "retries": 0},
         "lifetime": {"sent": 220, "filtered": 980, "errored": 0, "retries": 4},
         "rate": 0.0, "history": _history(2)},
    ],
    "associations": {
        "live": [{"id": "modalities-118", "listener": "modalities", "peer": "10.1.2.31:50122",
                  "calling_ae": "CT01", "called_ae": "MF_SCP", "started": NOW - 12, "ended": None,
                  "objects": 212, "bytes": 110_000_000, "refused": 0, "status": "active", "reason": ""}],
        "recent": [
            {"id": "modalities-117", "listener": "modalities", "peer": "10.1.2.77:40011",
             "calling_ae": "UNKNOWN", "called_ae": "MF_SCP", "started": NOW - 30, "ended": NOW - 30,
             "objects": 0, "bytes": 0, "refused": 0, "status": "rejected",
             "reason": "calling AE title not recognized"},
            {"id": "modalities-116", "listener": "modalities", "peer": "10.1.2.32:50100",
             "calling_ae": "MR02", "called_ae": "MF_SCP", "started": NOW - 300, "ended": NOW - 240,
             "objects": 180, "bytes": 42_000_000, "refused": 1, "status": "released",
             "reason": "object exceeds store.max_object_mb"},
        ]},
    "recent_errors": [],
}

GROUPS = [
    {"destination": "pacs", "status": "0x0122", "reason": "peer does not support this SOP class",
     "count": 312, "latest": NOW - 60},
    {"destination": "archive", "status": "HTTP 409", "reason": "the archive reports a conflict (HTTP 409)",
     "count": 3, "latest": NOW - 900},
]


def _letter(i: int) -> dict[str, Any]:
    pacs = i > 3
    return {"id": 9000 + i, "destination": "pacs" if pacs else "archive", "attempts": 1,
            "last_status": "0x0122" if pacs else "HTTP 409", "last_class": "permanent",
            "last_reason": GROUPS[0 if pacs else 1]["reason"], "handler": None, "handler_version": None,
            "updated_at": NOW - 60 * i, "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{1000 + i}",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.481.3", "study_uid": "1.2.826.0.1.3680043.8.498.1",
            "calling_ae": "CT01", "listener": "modalities", "size": 5120}


LETTERS = [_letter(i) for i in range(1, 316)][::-1]

LOG = [f"2026-09-21 14:0{i % 10}:{i:02d},000 {level:<7} mfconsole.{name}: {text}" for i, (level, name, text) in
       enumerate([("INFO", "engine", "engine started (data_dir /srv/mfconsole/var, 1 listener(s))"),
                  ("INFO", "listener", "listener modalities: MF_SCP listening on 0.0.0.0:11112"),
                  ("WARNING", "listener", "listener modalities: rejected association from 10.1.2.77:40011 "
                                          "(calling UNKNOWN, called MF_SCP): calling AE title not recognized"),
                  ("WARNING", "delivery", "destination archive: transient for 1.2.3.4 (delivery 77): "
                                          "cannot connect to archive.example.org:443: refused"),
                  ("ERROR", "engine", "reload: sr_to_oru: new version refused (handler sr_to_oru: syntax "
                                      "error at sr_to_oru.py line 12); sr_to_oru 1.0.0 (3fa4c2d1e0b9) stays active"),
                  ("INFO", "engine", "reload: listener modalities: updated (associations in progress kept)")])]

FIELDS = [
    {"key": "egress.allowed_tcp", "section": "egress", "label": "allowed host:port (DIMSE, MLLP)",
     "type": "list", "value": ["pacs.example.org:104", "ehr.example.org:2575"]},
    {"key": "egress.allowed_http", "section": "egress", "label": "allowed URL prefixes (STOW-RS)",
     "type": "list", "value": ["https://archive.example.org/dicom-web"]},
    {"key": "listeners[0].ae_title", "section": "listener modalities", "label": "AE title", "type": "str",
     "value": "MF_SCP"},
    {"key": "listeners[0].calling_aets", "section": "listener modalities", "label": "calling AE allowlist",
     "type": "list", "value": ["CT01", "MR02"]},
    {"key": "destinations[0].host", "section": "destination pacs", "label": "host", "type": "str",
     "value": "pacs.example.org"},
    {"key": "destinations[0].port", "section": "destination pacs", "label": "port", "type": "int", "value": 104},
    {"key": "destinations[0].ae_title", "section": "destination pacs", "label": "called AE title",
     "type": "str", "value": "PACS"},
]

HANDLERS = [
    {"name": "sr_to_oru", "state": "file broken", "version": "1.0.0", "digest": "3fa4c2d1e0b9",
     "file_version": "", "error": "handler sr_to_oru: syntax error at sr_to_oru.py line 12",
     "routes": ["modalities -> ehr"],
     "last_reload": "sr_to_oru: new version refused (handler sr_to_oru: syntax error at sr_to_oru.py "
                    "line 12); sr_to_oru 1.0.0 (3fa4c2d1e0b9) stays active",
     "last_error": "handler sr_to_oru: syntax error at sr_to_oru.py line 12"},
]

DESTINATION = {
    "name": "pacs", "kind": "dimse", "target": "PACS@pacs.example.org:104",
    "counts": {"pending": 12, "in_flight": 2, "delivered": 17_900, "dead": 312},
    "outcomes": [{"ts": NOW - 5 * i, "event": "delivered", "status": "0x0000",
                  "detail": "attempt 1: delivered: success", "delivery_id": 20_000 - i} for i in range(6)],
    "max_associations": 2, "retry_initial_s": 5.0, "retry_max_s": 600.0, "down_after": 5,
    "state": "up", "failures": 0, "next_attempt_at": None, "last_status": None, "last_error": None,
    "oldest_pending_at": None, "pause_reason": None,
}


def _sample(i: int, ae: str) -> dict[str, Any]:
    return {"id": 18_200 + i, "received_at": NOW - 600 * i, "listener": "modalities", "calling_ae": ae,
            "modality": "CT", "sop_class": "CT Image Storage",
            "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{4000 + i}"}


def _plan() -> dict[str, Any]:
    """A routing plan as the engine makes it (engine/plan.py), with its lines."""
    from mfconsole.engine.plan import changed, render

    def dest(name: str, before: int, after: int, added: int, removed: int, **more: Any) -> dict[str, Any]:
        row = {"name": name, "before": before, "after": after, "added": added, "removed": removed,
               "unchanged": before - removed, "handler_changed": 0, "handler_changes": {},
               "coercion_changed": 0, "handler_runs": 0, "handler_not_run": 0, "filtered": 0,
               "errors": 0, "outcome_changed": 0, "error_reasons": [], "removed_from_config": False,
               "samples": {"added": [_sample(1, "MR02")]} if added else {}}
        row.update(more)
        return row
    plan: dict[str, Any] = {
        "config": "/srv/mfconsole/config.toml", "baseline": "the running configuration", "hours": 24.0,
        "since": NOW - 86_400, "until": NOW, "error": None, "objects": 1000, "total": 1000,
        "capped": False, "cap": 100_000, "handler_cap": 1000, "changed_objects": 352,
        "unreadable": 0, "unreadable_samples": [],
        "destinations": [dest("pacs", 600, 872, 312, 40),
                         dest("ris", 120, 120, 0, 0, handler_runs=120, filtered=7)],
        "rules": [{"name": "qa-phantoms", "before": 0, "after": 40, "new": True, "gone": False},
                  {"name": "ct", "before": 600, "after": 560, "new": False, "gone": False},
                  {"name": "mr", "before": 0, "after": 312, "new": True, "gone": False},
                  {"name": "(fallback)", "before": 400, "after": 88, "new": False, "gone": False}],
        "discarded": {"before": 0, "after": 40, "added": 40, "removed": 0,
                      "samples": {"added": [_sample(2, "CT01")]}},
        "unrouted": {"before": 0, "after": 0, "added": 0, "removed": 0, "samples": {}},
        "handlers": [{"name": "sr_to_oru", "running": "sr_to_oru 1.4.0 (3f2a9c1d0b7e)",
                      "on_disk": "sr_to_oru 1.4.0 (3f2a9c1d0b7e)", "error": "", "changed": False}]}
    plan["changed"] = changed(plan)
    plan["lines"] = render(plan)
    return plan


class FakeClient(Client):
    """Answers from the tables above; records what the console asked."""

    def __init__(self, *, hosts_engine: bool = True, read_only: bool = False):
        self.hosts_engine = hosts_engine
        self.read_only = read_only
        self.description = "in-process engine" if hosts_engine else "attached to pid 4242"
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, op: str, **args: Any) -> Any:
        self.calls.append((op, args))
        if op == "snapshot":
            return SNAPSHOT
        if op == "dead_letter_groups":
            return GROUPS
        if op == "dead_letters":
            rows = LETTERS
            if args.get("before_id") is not None:
                rows = [r for r in rows if r["id"] < args["before_id"]]
            return rows[:args.get("limit") or 200]
        if op == "dead_letter_count":
            return len(LETTERS)
        if op == "dead_letter":
            row = next(r for r in LETTERS if r["id"] == args["id"])
            return {**row, "transfer_syntax": "1.2.840.10008.1.2.1",
                    "history": [{"ts": NOW - 120, "event": "dead_lettered", "status": row["last_status"],
                                 "detail": f"attempt 1: permanent: {row['last_reason']}"}]}
        if op == "destination":
            return {**DESTINATION, "name": args["name"]}
        if op == "log_tail":
            return {"lines": [] if args.get("cursor") else LOG, "cursor": {"ino": 1, "pos": 1}}
        if op == "config_fields":
            return FIELDS
        if op == "handlers":
            return HANDLERS
        if op == "plan":
            return _plan()
        if op == "echo":
            return {"ok": True, "rtt_ms": 3.0, "detail": ""}
        if op in BROWSER:                  # the Objects and Audit screens (below)
            return BROWSER[op](args)
        raise ClientError(f"{op} is not scripted in the fake client")


# -- the Objects and Audit screens ---------------------------------------------------------

_MODS = [("CT", "1.2.840.10008.5.1.4.1.1.2", "CT01"), ("MR", "1.2.840.10008.5.1.4.1.1.4", "MR02"),
         ("SR", "1.2.840.10008.5.1.4.1.1.88.11", "CT01")]
_STATES = ["pacs=delivered archive=delivered", "pacs=delivered archive=dead",
           "pacs=pending archive=in_flight", "pacs=dead archive=delivered", None]


def _object(i: int) -> dict[str, Any]:
    mod, sop_class, ae = _MODS[i % 3]
    return {"id": 18_234 - i, "received_at": NOW - 37 * i, "listener": "modalities", "calling_ae": ae,
            "peer": "10.1.2.31:50122", "association": f"modalities-{118 - i // 10}", "modality": mod,
            "sop_class_uid": sop_class,
            "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.12345678901234567890.{2000 + i}",
            "study_uid": f"1.2.826.0.1.3680043.8.498.98765432109876543210.{300 + i // 4}",
            "series_uid": f"1.2.826.0.1.3680043.8.498.55555555555555555555.{40 + i // 2}",
            "transfer_syntax": "1.2.840.10008.1.2.1", "size": 524_288 + 4096 * i, "version": 1,
            "superseded": 0, "purged_at": None, "deliveries": _STATES[i % len(_STATES)]}


OBJECTS = [_object(i) for i in range(60)]


def _objects(args: dict[str, Any]) -> dict[str, Any]:
    rows = OBJECTS
    for key, value in (args.get("filters") or {}).items():
        if key == "state":
            rows = [r for r in rows if f"={value}" in (r["deliveries"] or "")]
        elif key == "destination":
            rows = [r for r in rows if f"{value}=" in (r["deliveries"] or "")]
        elif key in ("calling_ae", "modality", "listener", "study_uid", "sop_instance_uid"):
            rows = [r for r in rows if r[key] == value]
    rows = sorted(rows, key=lambda r: (r[args.get("sort") or "id"], r["id"]),
                  reverse=args.get("descending", True))
    offset, limit = args.get("offset") or 0, args.get("limit") or 200
    return {"rows": rows[offset:offset + limit], "total": len(rows)}


def _object_timeline(args: dict[str, Any]) -> dict[str, Any]:
    row = next(r for r in OBJECTS if r["id"] == args["id"])
    base = row["received_at"]
    deliveries = [
        {"id": 40_001, "destination": "pacs", "handler": None, "state": "delivered", "attempts": 1,
         "last_status": "0x0000", "last_class": "success", "last_reason": "delivered",
         "handler_version": None, "created_at": base, "updated_at": base + 2},
        {"id": 40_002, "destination": "archive", "handler": None, "state": "dead", "attempts": 3,
         "last_status": "HTTP 409", "last_class": "permanent",
         "last_reason": "the archive reports a conflict (HTTP 409)", "handler_version": None,
         "created_at": base, "updated_at": base + 95}]
    events = [
        {"id": 1, "ts": base, "event": "stored", "listener": "modalities", "destination": None,
         "delivery_id": None, "calling_ae": row["calling_ae"], "peer": row["peer"], "status": None,
         "detail": "version=1 size=524288 routes=2", "actor": None},
        {"id": 2, "ts": base + 2, "event": "delivered", "listener": None, "destination": "pacs",
         "delivery_id": 40_001, "calling_ae": None, "peer": None, "status": "0x0000",
         "detail": "attempt 1: delivered: success", "actor": None},
        {"id": 3, "ts": base + 95, "event": "dead_lettered", "listener": None, "destination": "archive",
         "delivery_id": 40_002, "calling_ae": None, "peer": None, "status": "HTTP 409",
         "detail": "attempt 3: permanent: the archive reports a conflict (HTTP 409)", "actor": None}]
    return {"object": row, "deliveries": deliveries, "events": events}


_AUDIT_KINDS = [
    ("stored", None, "modalities", None, "version=1 size=524288 routes=2", None),
    ("delivered", "pacs", None, "0x0000", "attempt 1: delivered: success", None),
    ("dead_lettered", "archive", None, "HTTP 409",
     "attempt 3: permanent: the archive reports a conflict (HTTP 409)", None),
    ("replayed", "archive", None, None, "by alice (uid 1000) via control socket: queued again",
     "alice (uid 1000) via control socket"),
    ("identifier_search", None, None, None,
     "by alice (uid 1000) via control socket: objects searched by accession number: 3 found",
     "alice (uid 1000) via control socket"),
]


def _audit_row(i: int) -> dict[str, Any]:
    event, dest, listener, status, detail, actor = _AUDIT_KINDS[i % len(_AUDIT_KINDS)]
    return {"id": 90_000 - i, "ts": NOW - 11 * i, "event": event, "listener": listener, "destination": dest,
            "object_id": 18_234 - i // 3, "delivery_id": 40_000 + i if dest else None,
            "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.12345678901234567890.{2000 + i // 3}",
            "calling_ae": "CT01" if event == "stored" else None,
            "peer": "10.1.2.31:50122" if event == "stored" else None, "status": status, "detail": detail,
            "actor": actor}


AUDIT = [_audit_row(i) for i in range(80)]


def _audit(args: dict[str, Any]) -> list[dict[str, Any]]:
    rows = AUDIT
    for key, value in (args.get("filters") or {}).items():
        if key in ("event", "destination", "listener"):
            rows = [r for r in rows if r[key] == value]
    if args.get("before_id") is not None:
        rows = [r for r in rows if r["id"] < args["before_id"]]
    return rows[:args.get("limit") or 200]


BROWSER = {"objects": _objects, "object": _object_timeline, "audit": _audit,
           "audit_events": lambda args: sorted({r["event"] for r in AUDIT})}
