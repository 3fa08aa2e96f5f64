"""The delivery queue in SQLite: claim, record outcomes, dead letters, pause/resume.

Plain functions over a connection, used by the delivery workers (through the store's
writer thread) and by the CLI (its own connection, when operating on a data directory
whose engine may or may not run: SQLite's locking serialises the two). Every state
change writes an audit row in the same transaction.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

from mfconsole.contract import (BOUNDED, DESTINATION, FILTERED, MESSAGE, PERMANENT, TRANSIENT,
                                WARNING, Outcome)
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
    suspect: int = 0      # earlier transfers of this delivery that were cut short


@dataclass(frozen=True)
class DestinationState:
    name: str
    paused: bool = False
    pause_reason: str | None = None
    down: bool = False
    failures: int = 0
    next_attempt_at: float = 0.0
    suspect_delivery: int | None = None   # in flight at the last cut-short transfer
    delivered_since_suspect: bool = False


def state(conn: sqlite3.Connection, name: str) -> DestinationState:
    row = conn.execute("SELECT * FROM destination_state WHERE name = ?", (name,)).fetchone()
    if row is None:
        return DestinationState(name)
    return DestinationState(name, bool(row["paused"]), row["pause_reason"], bool(row["down"]),
                            row["failures"], row["next_attempt_at"], row["suspect_delivery"],
                            bool(row["delivered_since_suspect"]))


def _ensure_state(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("INSERT OR IGNORE INTO destination_state (name, updated_at) VALUES (?, ?)",
                 (name, time.time()))


def due(conn: sqlite3.Connection, destination: str, limit: int, now: float | None = None,
        ordered: bool = False) -> list[Claimed]:
    """Up to ``limit`` due pending deliveries, not leased: the oldest due first, or with
    ``ordered`` strictly in arrival order, stopping at the first one not yet due (an
    in-order destination never lets a message overtake one waiting for its retry).
    Unordered, deliveries whose earlier transfers were cut short (suspects) come after
    the others: a possible poison object is never the one that probes a peer."""
    now = now or time.time()
    if ordered:
        return _due(conn, "", "d.id", (destination, PENDING, True, now, limit), now)
    items = _due(conn, "AND d.suspect = 0", "d.retry_at, d.id",
                 (destination, PENDING, False, now, limit), now)
    if len(items) < limit:
        items += _due(conn, "AND d.suspect > 0", "d.retry_at, d.id",
                      (destination, PENDING, False, now, limit - len(items)), now)
    return items


def _due(conn: sqlite3.Connection, where: str, order: str, params: tuple[Any, ...],
         now: float) -> list[Claimed]:
    rows = conn.execute(
        "SELECT d.id, d.object_id, d.attempts, d.retry_at, d.handler, d.listener, d.suspect, "
        "o.sop_instance_uid, o.sop_class_uid, o.transfer_syntax, o.study_uid, o.size "
        "FROM deliveries d JOIN objects o ON o.id = d.object_id "
        f"WHERE d.destination = ? AND d.state = ? AND (? OR d.retry_at <= ?) {where} "
        f"ORDER BY {order} LIMIT ?", params).fetchall()
    items = []
    for r in rows:
        if r["retry_at"] > now:
            break
        items.append(Claimed(r["id"], r["object_id"], r["attempts"], r["sop_instance_uid"],
                             r["sop_class_uid"], r["transfer_syntax"], r["study_uid"] or "",
                             r["size"] or 0, r["handler"], r["listener"], r["suspect"] or 0))
    return items


class Held:
    """Which in-flight deliveries a live worker of this process is working on. Only
    one engine serves a data directory, so an in-flight row nobody holds is stranded
    (its outcome could not be written): ``sweep`` puts it back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[int, str] = {}

    def add(self, owner: str, delivery_ids: Iterable[int]) -> None:
        with self._lock:
            for i in delivery_ids:
                self._owner[i] = owner

    def drop(self, owner: str) -> None:
        with self._lock:
            self._owner = {i: o for i, o in self._owner.items() if o != owner}

    def __contains__(self, delivery_id: int) -> bool:
        with self._lock:
            return delivery_id in self._owner


