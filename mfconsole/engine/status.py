"""Routing-safe status: what `mfconsole status` prints and the console shows.

Reads the database read-only, so it works whether or not an engine is running; when
called with a live engine it adds listener and association state.
"""

from __future__ import annotations

import time
from typing import Any

from mfconsole.config import Config
from mfconsole.engine.engine_lock import holder_pid
from mfconsole.repository import db_path, reading
from mfconsole.repository.commitments import counts as commitment_counts
from mfconsole.windows import describe

RECENT_ERRORS = 10


def collect(config: Config, engine: Any = None) -> dict[str, Any]:
    data_dir = config.engine.data_dir
    pid = holder_pid(data_dir)
    out: dict[str, Any] = {
        "generated_at": time.time(),
        "data_dir": str(data_dir),
        "engine": {"running": pid is not None, "pid": pid if pid and pid > 0 else None},
        "listeners": [],
        "destinations": [],
        "dead_letters": 0,
        "objects": 0,
        "recent_errors": [],
    }
    live = {item.cfg.name: item for item in engine.listeners} if engine is not None else {}
    for lc in config.listeners:
        entry: dict[str, Any] = {"name": lc.name, "ae_title": lc.ae_title, "host": lc.host,
                                 "port": lc.port, "tls": lc.tls is not None,
                                 # client certificates required (and verified)
                                 "mtls": lc.tls is not None and lc.tls.require_client_cert,
                                 "calling_aets": list(lc.calling_aets)}
        if lc.name in live:
            entry["state"] = "listening"
            entry["port"] = live[lc.name].address[1]
        else:
            entry["state"] = "listening" if pid else "stopped"
        out["listeners"].append(entry)
    counts: dict[str, dict[str, int]] = {d.name: {} for d in config.destinations}
    states: dict[str, dict[str, Any]] = {}
    path = db_path(data_dir)
    if path.exists():
        with reading(path) as reads:
            for name, by_state in reads.delivery_counts().items():
                counts.setdefault(name, {}).update(by_state)
            # Storage Commitment: delivered, custody not yet confirmed (part of "delivered").
            for name, waiting in commitment_counts(reads).items():
                counts.setdefault(name, {}).update(waiting)
            for d in config.destinations:
                states[d.name] = destination_state(reads.destination_state(d.name),
                                                   pacing(d, reads, out["generated_at"]))
                states[d.name]["oldest_pending_at"] = reads.oldest_pending_at(d.name)
                states[d.name].update(held(d, reads, out["generated_at"]))
            out["dead_letters"] = reads.dead_letter_count()
            out["objects"] = reads.object_count()
            out["recent_errors"] = reads.recent_errors(RECENT_ERRORS)
    for d in config.destinations:
        entry = {"name": d.name, "kind": d.kind, "target": target(d), "counts": counts.get(d.name, {})}
        entry.update(states.get(d.name) or destination_state(None, pacing(d, None, out["generated_at"])))
        out["destinations"].append(entry)
    out["routing"] = routing(config, engine.rule_counts.view() if engine is not None else None)
    if engine is not None:
        out["associations"] = engine.board.snapshot()
        out["engine"]["uptime_s"] = time.time() - (engine.started_at or time.time())
    return out


def routing(config: Config, counts: dict[str, Any] | None) -> dict[str, Any]:
    """The rules, in order, and [routing]; with ``counts`` (RuleCounts.view of the
    running engine: since it started) how many objects each rule sent and discarded,
    and how many the fallback took or went nowhere."""
    out: dict[str, Any] = {"match": config.routing.match,
                           # None: each listener's [[routes]]
                           "fallback": (list(config.routing.fallback)
                                        if config.routing.fallback is not None else None),
                           "rules": []}
    for rule in config.rules:
        entry = {"name": rule.name, "from": list(rule.listeners),
                 "when": [c.key for c in rule.when],
                 "action": "discard" if rule.discard else "send", "to": list(rule.to),
                 "handler": rule.handler, "priority": "urgent" if rule.priority else "normal",
                 # Its coercion's operations and attributes (never a value).
                 "coerce": [op.describe() for op in rule.coerce]}
        if counts is not None:
            entry.update(counts["rules"].get(rule.name) or {"sent": 0, "discarded": 0})
        out["rules"].append(entry)
    if counts is not None:
        out["fallback_sent"], out["unrouted"] = counts["fallback"], counts["unrouted"]
    return out


# Held studies listed per destination (the count says how many there are in all).
HELD_STUDIES_SHOWN = 20


def held(d: Any, reads: Any, now: float) -> dict[str, Any]:
    """A destination's trigger, and the studies it holds now (study-stable delivery,
    engine/holds.py), the next release first, each with the seconds left before it
    goes (0: due, released at the worker's next round)."""
    studies = [{"study_uid": h["study_uid"], "objects": h["objects"], "release_at": h["release_at"],
                "seconds_to_release": round(max(0.0, h["release_at"] - now), 1),
                "last_arrival_at": h["last_at"], "update": bool(h["updating"])}
               for h in reads.held_studies(d.name, HELD_STUDIES_SHOWN)]
    return {"trigger": d.trigger, "stable_after_s": d.stable_after_s if d.study_stable else None,
            "held_study_count": reads.held_study_count(d.name) if studies else 0,
            "held_studies": studies}


def target(d: Any) -> str:
    """Where a destination sends, in the words an administrator uses (its kind's)."""
    from mfconsole.kinds import kind_of

    return kind_of(d).target(d)


def destination_state(row: Any, paced: dict[str, Any] | None = None) -> dict[str, Any]:
    """up / retrying / down / paused, or outside_window (unless paused: outside its
    delivery windows nothing is tried, whatever the last attempts said), with why and
    when the next attempt is; with ``paced`` (``pacing``) its keys too."""
    row = dict(row) if row is not None else {}
    if row.get("paused"):
        word = "paused"
    elif row.get("down"):
        word = "down"
    elif row.get("failures"):
        word = "retrying"
    else:
        word = "up"
    failing = word != "up"
    window = (paced or {}).get("window")
    if word != "paused" and window is not None and not window["open"]:
        word = "outside_window"
    return {"state": word, "pause_reason": row.get("pause_reason"),
            "failures": row.get("failures") or 0,
            "next_attempt_at": row.get("next_attempt_at") or None,
            "last_status": row.get("last_status") if failing else None,
            "last_error": (row.get("pause_reason") or row.get("last_reason")) if failing else None,
            "oldest_pending_at": None, "held_study_count": 0, "held_studies": [], **(paced or {})}


def pacing(d: Any, reads: Any, now: float) -> dict[str, Any]:
    """A destination's urgent deliveries queued (``reads``: None before the database
    exists), its rate caps, and its delivery window now: None without windows, else
    whether it is open, when that changes next (``next_change_at``, None: never), in
    words (``next_change``), and the ranges."""
    schedule = d.schedule()
    window = None
    if schedule:
        change = schedule.next_change(now)
        window = {"open": schedule.open_at(now), "next_change_at": change,
                  "next_change": describe(change), "windows": list(d.windows),
                  "blackout": list(d.blackout), "urgent_ignores_window": d.urgent_ignores_window}
    return {"urgent_pending": reads.urgent_pending(d.name) if reads is not None else 0,
            "max_objects_per_s": d.max_objects_per_s, "max_mb_per_s": d.max_mb_per_s,
            "window": window}
