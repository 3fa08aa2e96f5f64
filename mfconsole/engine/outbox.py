"""The delivery queue in SQLite: claim, record outcomes, dead letters, pause/resume.

Plain functions over a connection, used by the delivery workers (through the store's
writer thread) and by the CLI (its own connection, when operating on a data directory
whose engine may or may not run: SQLite's locking serialises the two). Every state
change writes an audit row in the same transaction.
"""

from __future__ import annotations

import random
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Iterable

from mfconsole.engine.outcomes import (BOUNDED, DESTINATION, FILTERED, PERMANENT, TRANSIENT, WARNING,
                                       Outcome)
from mfconsole.engine.store import (DEAD, DELIVERED, DISCARDED, IN_FLIGHT, PENDING, REPLAYED,
                                    _insert_audit)
from mfconsole.engine.store import FILTERED as FILTERED_STATE

LEASE_S = 300.0


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    object_id: int
    attempts: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str = ""
    size: int = 0
    handler: str | None = None
    listener: str | None = None


@dataclass(frozen=True)
class DestinationState:
    name: str
    paused: bool = False
    pause_reason: str | None = None
    down: bool = False
    failures: int = 0
    next_attempt_at: float = 0.0


def state(conn: sqlite3.Connection, name: str) -> DestinationState:
    row = conn.execute("SELECT * FROM destination_state WHERE name = ?", (name,)).fetchone()
    if row is None:
        return DestinationState(name)
    return DestinationState(name, bool(row["paused"]), row["pause_reason"], bool(row["down"]),
                            row["failures"], row["next_attempt_at"])