def claim(conn: sqlite3.Connection, destination: str, limit: int, now: float | None = None,
          ordered: bool = False, held: Held | None = None, owner: str = "") -> list[Claimed]:
    """Lease up to ``limit`` due pending deliveries (see ``due``), held by ``owner``."""
    now = now or time.time()
    items = due(conn, destination, limit, now, ordered)
    conn.executemany("UPDATE deliveries SET state = ?, lease_until = ?, updated_at = ? WHERE id = ?",
                     [(IN_FLIGHT, now + LEASE_S, now, item.delivery_id) for item in items])
    if held is not None:
        held.add(owner, (item.delivery_id for item in items))
    return items


def sweep(conn: sqlite3.Connection, held: Held, now: float | None = None) -> int:
    """In-flight deliveries no live worker holds (a failed outcome write, a worker
    that died) go back to pending; they are sent again (at least once, never lost)."""
    now = now or time.time()
    stranded = [(r["id"], r["destination"], r["object_id"]) for r in conn.execute(
        "SELECT id, destination, object_id FROM deliveries WHERE state = ?", (IN_FLIGHT,))
        if r["id"] not in held]
    conn.executemany("UPDATE deliveries SET state = ?, lease_until = NULL, retry_at = ?, "
                     "updated_at = ? WHERE id = ? AND state = ?",
                     [(PENDING, now, now, i, IN_FLIGHT) for i, _, _ in stranded])
    for i, destination, object_id in stranded:
        _insert_audit(conn, {"ts": now, "event": "requeued", "destination": destination,
                             "object_id": object_id, "delivery_id": i,
                             "detail": "in flight with no worker holding it (its outcome was "
                                       "not written); queued again"})
    return len(stranded)


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


def attribute(dest: DestinationState, item: Claimed, outcome: Outcome, policy: Policy,
              others_delivered: bool = False) -> Outcome:
    """Who is at fault for a transfer cut short while this object was in flight
    (``outcome.ambiguous``): the object when others get through, the peer when nothing
    does. The object, when this connection had delivered others before it, or when it
    was in flight at an earlier cut-short transfer and either other objects were
    delivered since or no other object has been cut short since. Otherwise the peer (as
    any transport failure). A poison object so ends as a dead letter after
    ``bounded_attempts`` cut-short transfers and never marks a healthy peer down."""
    if not outcome.ambiguous:
        return outcome
    mine = outcome.others_delivered or (item.suspect > 0 and (
        dest.delivered_since_suspect or dest.suspect_delivery == item.delivery_id))
    if not mine:
        return outcome
    times = item.suspect + 1
    others = "; other objects were delivered" if (outcome.others_delivered or others_delivered
                                                  or dest.delivered_since_suspect) else ""
    if times >= policy.bounded_attempts:
        return Outcome(PERMANENT, MESSAGE, outcome.status,
                       f"{outcome.reason}, {times} times with this object in flight{others}: "
                       "the object, not the peer, is taken to be at fault", ambiguous=True)
    return Outcome(TRANSIENT, MESSAGE, outcome.status,
                   f"{outcome.reason} ({times} of {policy.bounded_attempts} with this object in "
                   f"flight{others}); retried on its own schedule", ambiguous=True)


