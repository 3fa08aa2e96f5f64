"""Every read query, behind typed methods returning plain values and dicts.

``Reads`` wraps one connection: the store's per-thread reader, a read-only
connection of the control service or of ``status`` (which work whether an engine runs
or not), or the writer's own connection (``writes.Tx`` is a ``Reads`` too, for what a
write must read inside its transaction). Rows are routing-safe: the database holds no
patient data, only UIDs, names of our own listeners/destinations, and statuses.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from mfconsole.repository.schema import connect
from mfconsole.repository.states import ACTIVE_STATES, DEAD, DELIVERED, IN_FLIGHT, PENDING

# The errors `status` lists.
ERROR_EVENTS = ("refused", "association_rejected", "dead_lettered", "store_failed")

_DEAD_COLUMNS = ("d.id, d.destination, d.object_id, d.attempts, d.last_status, d.last_class, "
                 "d.last_reason, d.handler, d.handler_version, d.rule, d.coerced, d.updated_at, "
                 "o.sop_instance_uid, "
                 "o.sop_class_uid, o.study_uid, o.transfer_syntax, o.size, o.calling_ae, o.listener, "
                 "o.version, o.superseded, d.priority")
_DEAD_FROM = "FROM deliveries d JOIN objects o ON o.id = d.object_id"


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters an operator means: the one filter of the CLI (destination,
    reason), the console (free text over what a row shows, a cause group) and ids."""
    destination: str | None = None
    reason: str | None = None          # substring of the last reason, any case
    text: str | None = None            # substring of destination, status, reason, UIDs, AE, id
    group: dict[str, Any] | None = None   # destination + status + reason, exactly
    ids: tuple[int, ...] | None = None

    def where(self) -> tuple[str, list[Any]]:
        sql, params = "d.state = ?", [DEAD]
        if self.destination:
            sql += " AND d.destination = ?"
            params.append(self.destination)
        if self.reason:
            sql += " AND instr(lower(d.last_reason), lower(?)) > 0"
            params.append(self.reason)
        if self.group:
            sql += (" AND d.destination = ? AND COALESCE(d.last_status, '') = ? "
                    "AND COALESCE(d.last_reason, '') = ?")
            params += [self.group["destination"], self.group.get("status") or "",
                       self.group.get("reason") or ""]
        if self.text:
            sql += (" AND instr(lower(d.destination || ' ' || COALESCE(d.last_status, '') || ' ' || "
                    "COALESCE(d.last_reason, '') || ' ' || o.sop_instance_uid || ' ' || "
                    "COALESCE(o.study_uid, '') || ' ' || COALESCE(o.calling_ae, '') || ' ' || d.id), "
                    "lower(?)) > 0")
            params.append(self.text)
        if self.ids is not None:
            sql += f" AND d.id IN ({','.join('?' * len(self.ids))})"
            params += list(self.ids)
        return sql, params


@dataclass(frozen=True)
class ObjectFilter:
    """Which stored objects the browser shows (every field optional, all must match)."""
    since: float | None = None           # received at or after
    until: float | None = None           # received before
    listener: str | None = None
    calling_ae: str | None = None
    modality: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    association: str | None = None
    destination: str | None = None       # has a delivery to it ...
    state: str | None = None             # ... (or to any destination) in this state
    tokens: tuple[str, ...] | None = None   # accession or patient ID search tokens (any)

    def where(self) -> tuple[str, list[Any]]:
        sql, params = ["1"], []
        for column, value in (("o.listener", self.listener), ("o.calling_ae", self.calling_ae),
                              ("o.modality", self.modality), ("o.sop_class_uid", self.sop_class_uid),
                              ("o.sop_instance_uid", self.sop_instance_uid),
                              ("o.study_uid", self.study_uid), ("o.association", self.association)):
            if value:
                sql.append(f"{column} = ?")
                params.append(value)
        if self.since is not None:
            sql.append("o.received_at >= ?")
            params.append(self.since)
        if self.until is not None:
            sql.append("o.received_at < ?")
            params.append(self.until)
        if self.destination or self.state:
            cond, more = ["x.object_id = o.id"], []
            if self.destination:
                cond.append("x.destination = ?")
                more.append(self.destination)
            if self.state:
                cond.append("x.state = ?")
                more.append(self.state)
            sql.append(f"EXISTS (SELECT 1 FROM deliveries x WHERE {' AND '.join(cond)})")
            params += more
        if self.tokens is not None:
            marks = ",".join("?" * len(self.tokens))
            sql.append(f"(o.accession_token IN ({marks}) OR o.patient_token IN ({marks}))")
            params += list(self.tokens) * 2
        return " AND ".join(sql), params