def _ensure_state(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("INSERT OR IGNORE INTO destination_state (name, updated_at) VALUES (?, ?)",
                 (name, time.time()))


def due(conn: sqlite3.Connection, destination: str, limit: int, now: float | None = None,
        ordered: bool = False) -> list[Claimed]:
    """Up to ``limit`` due pending deliveries, not leased: the oldest due first, or with
    ``ordered`` strictly in arrival order, stopping at the first one not yet due (an
    in-order destination never lets a message overtake one waiting for its retry)."""
    now = now or time.time()
    rows = conn.execute(
        "SELECT d.id, d.object_id, d.attempts, d.retry_at, d.handler, d.listener, o.sop_instance_uid, "
        "o.sop_class_uid, o.transfer_syntax, o.study_uid, o.size "
        "FROM deliveries d JOIN objects o ON o.id = d.object_id "
        "WHERE d.destination = ? AND d.state = ? AND (? OR d.retry_at <= ?) "
        f"ORDER BY {'d.id' if ordered else 'd.retry_at, d.id'} LIMIT ?",
        (destination, PENDING, ordered, now, limit)).fetchall()
    items = []
    for r in rows:
        if r["retry_at"] > now:
            break
        items.append(Claimed(r["id"], r["object_id"], r["attempts"], r["sop_instance_uid"],
                             r["sop_class_uid"], r["transfer_syntax"], r["study_uid"] or "",
                             r["size"] or 0, r["handler"], r["listener"]))
    return items


def claim(conn: sqlite3.Connection, destination: str, limit: int, now: float | None = None,
          ordered: bool = False) -> list[Claimed]:
    """Lease up to ``limit`` due pending deliveries (see ``due``)."""
    now = now or time.time()
    items = due(conn, destination, limit, now, ordered)
    conn.executemany("UPDATE deliveries SET state = ?, lease_until = ?, updated_at = ? WHERE id = ?",
                     [(IN_FLIGHT, now + LEASE_S, now, item.delivery_id) for item in items])
    return items


def release(conn: sqlite3.Connection, delivery_ids: Iterable[int]) -> None:
    """Give leased deliveries back untouched (not attempted: no attempt counted)."""
    now = time.time()
    conn.executemany("UPDATE deliveries SET state = ?, lease_until = NULL, updated_at = ? "
                     "WHERE id = ? AND state = ?", [(PENDING, now, i, IN_FLIGHT) for i in delivery_ids])


def backoff(failures: int, initial: float, maximum: float, rng: random.Random = random.Random()) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    delay = min(maximum, initial * (2 ** max(0, failures - 1)))
    return delay / 2 + rng.uniform(0, delay / 2)


@dataclass(frozen=True)
class Policy:
    retry_initial_s: float = 5.0
    retry_max_s: float = 600.0
    down_after: int = 5
    bounded_attempts: int = 3


def record(conn: sqlite3.Connection, destination: str, item: Claimed, outcome: Outcome,
           policy: Policy, handler: Any = None) -> str:
    """Apply one attempt's outcome to its delivery (and the destination's state);
    return the delivery's new state. ``handler`` (name, version, digest) is the
    handler version this attempt ran."""
    now = time.time()
    attempts = item.attempts + 1
    _ensure_state(conn, destination)
    dest = state(conn, destination)
    if handler is not None:
        conn.execute("UPDATE deliveries SET handler_version = ?, handler_digest = ? WHERE id = ?",
                     (handler.version, handler.digest, item.delivery_id))
    if outcome.persistence == FILTERED:
        new_state, retry_at, event = FILTERED_STATE, None, "filtered"
    elif outcome.is_success:
        new_state, retry_at = DELIVERED, None
        event = "delivered_with_warning" if outcome.persistence == WARNING else "delivered"
        conn.execute("UPDATE destination_state SET failures = 0, down = 0, next_attempt_at = 0, "
                     "last_status = ?, last_reason = ?, updated_at = ? WHERE name = ?",
                     (outcome.status, outcome.reason, now, destination))
        if dest.down:
            _insert_audit(conn, {"ts": now, "event": "destination_up", "destination": destination,
                                 "detail": "delivery succeeded; destination is up again"})
    elif outcome.scope == DESTINATION and (
            outcome.persistence == PERMANENT
            or (outcome.persistence == BOUNDED and dest.failures + 1 >= policy.bounded_attempts)):
        # Not the object's fault: keep it queued (attempt not counted) and pause.
        new_state, retry_at, attempts = PENDING, now, item.attempts
        pause(conn, destination, outcome.reason, status=outcome.status)
        event = None
    elif outcome.persistence == PERMANENT or (outcome.persistence == BOUNDED
                                              and attempts >= policy.bounded_attempts):
        new_state, retry_at, event = DEAD, None, "dead_lettered"
    else:   # transient, or bounded with tries left
        failures = dest.failures + 1 if outcome.scope == DESTINATION else dest.failures
        delay = backoff(failures if outcome.scope == DESTINATION else attempts,
                        policy.retry_initial_s, policy.retry_max_s)
        # A peer that said when to come back (HTTP Retry-After) is not asked sooner.
        delay = max(delay, outcome.retry_after_s or 0.0)
        new_state, retry_at, event = PENDING, now + delay, "retry_scheduled"
        if outcome.scope == DESTINATION:
            down = failures >= policy.down_after
            conn.execute("UPDATE destination_state SET failures = ?, down = ?, next_attempt_at = ?, "
                         "last_status = ?, last_reason = ?, updated_at = ? WHERE name = ?",
                         (failures, int(down), now + delay, outcome.status, outcome.reason, now,
                          destination))
            if down and not dest.down:
                _insert_audit(conn, {"ts": now, "event": "destination_down", "destination": destination,
                                     "status": outcome.status,
                                     "detail": f"{failures} transient failures in a row: {outcome.reason}; "
                                               "probing at the backoff interval"})
    conn.execute(
        "UPDATE deliveries SET state = ?, attempts = ?, retry_at = ?, lease_until = NULL, "
        "last_status = ?, last_class = ?, last_reason = ?, updated_at = ? WHERE id = ?",
        (new_state, attempts, retry_at if retry_at is not None else now, outcome.status,
         outcome.label, outcome.reason, now, item.delivery_id))
    if event is not None:
        _insert_audit(conn, {"ts": now, "event": event, "destination": destination,
                             "listener": item.listener, "object_id": item.object_id,
                             "delivery_id": item.delivery_id, "sop_instance_uid": item.sop_instance_uid,
                             "status": outcome.status,
                             "detail": f"attempt {attempts}: {outcome.label}: {outcome.reason}"
                                       + (f"; next try in {retry_at - now:.1f} s"
                                          if event == "retry_scheduled" and retry_at else "")})
    return new_state


def pause(conn: sqlite3.Connection, destination: str, reason: str, *, status: str = "operator",
          actor: str = "engine") -> None:
    now = time.time()
    _ensure_state(conn, destination)
    conn.execute("UPDATE destination_state SET paused = 1, pause_reason = ?, updated_at = ? "
                 "WHERE name = ?", (reason, now, destination))
    _insert_audit(conn, {"ts": now, "event": "destination_paused", "destination": destination,
                         "status": status, "detail": f"by {actor}: {reason}"})


def resume(conn: sqlite3.Connection, destination: str, *, actor: str = "operator") -> None:
    now = time.time()
    _ensure_state(conn, destination)
    conn.execute("UPDATE destination_state SET paused = 0, pause_reason = NULL, down = 0, "
                 "failures = 0, next_attempt_at = 0, updated_at = ? WHERE name = ?", (now, destination))
    # Queued items become due now rather than at their backed-off time.
    conn.execute("UPDATE deliveries SET retry_at = ? WHERE destination = ? AND state = ?",
                 (now, destination, PENDING))
    _insert_audit(conn, {"ts": now, "event": "destination_resumed", "destination": destination,
                         "detail": f"by {actor}"})


# -- dead letters -----------------------------------------------------------------

def dead_letters(conn: sqlite3.Connection, destination: str | None = None,
                 reason: str | None = None, ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    sql = ("SELECT d.id, d.destination, d.object_id, d.attempts, d.last_status, d.last_class, "
           "d.last_reason, d.handler, d.handler_version, d.updated_at, o.sop_instance_uid, "
           "o.sop_class_uid, o.study_uid, o.transfer_syntax, o.size, o.calling_ae, o.listener "
           "FROM deliveries d JOIN objects o ON o.id = d.object_id WHERE d.state = ?")
    params: list[Any] = [DEAD]
    if destination:
        sql += " AND d.destination = ?"
        params.append(destination)
    if reason:
        sql += " AND instr(lower(d.last_reason), lower(?)) > 0"
        params.append(reason)
    if ids is not None:
        ids = list(ids)
        sql += f" AND d.id IN ({','.join('?' * len(ids))})"
        params += ids
    return [dict(r) for r in conn.execute(sql + " ORDER BY d.id", params)]


def replay(conn: sqlite3.Connection, delivery_ids: Iterable[int], *, to: str | None = None,
           actor: str = "operator") -> list[int]:
    """Dead letters back to pending (optionally for another destination). Returns the
    ids of the deliveries now queued (new rows when re-targeted)."""
    now = time.time()
    queued: list[int] = []
    for row in dead_letters(conn, ids=delivery_ids):
        if to is None or to == row["destination"]:
            conn.execute("UPDATE deliveries SET state = ?, retry_at = ?, attempts = 0, "
                         "updated_at = ? WHERE id = ?", (PENDING, now, now, row["id"]))
            target, new_id = row["destination"], row["id"]
        else:
            cur = conn.execute(
                "INSERT INTO deliveries (object_id, destination, listener, handler, state, attempts, "
                "retry_at, created_at, updated_at) VALUES (?,?,?,?,?,0,?,?,?)",
                (row["object_id"], to, row["listener"], row["handler"], PENDING, now, now, now))
            conn.execute("UPDATE deliveries SET state = ?, updated_at = ? WHERE id = ?",
                         (REPLAYED, now, row["id"]))
            target, new_id = to, cur.lastrowid
        queued.append(new_id)
        _insert_audit(conn, {"ts": now, "event": "replayed", "destination": target,
                             "object_id": row["object_id"], "delivery_id": new_id,
                             "sop_instance_uid": row["sop_instance_uid"],
                             "detail": f"by {actor}: dead letter {row['id']} of {row['destination']}"
                                       + (f" re-targeted to {to}" if target != row["destination"] else "")})
    return queued


def discard(conn: sqlite3.Connection, delivery_ids: Iterable[int], *, actor: str = "operator") -> int:
    now = time.time()
    rows = dead_letters(conn, ids=delivery_ids)
    for row in rows:
        conn.execute("UPDATE deliveries SET state = ?, updated_at = ? WHERE id = ?",
                     (DISCARDED, now, row["id"]))
        _insert_audit(conn, {"ts": now, "event": "discarded", "destination": row["destination"],
                             "object_id": row["object_id"], "delivery_id": row["id"],
                             "sop_instance_uid": row["sop_instance_uid"],
                             "detail": f"by {actor}: dead letter discarded"})
    return len(rows)