def record(conn: sqlite3.Connection, destination: str, item: Claimed, outcome: Outcome,
           policy: Policy, handler: Any = None) -> Outcome:
    """Apply one attempt's outcome to its delivery (and the destination's state);
    return the outcome as recorded (a cut-short transfer attributed, see
    ``attribute``). ``handler`` (name, version, digest) is the handler version this
    attempt ran."""
    now = time.time()
    attempts = item.attempts + 1
    _ensure_state(conn, destination)
    dest = state(conn, destination)
    if outcome.ambiguous:
        others = conn.execute("SELECT 1 FROM deliveries WHERE destination = ? AND state = ? "
                              "AND id != ? LIMIT 1", (destination, DELIVERED, item.delivery_id))
        outcome = attribute(dest, item, outcome, policy, others.fetchone() is not None)
    if outcome.ambiguous:
        conn.execute("UPDATE deliveries SET suspect = suspect + 1 WHERE id = ?", (item.delivery_id,))
        conn.execute("UPDATE destination_state SET suspect_delivery = ?, delivered_since_suspect = 0 "
                     "WHERE name = ?", (item.delivery_id, destination))
    if handler is not None:
        conn.execute("UPDATE deliveries SET handler_version = ?, handler_digest = ? WHERE id = ?",
                     (handler.version, handler.digest, item.delivery_id))
    if outcome.persistence == FILTERED:
        new_state, retry_at, event = FILTERED_STATE, None, "filtered"
    elif outcome.is_success:
        new_state, retry_at = DELIVERED, None
        event = "delivered_with_warning" if outcome.persistence == WARNING else "delivered"
        conn.execute("UPDATE destination_state SET failures = 0, down = 0, next_attempt_at = 0, "
                     "last_status = ?, last_reason = ?, delivered_since_suspect = 1, updated_at = ? "
                     "WHERE name = ?", (outcome.status, outcome.reason, now, destination))
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
    elif outcome.scope == MESSAGE and (outcome.persistence == PERMANENT or (
            outcome.persistence == BOUNDED and attempts >= policy.bounded_attempts)):
        # Only the object's own failures end it: a destination-scope bounded outcome
        # (RJ 2/2/1) below its bound is retried like a transient one, never dead.
        new_state, retry_at, event = DEAD, None, "dead_lettered"
    else:   # transient, or bounded with tries left
        failures = dest.failures + 1 if outcome.scope == DESTINATION else dest.failures
        if outcome.scope == DESTINATION:
            delay = backoff(failures, policy.retry_initial_s, policy.retry_max_s)
        else:   # this object's own schedule (cut-short transfers count, when they are its)
            delay = backoff(max(attempts if not outcome.ambiguous else item.suspect + 1, 1),
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
    return outcome


def pause(conn: sqlite3.Connection, destination: str, reason: str, *, status: str = "operator",
          actor: str = "engine") -> None:
    now = time.time()
    _ensure_state(conn, destination)
    conn.execute("UPDATE destination_state SET paused = 1, pause_reason = ?, updated_at = ? "
                 "WHERE name = ?", (reason, now, destination))
    _insert_audit(conn, {"ts": now, "event": "destination_paused", "destination": destination,
                         "status": status, "detail": f"by {actor}: {reason}", "actor": actor})


def resume(conn: sqlite3.Connection, destination: str, *, actor: str = "operator") -> None:
    now = time.time()
    _ensure_state(conn, destination)
    conn.execute("UPDATE destination_state SET paused = 0, pause_reason = NULL, down = 0, "
                 "failures = 0, next_attempt_at = 0, updated_at = ? WHERE name = ?", (now, destination))
    # Queued items become due now rather than at their backed-off time.
    conn.execute("UPDATE deliveries SET retry_at = ? WHERE destination = ? AND state = ?",
                 (now, destination, PENDING))
    _insert_audit(conn, {"ts": now, "event": "destination_resumed", "destination": destination,
                         "detail": f"by {actor}", "actor": actor})


# -- dead letters -----------------------------------------------------------------

def dead_letters(conn: sqlite3.Connection, destination: str | None = None,
                 reason: str | None = None, ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    sql = ("SELECT d.id, d.destination, d.object_id, d.attempts, d.last_status, d.last_class, "
           "d.last_reason, d.handler, d.handler_version, d.updated_at, o.sop_instance_uid, "
           "o.sop_class_uid, o.study_uid, o.transfer_syntax, o.size, o.calling_ae, o.listener, "
           "o.version, o.superseded "
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


# Operator actions over many dead letters run in transactions of this many rows (and
# stay under SQLite's limit on bound variables).
BULK_BATCH = 500


def replay(conn: sqlite3.Connection, delivery_ids: Iterable[int], *, to: str | None = None,
           actor: str = "operator", as_stored: bool = False,
           notes: list[str] | None = None) -> list[int]:
    """Dead letters back to pending (optionally for another destination). Returns the
    ids of the deliveries now queued (new rows when re-targeted).

    A dead letter of a superseded version (the same SOP Instance UID was received
    again with other bytes) sends the current version instead, unless ``as_stored``;
    if the current version is already queued or delivered there, nothing is queued.
    Either way it is said in ``notes`` and in the audit row."""
    now = time.time()
    queued: list[int] = []
    for row in dead_letters(conn, ids=delivery_ids):
        target = to or row["destination"]
        object_id, said = row["object_id"], ""
        if row["superseded"] and not as_stored:
            current = conn.execute(
                "SELECT id, version FROM objects WHERE sop_instance_uid = ? "
                "ORDER BY version DESC LIMIT 1", (row["sop_instance_uid"],)).fetchone()
            said = (f"dead letter {row['id']} holds version {row['version']} of "
                    f"{row['sop_instance_uid']}, superseded by version {current['version']} "
                    f"(object {current['id']})")
            existing = conn.execute(
                "SELECT id, state FROM deliveries WHERE object_id = ? AND destination = ? "
                "AND state IN (?, ?, ?, ?) ORDER BY id DESC LIMIT 1",
                (current["id"], target, PENDING, IN_FLIGHT, DELIVERED, FILTERED_STATE)).fetchone()
            object_id = current["id"]
            if existing is not None:
                said += f", whose delivery {existing['id']} to {target} is {existing['state']}: nothing queued"
                conn.execute("UPDATE deliveries SET state = ?, updated_at = ? WHERE id = ?",
                             (REPLAYED, now, row["id"]))
                _replay_audit(conn, now, row, target, object_id, existing["id"], actor, said)
                if notes is not None:
                    notes.append(said)
                continue
            said += f": version {current['version']} queued instead"
        elif row["superseded"]:
            said = (f"dead letter {row['id']} holds version {row['version']}, which is superseded; "
                    "sent as stored, as asked")
        if object_id == row["object_id"] and target == row["destination"]:
            conn.execute("UPDATE deliveries SET state = ?, retry_at = ?, attempts = 0, suspect = 0, "
                         "updated_at = ? WHERE id = ?", (PENDING, now, now, row["id"]))
            new_id = row["id"]
        else:
            cur = conn.execute(
                "INSERT INTO deliveries (object_id, destination, listener, handler, state, attempts, "
                "retry_at, created_at, updated_at) VALUES (?,?,?,?,?,0,?,?,?)",
                (object_id, target, row["listener"], row["handler"], PENDING, now, now, now))
            conn.execute("UPDATE deliveries SET state = ?, updated_at = ? WHERE id = ?",
                         (REPLAYED, now, row["id"]))
            new_id = cur.lastrowid
        queued.append(new_id)
        _replay_audit(conn, now, row, target, object_id, new_id, actor, said)
        if notes is not None and said:
            notes.append(said)
    return queued


def _replay_audit(conn: sqlite3.Connection, now: float, row: dict[str, Any], target: str,
                  object_id: int, delivery_id: int, actor: str, said: str) -> None:
    detail = f"by {actor}: dead letter {row['id']} of {row['destination']}"
    if target != row["destination"]:
        detail += f" re-targeted to {target}"
    _insert_audit(conn, {"ts": now, "event": "replayed", "destination": target,
                         "object_id": object_id, "delivery_id": delivery_id,
                         "sop_instance_uid": row["sop_instance_uid"],
                         "detail": detail + (f"; {said}" if said else ""), "actor": actor})


def batches(ids: list[int], size: int = BULK_BATCH) -> Iterable[list[int]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def discard(conn: sqlite3.Connection, delivery_ids: Iterable[int], *, actor: str = "operator") -> int:
    now = time.time()
    rows = dead_letters(conn, ids=delivery_ids)
    for row in rows:
        conn.execute("UPDATE deliveries SET state = ?, updated_at = ? WHERE id = ?",
                     (DISCARDED, now, row["id"]))
        _insert_audit(conn, {"ts": now, "event": "discarded", "destination": row["destination"],
                             "object_id": row["object_id"], "delivery_id": row["id"],
                             "sop_instance_uid": row["sop_instance_uid"],
                             "detail": f"by {actor}: dead letter discarded", "actor": actor})
    return len(rows)