# Columns the browser may sort by (names checked here, never pasted from a request).
OBJECT_SORTS = ("id", "received_at", "listener", "calling_ae", "modality", "sop_class_uid",
                "sop_instance_uid", "study_uid", "series_uid", "size")
_OBJECT_COLUMNS = ("o.id, o.received_at, o.listener, o.calling_ae, o.called_ae, o.peer, o.association, "
                   "o.modality, "
                   "o.sop_class_uid, o.sop_instance_uid, o.study_uid, o.series_uid, o.transfer_syntax, "
                   "o.size, o.version, o.superseded, o.purged_at, "
                   "(SELECT group_concat(x.destination || '=' || x.state, ' ') FROM "
                   "(SELECT destination, state FROM deliveries WHERE object_id = o.id ORDER BY id) x) "
                   "AS deliveries")


@dataclass(frozen=True)
class AuditFilter:
    """Which audit rows the audit screen shows."""
    event: str | None = None
    destination: str | None = None
    listener: str | None = None
    actor: str | None = None          # substring, any case
    object_id: int | None = None
    since: float | None = None
    until: float | None = None
    text: str | None = None           # substring of event, names, status, detail, UID

    def where(self) -> tuple[str, list[Any]]:
        sql, params = ["1"], []
        for column, value in (("event", self.event), ("destination", self.destination),
                              ("listener", self.listener), ("object_id", self.object_id)):
            if value is not None and value != "":
                sql.append(f"{column} = ?")
                params.append(value)
        if self.actor:
            sql.append("instr(lower(actor), lower(?)) > 0")
            params.append(self.actor)
        if self.since is not None:
            sql.append("ts >= ?")
            params.append(self.since)
        if self.until is not None:
            sql.append("ts < ?")
            params.append(self.until)
        if self.text:
            sql.append("instr(lower(COALESCE(event, '') || ' ' || COALESCE(listener, '') || ' ' || "
                       "COALESCE(destination, '') || ' ' || COALESCE(status, '') || ' ' || "
                       "COALESCE(detail, '') || ' ' || COALESCE(sop_instance_uid, '') || ' ' || "
                       "COALESCE(calling_ae, '') || ' ' || COALESCE(actor, '')), lower(?)) > 0")
            params.append(self.text)
        return " AND ".join(sql), params


def _dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    return [dict(r) for r in cur]


class Reads:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    # -- objects ------------------------------------------------------------------

    def latest_version(self, sop_instance_uid: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT id, version, digest, key_id FROM objects WHERE sop_instance_uid = ? "
            "ORDER BY version DESC LIMIT 1", (sop_instance_uid,)).fetchone()
        return dict(row) if row is not None else None

    def object_blob(self, object_id: int) -> tuple[str, bytes | None] | None:
        """Where an unpurged object's sealed bytes are: (file, None), or (INLINE,
        sealed) for one held in the database; None when purged or unknown."""
        return self.object_blobs([object_id]).get(object_id)

    def object_blobs(self, object_ids: list[int]) -> dict[int, tuple[str, bytes | None]]:
        """``object_blob`` of several objects in one query (a delivery group's); the
        purged and unknown ones are missing."""
        if not object_ids:
            return {}
        marks = ",".join("?" * len(object_ids))
        rows = self.conn.execute(
            "SELECT o.id, o.blob, b.sealed FROM objects o LEFT JOIN blob_data b ON b.object_id = o.id "
            f"WHERE o.id IN ({marks}) AND o.purged_at IS NULL", list(object_ids)).fetchall()
        return {row["id"]: (row["blob"], row["sealed"]) for row in rows}

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT blob FROM objects WHERE purged_at IS NULL")}

    def has_objects(self) -> bool:
        """Whether any object was ever stored (purged ones too)."""
        return self.conn.execute("SELECT 1 FROM objects LIMIT 1").fetchone() is not None

    def sealed_key_ids(self) -> dict[str, int]:
        """Key id -> number of unpurged objects it sealed."""
        return {r[0]: r[1] for r in self.conn.execute(
            "SELECT key_id, COUNT(*) FROM objects WHERE purged_at IS NULL GROUP BY key_id")}

    def not_sealed_with(self, key_id: str) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM objects WHERE purged_at IS NULL AND key_id != ?",
                                 (key_id,)).fetchone()[0]

    def to_reseal(self, key_id: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        """The next unpurged objects not under ``key_id``, by id, with inline bytes."""
        return _dicts(self.conn.execute(
            "SELECT o.id, o.blob, o.key_id, b.sealed FROM objects o "
            "LEFT JOIN blob_data b ON b.object_id = o.id "
            "WHERE o.purged_at IS NULL AND o.key_id != ? AND o.id > ? ORDER BY o.id LIMIT ?",
            (key_id, after_id, limit)))

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row is not None else None

    # -- deliveries -----------------------------------------------------------------

    def destination_state(self, name: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM destination_state WHERE name = ?", (name,)).fetchone()
        return dict(row) if row is not None else None

    def delivery_counts(self, destination: str | None = None) -> dict[str, dict[str, int]]:
        """destination -> state -> deliveries."""
        sql, params = "SELECT destination, state, COUNT(*) AS n FROM deliveries", ()
        if destination is not None:
            sql, params = sql + " WHERE destination = ?", (destination,)
        out: dict[str, dict[str, int]] = {}
        for r in self.conn.execute(sql + " GROUP BY destination, state", params):
            out.setdefault(r["destination"], {})[r["state"]] = r["n"]
        return out

    def oldest_pending_at(self, destination: str) -> float | None:
        # Arrival order is id order: the first pending row is the oldest.
        oldest = self.conn.execute("SELECT MIN(id) FROM deliveries WHERE destination = ? AND state = ?",
                                   (destination, PENDING)).fetchone()[0]
        return oldest and self.conn.execute("SELECT created_at FROM deliveries WHERE id = ?",
                                            (oldest,)).fetchone()[0]

    def due(self, destination: str, *, ordered: bool, suspects: bool | None, now: float,
            limit: int, priority: int | None = None) -> list[sqlite3.Row]:
        """Pending deliveries of a destination with what sending them needs: due ones
        of one ``priority`` by retry time (one range of the deliveries_due index), or
        with ``ordered`` every pending one by arrival whatever its retry time and
        priority; ``suspects`` True/False for only/no cut-short deliveries, None for both."""
        where = "" if suspects is None else ("AND d.suspect > 0" if suspects else "AND d.suspect = 0")
        params: list[Any] = [destination, PENDING]
        if ordered:
            order = "d.id"
        else:
            where += " AND d.priority = ? AND d.retry_at <= ?"
            params += [priority or 0, now]
            order = "d.retry_at, d.id"
        return list(self.conn.execute(
            "SELECT d.id, d.object_id, d.attempts, d.retry_at, d.handler, d.listener, d.suspect, "
            "d.rule, d.priority, o.sop_instance_uid, o.sop_class_uid, o.transfer_syntax, "
            "o.study_uid, o.size, o.calling_ae, o.called_ae, o.peer, o.received_at "
            "FROM deliveries d JOIN objects o ON o.id = d.object_id "
            f"WHERE d.destination = ? AND d.state = ? {where} "
            f"ORDER BY {order} LIMIT ?", (*params, limit)))

    def pending_of_studies(self, destination: str, study_uids: Iterable[str],
                           limit: int) -> list[sqlite3.Row]:
        """Every pending delivery (due or not) of these studies to a destination, by
        id, with the columns of ``due``: what a study-stable destination's claim adds
        so that a study goes out whole (and is retried whole)."""
        uids = tuple(study_uids)
        return list(self.conn.execute(
            "SELECT d.id, d.object_id, d.attempts, d.retry_at, d.handler, d.listener, d.suspect, "
            "d.rule, d.priority, o.sop_instance_uid, o.sop_class_uid, o.transfer_syntax, "
            "o.study_uid, o.size, o.calling_ae, o.called_ae, o.peer, o.received_at "
            "FROM deliveries d JOIN objects o ON o.id = d.object_id "
            f"WHERE d.destination = ? AND d.state = ? AND o.study_uid IN ({','.join('?' * len(uids))}) "
            "ORDER BY d.id LIMIT ?", (destination, PENDING, *uids, limit)))

    def study_objects_sent(self, destination: str, study_uid: str) -> list[dict[str, Any]]:
        """The objects of a study already delivered (or filtered) to a destination and
        still stored, latest version each, in arrival order: what an update of the
        study-level message is made from beside its late group."""
        return _dicts(self.conn.execute(
            "SELECT DISTINCT o.id AS object_id, o.sop_instance_uid, o.sop_class_uid, "
            "o.transfer_syntax, o.study_uid FROM objects o JOIN deliveries d ON d.object_id = o.id "
            "WHERE o.study_uid = ? AND d.destination = ? AND d.state IN ('delivered', 'filtered') "
            "AND o.purged_at IS NULL AND o.superseded = 0 ORDER BY o.id", (study_uid, destination)))

    def holds_due(self, destination: str, now: float) -> list[dict[str, Any]]:
        """A destination's holds whose release time has passed, the earliest first."""
        return _dicts(self.conn.execute(
            "SELECT study_uid, first_at, last_at, release_at, objects, updating FROM study_holds "
            "WHERE destination = ? AND release_at IS NOT NULL AND release_at <= ? "
            "ORDER BY release_at", (destination, now)))

    def next_release(self, destination: str) -> float | None:
        """The earliest release time of a destination's holds (None: nothing held)."""
        return self.conn.execute("SELECT MIN(release_at) FROM study_holds WHERE destination = ? "
                                 "AND release_at IS NOT NULL", (destination,)).fetchone()[0]

    def held_studies(self, destination: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Studies held now (per destination), the next release first: study UID,
        deliveries held, first and last arrival, release time, whether an update."""
        if not self.table_exists("study_holds"):
            return []
        where, params = "release_at IS NOT NULL", []
        if destination is not None:
            where += " AND destination = ?"
            params.append(destination)
        return _dicts(self.conn.execute(
            "SELECT destination, study_uid, objects, first_at, last_at, release_at, updating "
            f"FROM study_holds WHERE {where} ORDER BY release_at LIMIT ?", (*params, limit)))

    def held_study_count(self, destination: str) -> int:
        if not self.table_exists("study_holds"):
            return 0
        return self.conn.execute("SELECT COUNT(*) FROM study_holds WHERE destination = ? AND "
                                 "release_at IS NOT NULL", (destination,)).fetchone()[0]

    def urgent_pending(self, destination: str) -> int:
        """Urgent deliveries queued for a destination (due or waiting for a retry)."""
        return self.conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE destination = ? AND state = ? AND priority = 1",
            (destination, PENDING)).fetchone()[0]

    def due_plan(self, destination: str) -> str:
        """How SQLite plans the due query of one priority (EXPLAIN QUERY PLAN details,
        joined): whether it is a range of deliveries_due, with no sort."""
        return " ".join(r[3] for r in self.conn.execute(
            "EXPLAIN QUERY PLAN SELECT d.id FROM deliveries d JOIN objects o ON o.id = d.object_id "
            "WHERE d.destination = ? AND d.state = ? AND d.suspect = 0 AND d.priority = 1 "
            "AND d.retry_at <= 0 ORDER BY d.retry_at, d.id LIMIT 5", (destination, PENDING)))

    def in_flight(self) -> list[dict[str, Any]]:
        return _dicts(self.conn.execute(
            "SELECT id, destination, object_id FROM deliveries WHERE state = ?", (IN_FLIGHT,)))

    def delivered_other_than(self, destination: str, delivery_id: int) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM deliveries WHERE destination = ? AND state = ? AND id != ? LIMIT 1",
            (destination, DELIVERED, delivery_id)).fetchone() is not None

    def latest_delivery_of(self, object_id: int, destination: str,
                           states: Iterable[str]) -> dict[str, Any] | None:
        states = tuple(states)
        row = self.conn.execute(
            "SELECT id, state FROM deliveries WHERE object_id = ? AND destination = ? "
            f"AND state IN ({','.join('?' * len(states))}) ORDER BY id DESC LIMIT 1",
            (object_id, destination, *states)).fetchone()
        return dict(row) if row is not None else None

    def delivery(self, delivery_id: int) -> dict[str, Any] | None:
        """One delivery with its object's routing fields (any state, purged or not)."""
        row = self.conn.execute(
            "SELECT d.id, d.destination, d.object_id, d.state, d.handler, d.attempts, d.suspect, "
            "d.retry_at, d.last_status, d.last_class, d.last_reason, d.rule, d.coerced, "
            "d.listener, o.sop_instance_uid, o.sop_class_uid, o.transfer_syntax, o.study_uid, "
            "o.purged_at, o.calling_ae, o.called_ae, o.peer, o.received_at "
            f"{_DEAD_FROM} WHERE d.id = ?", (int(delivery_id),)).fetchone()
        return dict(row) if row is not None else None

    def recent_for_handler(self, handler: str, limit: int) -> list[dict[str, Any]]:
        """The latest deliveries through a handler whose object is still stored."""
        return _dicts(self.conn.execute(
            "SELECT d.id, d.destination, d.listener, d.object_id, o.sop_class_uid, "
            "o.sop_instance_uid, o.transfer_syntax, o.study_uid, o.purged_at, o.calling_ae, "
            "o.called_ae, o.peer, o.received_at "
            f"{_DEAD_FROM} WHERE d.handler = ? AND o.purged_at IS NULL ORDER BY d.id DESC LIMIT ?",
            (handler, limit)))

    def queued_pairs(self, destination: str, since: float, limit: int) -> list[tuple[str, str]]:
        """(SOP class, transfer syntax) queued for, dead at, or sent to a destination
        since a time, most frequent first."""
        return [(r[0], r[1]) for r in self.conn.execute(
            "SELECT o.sop_class_uid, o.transfer_syntax, COUNT(*) AS n FROM deliveries d "
            "JOIN objects o ON o.id = d.object_id WHERE d.destination = ? AND "
            f"(d.state IN ({','.join('?' * (len(ACTIVE_STATES) + 1))}) OR d.updated_at > ?) "
            "GROUP BY 1, 2 ORDER BY n DESC LIMIT ?",
            (destination, *ACTIVE_STATES, DEAD, since, limit))]

    # -- dead letters (one filter: DeadLetterFilter) ------------------------------------

    def dead_letters(self, which: DeadLetterFilter = DeadLetterFilter()) -> list[dict[str, Any]]:
        """Every matching dead letter, oldest first, with its object's routing fields."""
        where, params = which.where()
        return _dicts(self.conn.execute(f"SELECT {_DEAD_COLUMNS} {_DEAD_FROM} WHERE {where} "
                                        "ORDER BY d.id", params))

    def dead_letter_page(self, which: DeadLetterFilter, before_id: int | None,
                         limit: int) -> list[dict[str, Any]]:
        """One page, newest first; the next starts before the last id of this one."""
        where, params = which.where()
        if before_id is not None:
            where += " AND d.id < ?"
            params.append(before_id)
        return _dicts(self.conn.execute(
            f"SELECT {_DEAD_COLUMNS} {_DEAD_FROM} WHERE {where} ORDER BY d.id DESC LIMIT ?",
            params + [limit]))

    def dead_letter_count(self, which: DeadLetterFilter = DeadLetterFilter()) -> int:
        where, params = which.where()
        return self.conn.execute(f"SELECT COUNT(*) {_DEAD_FROM} WHERE {where}", params).fetchone()[0]

    def dead_letter_ids(self, which: DeadLetterFilter) -> list[int]:
        where, params = which.where()
        return [r[0] for r in self.conn.execute(f"SELECT d.id {_DEAD_FROM} WHERE {where} ORDER BY d.id",
                                                params)]

    def dead_letter_groups(self, which: DeadLetterFilter = DeadLetterFilter()) -> list[dict[str, Any]]:
        """Dead letters by cause: destination, status and reason, the largest first."""
        where, params = which.where()
        return _dicts(self.conn.execute(
            "SELECT d.destination, COALESCE(d.last_status, '') AS status, "
            "COALESCE(d.last_reason, '') AS reason, COUNT(*) AS count, MAX(d.updated_at) AS latest "
            f"{_DEAD_FROM} WHERE {where} GROUP BY 1, 2, 3 ORDER BY count DESC, latest DESC", params))

    # -- the object browser ------------------------------------------------------------------

    def objects_page(self, which: ObjectFilter, *, sort: str = "id", descending: bool = True,
                     offset: int = 0, limit: int = 200) -> list[dict[str, Any]]:
        """One page of objects with each destination's state (``deliveries``:
        "name=state ..."), newest first by default."""
        if sort not in OBJECT_SORTS:
            raise ValueError(f"objects cannot be sorted by {sort!r}")
        where, params = which.where()
        direction = "DESC" if descending else "ASC"
        return _dicts(self.conn.execute(
            f"SELECT {_OBJECT_COLUMNS} FROM objects o WHERE {where} "
            f"ORDER BY o.{sort} {direction}, o.id {direction} LIMIT ? OFFSET ?",
            params + [limit, offset]))

    def object_count(self, which: ObjectFilter | None = None) -> int:
        if which is None:
            return self.conn.execute("SELECT COUNT(*) FROM objects").fetchone()[0]
        where, params = which.where()
        return self.conn.execute(f"SELECT COUNT(*) FROM objects o WHERE {where}", params).fetchone()[0]

    def object_timeline(self, object_id: int) -> dict[str, Any] | None:
        """An object, its deliveries, and every audit row about it or them, in order."""
        row = self.conn.execute(f"SELECT {_OBJECT_COLUMNS} FROM objects o WHERE o.id = ?",
                                (object_id,)).fetchone()
        if row is None:
            return None
        deliveries = _dicts(self.conn.execute(
            "SELECT id, destination, handler, state, attempts, last_status, last_class, last_reason, "
            "handler_version, rule, coerced, created_at, updated_at FROM deliveries "
            "WHERE object_id = ? ORDER BY id",
            (object_id,)))
        ids = [d["id"] for d in deliveries]
        events = _dicts(self.conn.execute(
            "SELECT id, ts, event, listener, destination, delivery_id, calling_ae, peer, status, detail, "
            f"actor FROM audit WHERE object_id = ? OR delivery_id IN ({','.join('?' * len(ids))}) "
            "ORDER BY id", (object_id, *ids)))
        return {"object": dict(row), "deliveries": deliveries, "events": events}

    # -- audit ----------------------------------------------------------------------------

    def audit_page(self, which: AuditFilter, before_id: int | None, limit: int) -> list[dict[str, Any]]:
        """One page of the audit trail, newest first; the next starts before the last id."""
        where, params = which.where()
        if before_id is not None:
            where += " AND id < ?"
            params.append(before_id)
        return _dicts(self.conn.execute(
            "SELECT id, ts, event, listener, destination, object_id, delivery_id, sop_instance_uid, "
            f"calling_ae, peer, status, detail, actor FROM audit WHERE {where} ORDER BY id DESC LIMIT ?",
            params + [limit]))

    def audit_events(self) -> list[str]:
        """The event names the audit trail holds (for the audit screen's filter)."""
        return [r[0] for r in self.conn.execute("SELECT DISTINCT event FROM audit ORDER BY event")]

    def outcome_mix(self, destination: str, limit: int, scan: int) -> dict[str, Any]:
        """A destination's last ``limit`` delivery outcomes (among the last ``scan``
        audit rows): how many failed, and the most frequent failing status."""
        top = self.last_audit_id()
        rows = self.conn.execute(
            "SELECT event, status FROM audit WHERE id > ? AND destination = ? AND event IN "
            "('delivered', 'delivered_with_warning', 'filtered', 'dead_lettered', 'retry_scheduled') "
            "ORDER BY id DESC LIMIT ?", (top - scan, destination, limit)).fetchall()
        failed = [r["status"] or "" for r in rows if r["event"] in ("dead_lettered", "retry_scheduled")]
        common = max(set(failed), key=failed.count) if failed else None
        return {"outcomes": len(rows), "failed": len(failed), "dead": sum(r["event"] == "dead_lettered" for r in rows),
                "status": common}


    def audit_to_export(self, after_id: int, limit: int) -> list[dict[str, Any]]:
        """The next audit rows after ``after_id``, oldest first, with the study and SOP
        class of the object they concern (what an audit message names)."""
        return _dicts(self.conn.execute(
            "SELECT a.id, a.ts, a.event, a.listener, a.destination, a.object_id, a.delivery_id, "
            "a.sop_instance_uid, a.calling_ae, a.peer, a.status, a.detail, a.actor, "
            "o.study_uid, o.sop_class_uid, o.transfer_syntax FROM audit a LEFT JOIN objects o ON o.id = a.object_id "
            "WHERE a.id > ? ORDER BY a.id LIMIT ?", (after_id, limit)))

    def audit_export(self, name: str) -> dict[str, Any]:
        """An export's cursor and last error (last_id 0: nothing exported yet)."""
        row = self.conn.execute("SELECT name, last_id, exported, updated_at, last_error, failed_at "
                                "FROM audit_exports WHERE name = ?", (name,)).fetchone()
        return dict(row) if row is not None else {"name": name, "last_id": 0, "exported": 0,
                                                  "updated_at": None, "last_error": None,
                                                  "failed_at": None}

    def last_audit_id(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM audit").fetchone()[0]

    def audit_counts_since(self, after_id: int) -> list[dict[str, Any]]:
        """Audit rows after an id, counted by event, listener, destination, second and
        status, with the last id of each group: what the session counters tail."""
        return _dicts(self.conn.execute(
            "SELECT event, listener, destination, CAST(ts AS INTEGER) AS sec, status, COUNT(*) AS n, "
            "MAX(id) AS last FROM audit WHERE id > ? GROUP BY 1, 2, 3, 4, 5", (after_id,)))

    def events_since(self, events: tuple[str, ...], since: float) -> dict[str, int]:
        """Audit rows of these events since a time, counted per destination."""
        marks = ", ".join("?" * len(events))
        return {row[0]: row[1] for row in self.conn.execute(
            f"SELECT destination, COUNT(*) FROM audit WHERE ts >= ? AND event IN ({marks}) "
            "AND destination IS NOT NULL GROUP BY 1", (since, *events))}

    def last_event(self, events: tuple[str, ...]) -> dict[str, Any] | None:
        """The newest audit row of these events (routing-safe columns)."""
        marks = ", ".join("?" * len(events))
        row = self.conn.execute(f"SELECT id, ts, event, status FROM audit WHERE event IN ({marks}) "
                                "ORDER BY id DESC LIMIT 1", events).fetchone()
        return dict(row) if row is not None else None

    def latest_failure(self, destination: str, after_id: int) -> dict[str, Any] | None:
        """The newest failed delivery outcome of a destination after an audit id."""
        row = self.conn.execute(
            "SELECT status, detail FROM audit WHERE id > ? AND destination = ? AND event IN "
            "('dead_lettered', 'retry_scheduled') ORDER BY id DESC LIMIT 1",
            (after_id, destination)).fetchone()
        return dict(row) if row is not None else None

    def audit_totals(self, up_to_id: int) -> list[dict[str, Any]]:
        """Audit rows up to an id counted by event, listener and destination: the
        lifetime counters before the session's tail takes over."""
        return _dicts(self.conn.execute(
            "SELECT event, listener, destination, COUNT(*) AS n FROM audit WHERE id <= ? "
            "GROUP BY 1, 2, 3", (up_to_id,)))

    def recent_outcomes(self, up_to_id: int, scan: int, limit: int) -> list[dict[str, Any]]:
        """The latest delivery outcomes (newest first) among the ``scan`` audit rows up
        to an id: what a destination's health starts from."""
        return _dicts(self.conn.execute(
            "SELECT destination, event, status, detail, CAST(ts AS INTEGER) AS sec FROM audit "
            "WHERE id > ? AND id <= ? AND event IN ('delivered', 'delivered_with_warning', 'filtered', "
            "'dead_lettered', 'retry_scheduled') ORDER BY id DESC LIMIT ?",
            (up_to_id - scan, up_to_id, limit)))

    def last_outcomes(self, destination: str, limit: int, scan: int) -> list[dict[str, Any]]:
        """A destination's latest outcomes among the last ``scan`` audit rows (a bound:
        a destination quiet for a long time shows none rather than costing a full scan)."""
        top = self.last_audit_id()
        return _dicts(self.conn.execute(
            "SELECT ts, event, status, detail, delivery_id FROM audit WHERE id > ? AND "
            "destination = ? AND event NOT IN ('replayed', 'discarded') ORDER BY id DESC LIMIT ?",
            (top - scan, destination, limit)))

    def recent_errors(self, limit: int) -> list[dict[str, Any]]:
        return _dicts(self.conn.execute(
            "SELECT ts, event, listener, destination, calling_ae, peer, status, detail FROM audit "
            f"WHERE event IN ({','.join('?' * len(ERROR_EVENTS))}) ORDER BY id DESC LIMIT ?",
            (*ERROR_EVENTS, limit)))

    def delivery_history(self, delivery_id: int) -> list[dict[str, Any]]:
        return _dicts(self.conn.execute(
            "SELECT ts, event, destination, status, detail FROM audit WHERE delivery_id = ? "
            "ORDER BY id", (delivery_id,)))


    # -- the routing plan (mfconsole/engine/plan.py) ---------------------------------------

    _PLAN_COLUMNS = ("id", "received_at", "listener", "calling_ae", "peer", "modality",
                     "sop_class_uid", "sop_instance_uid", "study_uid", "series_uid",
                     "transfer_syntax", "size")

    def plan_count(self, since: float) -> int:
        """Objects a routing plan looks at: the latest version of each SOP instance,
        received at or after ``since``, still stored."""
        return self.conn.execute(
            "SELECT COUNT(*) FROM objects WHERE purged_at IS NULL AND superseded = 0 "
            "AND received_at >= ?", (since,)).fetchone()[0]

    def plan_page(self, since: float, after: tuple[float, int] | None, limit: int
                  ) -> list[dict[str, Any]]:
        """One page of those objects, newest first; the next page starts after the
        (received_at, id) of this one's last row. Routing-safe columns only, and
        ``called_ae`` ("" for objects stored before schema v8 recorded it)."""
        columns = list(self._PLAN_COLUMNS)
        if "called_ae" in self.columns("objects"):    # a database not yet at schema v8
            columns.append("called_ae")
        sql = (f"SELECT {', '.join(columns)} FROM objects WHERE purged_at IS NULL AND "
               "superseded = 0 AND received_at >= ?")
        params: list[Any] = [since]
        if after is not None:
            sql += " AND (received_at < ? OR (received_at = ? AND id < ?))"
            params += [after[0], after[0], after[1]]
        rows = _dicts(self.conn.execute(sql + " ORDER BY received_at DESC, id DESC LIMIT ?",
                                        params + [limit]))
        for row in rows:
            row.setdefault("called_ae", "")
        return rows

    def routing_received(self, object_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """What routing gave each object when it was received: the deliveries made in
        its ingest transaction (created with it: a replay's come later), and the words
        and events of its routing audit rows. {id: {"routes": [(destination, handler, rule)],
        "stored": detail or None, "discarded": rule or None, "unrouted": bool}}."""
        ids = [int(i) for i in object_ids]
        out: dict[int, dict[str, Any]] = {
            i: {"routes": [], "stored": None, "discarded": None, "unrouted": False} for i in ids}
        rule = "d.rule" if "rule" in self.columns("deliveries") else "NULL"     # schema v8 on
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self.conn.execute(
                    f"SELECT d.object_id, d.destination, d.handler, {rule} FROM deliveries d JOIN "
                    f"objects o ON o.id = d.object_id WHERE d.object_id IN ({marks}) "
                    "AND d.created_at = o.received_at ORDER BY d.id", chunk):
                out[r[0]]["routes"].append((r[1], r[2], r[3]))
            for r in self.conn.execute(
                    "SELECT object_id, event, status, detail FROM audit WHERE object_id IN "
                    f"({marks}) AND event IN ('stored', 'discarded_by_rule', 'unrouted') "
                    "ORDER BY id", chunk):
                entry = out[r[0]]
                if r[1] == "stored":
                    entry["stored"] = r[3]
                elif r[1] == "discarded_by_rule":
                    entry["discarded"] = r[2]
                else:
                    entry["unrouted"] = True
        return out

    # -- metrics (mfconsole/metrics_export.py): tailed by id, so each round reads only
    # what was added since the previous one --------------------------------------------

    def audit_tally(self, events: tuple[str, ...], after_id: int) -> list[dict[str, Any]]:
        """Audit rows of these events after an id, counted by event, listener,
        destination and status, with the last id of each group."""
        marks = ", ".join("?" * len(events))
        return _dicts(self.conn.execute(
            "SELECT event, listener, destination, status, COUNT(*) AS n, MAX(id) AS last FROM audit "
            f"WHERE id > ? AND event IN ({marks}) GROUP BY 1, 2, 3, 4", (after_id, *events)))

    def object_sizes_since(self, after_id: int) -> list[dict[str, Any]]:
        """Objects stored after an id (purged ones too: the row stays), their bytes as
        received summed per listener, with the last id of each."""
        return _dicts(self.conn.execute(
            "SELECT listener, COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes, MAX(id) AS last "
            "FROM objects WHERE id > ? GROUP BY 1", (after_id,)))

    def stored_totals(self) -> tuple[int, int]:
        """(objects, bytes as received) the store holds now (not purged)."""
        row = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM objects "
                                "WHERE purged_at IS NULL").fetchone()
        return row[0], row[1]

    # -- inspection: whole rows, for tests and diagnostics ---------------------------------

    def columns(self, table: str) -> set[str]:
        """The column names of a table (empty if there is no such table)."""
        return {r[1] for r in self.conn.execute("SELECT * FROM pragma_table_info(?)", (table,))}

    def indexes(self, table: str) -> set[str]:
        """The index names of a table."""
        return {r[1] for r in self.conn.execute("SELECT * FROM pragma_index_list(?)", (table,))}

    def table_exists(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None

    def unpurged_scan_plan(self) -> str:
        """How SQLite plans the retention purge's walk over unpurged objects (the
        details of EXPLAIN QUERY PLAN, joined): whether it goes by objects_unpurged."""
        return " ".join(r[3] for r in self.conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM objects INDEXED BY objects_unpurged "
            "WHERE purged_at IS NULL AND received_at < 1 ORDER BY received_at, id LIMIT 5"))

    TABLES = ("objects", "deliveries", "audit", "destination_state", "meta", "blob_data", "study_holds",
              "audit_exports")

    def rows(self, table: str, *, order_by: str | None = None, **equals: Any) -> list[dict[str, Any]]:
        """Every row of a table whose columns equal ``equals`` (None matches NULL), in
        ``order_by`` order (default: the table's key). Names are checked against the
        schema, never pasted from a caller."""
        if table not in self.TABLES:
            raise ValueError(f"no table {table!r}")
        columns = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
        order_by = order_by or {"destination_state": "name", "meta": "key", "blob_data": "object_id",
                                "study_holds": "release_at", "audit_exports": "name"}.get(table, "id")
        for name in [*equals, order_by.removesuffix(" DESC")]:
            if name not in columns:
                raise ValueError(f"no column {name!r} in {table}")
        where = " AND ".join(f"{k} IS ?" for k in equals) or "1"
        return _dicts(self.conn.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY {order_by}",
                                        tuple(equals.values())))


@contextmanager
def reading(path: Path) -> Iterator[Reads]:
    """A read-only connection for the length of a block (works beside a running engine)."""
    conn = connect(path, readonly=True)
    try:
        yield Reads(conn)
    finally:
        conn.close()


def objects_table_exists(path: Path) -> bool:
    """Whether ``path`` is a database that has its objects table (not before the first start)."""
    if not path.exists():
        return False
    with reading(path) as reads:
        return reads.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'objects'").fetchone() is not None
