"""Every write, behind typed methods of ``Tx``: one transaction of the one writer.

The engine's store runs each write on its writer thread inside a group transaction
(``Store.call(fn, *args)`` hands ``fn`` a ``Tx``); an operator command against a data
directory whose engine is stopped gets a ``Tx`` from ``writing`` (one transaction on
its own connection). Nothing else writes to the database. Callers decide what to
write (delivery outcomes, replays); these methods only say how it is stored.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from mfconsole.repository.reads import Reads
from mfconsole.repository.schema import SchemaError, connect, migrate
from mfconsole.repository.states import DELIVERED, FINISHED_STATES, HELD, IN_FLIGHT, INLINE, PENDING

AUDIT_COLUMNS = ("ts", "event", "listener", "destination", "object_id", "delivery_id",
                 "sop_instance_uid", "calling_ae", "peer", "status", "detail", "actor")


class Tx(Reads):
    """Writes (and the reads they need) inside the caller's transaction."""

    def isolated(self, fn: Any, *args: Any) -> Any:
        """``fn(self, *args)`` in a savepoint: if it raises, its writes are undone and
        the exception goes on, while the rest of the transaction stands (one bad call
        must not fail the writer's whole group)."""
        self.conn.execute("SAVEPOINT call")
        try:
            result = fn(self, *args)
        except BaseException:
            self.conn.execute("ROLLBACK TO call")
            self.conn.execute("RELEASE call")
            raise
        self.conn.execute("RELEASE call")
        return result

    # -- audit and meta ---------------------------------------------------------------

    def audit(self, event: str, **fields: Any) -> None:
        """One audit row: routing-safe fields only (see mfconsole.engine.store.Store.audit)."""
        fields.setdefault("ts", time.time())
        fields["event"] = event
        self.conn.execute(f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)}) "
                          f"VALUES ({', '.join('?' * len(AUDIT_COLUMNS))})",
                          tuple(fields.get(c) for c in AUDIT_COLUMNS))

    def audit_exported(self, name: str, last_id: int, messages: int, now: float) -> None:
        """An export's receiver has read everything up to audit row ``last_id``: the
        cursor moves there (never back), and the last error is cleared."""
        self.conn.execute(
            "INSERT INTO audit_exports (name, last_id, exported, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET last_id = MAX(last_id, excluded.last_id), "
            "exported = exported + excluded.exported, updated_at = excluded.updated_at, "
            "last_error = NULL, failed_at = NULL", (name, last_id, messages, now))

    def audit_export_failed(self, name: str, why: str, now: float) -> None:
        """An export attempt failed (the cursor stays): why, in routing-safe words."""
        self.conn.execute(
            "INSERT INTO audit_exports (name, last_error, failed_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET last_error = excluded.last_error, "
            "failed_at = excluded.failed_at", (name, why, now))

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- objects ---------------------------------------------------------------------------

    def insert_object(self, fields: dict[str, Any], sealed: bytes | None) -> int:
        """A new object version (``fields`` names objects columns); ``sealed`` its bytes
        when held in the database (blob INLINE)."""
        cols = tuple(fields)
        cur = self.conn.execute(f"INSERT INTO objects ({', '.join(cols)}) "
                                f"VALUES ({', '.join('?' * len(cols))})", tuple(fields.values()))
        object_id = cur.lastrowid
        if fields["blob"] == INLINE:
            self.conn.execute("INSERT INTO blob_data (object_id, sealed) VALUES (?, ?)",
                              (object_id, sealed))
        return object_id

    def supersede_others(self, sop_instance_uid: str, current_id: int) -> None:
        self.conn.execute("UPDATE objects SET superseded = 1 WHERE sop_instance_uid = ? AND id != ?",
                          (sop_instance_uid, current_id))

    def purge_batch(self, cutoff: float, after: tuple[float, int], limit: int,
                    stamp: float) -> tuple[list[str], tuple[float, int] | None]:
        """The next ``limit`` unpurged objects received before ``cutoff``, after the
        cursor (received_at, id): those whose deliveries are all finished lose their
        blob (rows stay, marked purged). Returns (blob files to remove, next cursor or
        None at the end; INLINE for objects held in the database). Finished or not, each batch costs the same however many kept
        objects (dead letters) lie before it. A delivery awaiting Storage Commitment
        is not finished: its object may have to be sent again."""
        rows = self.conn.execute(
            "SELECT o.id, o.blob, o.received_at, NOT EXISTS (SELECT 1 FROM deliveries d "
            "WHERE d.object_id = o.id "
            f"AND (d.state NOT IN ({','.join('?' * len(FINISHED_STATES))}) "
            # delivered, custody not yet confirmed (Storage Commitment): kept
            "OR d.commit_state IS NOT NULL)) AS finished "
            "FROM objects o INDEXED BY objects_unpurged "
            "WHERE o.purged_at IS NULL AND o.received_at < ? AND (o.received_at, o.id) > (?, ?) "
            "ORDER BY o.received_at, o.id LIMIT ?",
            (*FINISHED_STATES, cutoff, *after, limit)).fetchall()
        if not rows:
            return [], None
        done = [r for r in rows if r["finished"]]
        self.conn.executemany("UPDATE objects SET purged_at = ? WHERE id = ?",
                              [(stamp, r["id"]) for r in done])
        self.conn.executemany("DELETE FROM blob_data WHERE object_id = ?", [(r["id"],) for r in done])
        return [r["blob"] for r in done], (rows[-1]["received_at"], rows[-1]["id"])

    def reseal(self, object_id: int, old_blob: str, old_key_id: str, blob: str, key_id: str,
               digest: str, sealed: bytes | None) -> bool:
        """Point an object at its re-sealed bytes, only if it still points at the ones
        that were read (a concurrent purge or second rekey wins); whether it did."""
        cur = self.conn.execute(
            "UPDATE objects SET blob = ?, key_id = ?, digest = ? WHERE id = ? AND blob = ? "
            "AND key_id = ? AND purged_at IS NULL", (blob, key_id, digest, object_id, old_blob, old_key_id))
        if cur.rowcount and blob == INLINE:
            self.conn.execute("UPDATE blob_data SET sealed = ? WHERE object_id = ?", (sealed, object_id))
        return bool(cur.rowcount)

    # -- deliveries ---------------------------------------------------------------------------

    def add_deliveries(self, object_id: int, listener: str | None,
                       targets: Iterable[tuple[Any, ...]], now: float) -> list[int]:
        """New pending deliveries of an object: (destination, handler) each, or
        (destination, handler, rule) for one a rule made, or (destination, handler,
        rule, priority) (1: urgent, claimed first; else 0, normal), or (…, priority,
        state) for one made in another state (HELD: waiting for its study)."""
        ids = []
        for destination, handler, *more in targets:
            rule = more[0] if more else None
            priority = more[1] if len(more) > 1 else 0
            state = more[2] if len(more) > 2 else PENDING
            cur = self.conn.execute(
                "INSERT INTO deliveries (object_id, destination, listener, handler, rule, state, "
                "attempts, retry_at, created_at, updated_at, priority) VALUES (?,?,?,?,?,?,0,?,?,?,?)",
                (object_id, destination, listener, handler, rule, state, now, now, now, priority))
            ids.append(cur.lastrowid)
        return ids

    def lease(self, delivery_ids: Sequence[int], until: float, now: float) -> None:
        if delivery_ids:
            self.conn.execute("UPDATE deliveries SET state = ?, lease_until = ?, updated_at = ? "
                              f"WHERE id IN ({', '.join('?' * len(delivery_ids))})",
                              (IN_FLIGHT, until, now, *delivery_ids))

    def unlease(self, delivery_ids: Iterable[int], now: float, *, due: bool) -> int:
        """In-flight deliveries back to pending, untouched (no attempt counted); with
        ``due`` also due now. Rows no longer in flight are left alone."""
        cur = self.conn.executemany(
            "UPDATE deliveries SET state = ?, lease_until = NULL, "
            + ("retry_at = ?, " if due else "") + "updated_at = ? WHERE id = ? AND state = ?",
            [((PENDING, now, now, i, IN_FLIGHT) if due else (PENDING, now, i, IN_FLIGHT))
             for i in delivery_ids])
        return cur.rowcount

    def requeue_all_in_flight(self, now: float) -> int:
        """After a crash: every lease has lapsed (the data directory lock says no other
        process holds one)."""
        return self.conn.execute("UPDATE deliveries SET state = ?, lease_until = NULL, updated_at = ? "
                                 "WHERE state = ?", (PENDING, now, IN_FLIGHT)).rowcount

    def set_outcome(self, delivery_id: int, *, state: str, attempts: int, retry_at: float,
                    status: str, label: str, reason: str, now: float) -> None:
        self.conn.execute(
            "UPDATE deliveries SET state = ?, attempts = ?, retry_at = ?, lease_until = NULL, "
            "last_status = ?, last_class = ?, last_reason = ?, updated_at = ? WHERE id = ?",
            (state, attempts, retry_at, status, label, reason, now, delivery_id))

    def delivered(self, destination: str, delivery_ids: Sequence[int], *, event: str,
                  status: str, label: str, reason: str, now: float) -> None:
        """In-flight deliveries of ``destination`` that were delivered with one answer:
        each counts the attempt, leaves flight, and gets its audit row (in the order
        given, detail "attempt N: label: reason", and "; coerced: …" with what coercion
        changed, see ``set_coerced``), in two statements for them all."""
        marks = ", ".join("?" * len(delivery_ids))
        self.conn.execute(
            "UPDATE deliveries SET state = ?, attempts = attempts + 1, retry_at = ?, "
            "lease_until = NULL, last_status = ?, last_class = ?, last_reason = ?, updated_at = ? "
            f"WHERE id IN ({marks})", (DELIVERED, now, status, label, reason, now, *delivery_ids))
        self.conn.execute(
            f"WITH run(pos, id) AS (VALUES {', '.join('(?, ?)' for _ in delivery_ids)}) "
            "INSERT INTO audit (ts, event, listener, destination, object_id, delivery_id, "
            "sop_instance_uid, status, detail) "
            "SELECT ?, ?, d.listener, ?, d.object_id, d.id, o.sop_instance_uid, ?, "
            "'attempt ' || d.attempts || ': ' || ? || COALESCE('; coerced: ' || "
            "CASE d.coerced WHEN '' THEN 'nothing changed' ELSE d.coerced END, '') "
            "FROM run JOIN deliveries d ON d.id = run.id JOIN objects o ON o.id = d.object_id "
            "ORDER BY run.pos",
            (*(v for pair in enumerate(delivery_ids) for v in pair), now, event, destination,
             status, f"{label}: {reason}"))

    def set_coerced(self, delivery_id: int, changes: str | None) -> None:
        """What coercion changed on the copy this attempt sent: attributes and operations
        ("PatientID prefix, IssuerOfPatientID set"), never values; "" when it changed
        nothing, NULL when no coercion applies."""
        self.conn.execute("UPDATE deliveries SET coerced = ? WHERE id = ?", (changes, delivery_id))

    def set_handler_version(self, delivery_id: int, version: str, digest: str) -> None:
        self.conn.execute("UPDATE deliveries SET handler_version = ?, handler_digest = ? WHERE id = ?",
                          (version, digest, delivery_id))

    def set_state(self, delivery_id: int, state: str, now: float) -> None:
        self.conn.execute("UPDATE deliveries SET state = ?, updated_at = ? WHERE id = ?",
                          (state, now, delivery_id))

    def requeue(self, delivery_id: int, now: float) -> None:
        """A dead letter queued again as new: due now, its attempts, cut-short transfers
        and what coercion changed forgotten."""
        self.conn.execute("UPDATE deliveries SET state = ?, retry_at = ?, attempts = 0, suspect = 0, "
                          "coerced = NULL, updated_at = ? WHERE id = ?", (PENDING, now, now, delivery_id))

    def make_due(self, destination: str, now: float) -> None:
        """A destination's queued deliveries due now rather than at their backed-off time."""
        self.conn.execute("UPDATE deliveries SET retry_at = ? WHERE destination = ? AND state = ?",
                          (now, destination, PENDING))

    def mark_suspect(self, destination: str, delivery_id: int) -> None:
        """A transfer of this delivery was cut short (see engine.outbox.attribute)."""
        self.conn.execute("UPDATE deliveries SET suspect = suspect + 1 WHERE id = ?", (delivery_id,))
        self.conn.execute("UPDATE destination_state SET suspect_delivery = ?, delivered_since_suspect = 0 "
                          "WHERE name = ?", (delivery_id, destination))

    # -- study holds (engine/holds.py) ---------------------------------------------------

    def hold_study(self, destination: str, study_uid: str, now: float, stable_after_s: float,
                   update: bool) -> bool:
        """One new instance of a study for a study-stable destination, in one upsert:
        a new hold (release in ``stable_after_s``), or the hold under way pushed back;
        a study released before is held again only with ``update`` (its late group).
        Whether the instance's delivery is held (else it goes alone, pending)."""
        row = self.conn.execute(
            "INSERT INTO study_holds (destination, study_uid, first_at, last_at, release_at, "
            "objects, updating) VALUES (?, ?, ?, ?, ?, 1, 0) "
            "ON CONFLICT (destination, study_uid) DO UPDATE SET last_at = excluded.last_at, "
            "first_at = CASE WHEN release_at IS NULL AND ?6 THEN excluded.first_at ELSE first_at END, "
            "objects = CASE WHEN release_at IS NOT NULL THEN objects + 1 WHEN ?6 THEN 1 "
            "ELSE objects END, "
            "updating = CASE WHEN release_at IS NOT NULL THEN updating WHEN ?6 THEN 1 ELSE 0 END, "
            "release_at = CASE WHEN release_at IS NOT NULL OR ?6 THEN excluded.release_at END "
            "RETURNING release_at",
            (destination, study_uid, now, now, now + stable_after_s, int(update))).fetchone()
        return row[0] is not None

    def release_study(self, destination: str, study_uid: str, now: float, retry_at: float) -> int:
        """A study's held deliveries to a destination become pending (due at ``retry_at``)
        and its hold ends (``released_at`` now); how many were released."""
        n = self.conn.execute(
            "UPDATE deliveries SET state = ?, retry_at = ?, updated_at = ? "
            "WHERE destination = ? AND state = ? AND object_id IN "
            "(SELECT id FROM objects WHERE study_uid = ?)",
            (PENDING, retry_at, now, destination, HELD, study_uid)).rowcount
        self.conn.execute("UPDATE study_holds SET release_at = NULL, released_at = ?, objects = 0, "
                          "updating = 0 WHERE destination = ? AND study_uid = ?",
                          (now, destination, study_uid))
        return n

    def release_stray_held(self, destination: str, now: float) -> int:
        """Held deliveries of a destination that no hold row covers (a hold row
        removed by hand, a study UID changed): pending, so nothing stays held forever."""
        return self.conn.execute(
            "UPDATE deliveries SET state = ?, retry_at = ?, updated_at = ? "
            "WHERE destination = ? AND state = ?", (PENDING, now, now, destination, HELD)).rowcount

    def forget_released_holds(self, before: float) -> int:
        """Hold rows of studies released before ``before`` and not held since (the
        retention: a later instance is then a new study for the policy)."""
        return self.conn.execute("DELETE FROM study_holds WHERE release_at IS NULL AND "
                                 "released_at < ?", (before,)).rowcount

    # -- destination state --------------------------------------------------------------------

    def ensure_destination(self, name: str, now: float) -> None:
        self.conn.execute("INSERT OR IGNORE INTO destination_state (name, updated_at) VALUES (?, ?)",
                          (name, now))

    def destination_delivered(self, name: str, status: str, reason: str, now: float) -> None:
        self.conn.execute("UPDATE destination_state SET failures = 0, down = 0, next_attempt_at = 0, "
                          "last_status = ?, last_reason = ?, delivered_since_suspect = 1, updated_at = ? "
                          "WHERE name = ?", (status, reason, now, name))

    def destination_failed(self, name: str, *, failures: int, down: bool, next_attempt_at: float,
                           status: str, reason: str, now: float) -> None:
        self.conn.execute("UPDATE destination_state SET failures = ?, down = ?, next_attempt_at = ?, "
                          "last_status = ?, last_reason = ?, updated_at = ? WHERE name = ?",
                          (failures, int(down), next_attempt_at, status, reason, now, name))

    def pause_destination(self, name: str, reason: str, now: float, status: str | None = None) -> None:
        """Paused, and why; ``status`` the answer that made the engine pause it (None for
        an operator's pause: an earlier delivery's status would read as its cause)."""
        self.conn.execute("UPDATE destination_state SET paused = 1, pause_reason = ?, last_status = ?, "
                          "updated_at = ? WHERE name = ?", (reason, status, now, name))

    def resume_destination(self, name: str, now: float) -> None:
        self.conn.execute("UPDATE destination_state SET paused = 0, pause_reason = NULL, down = 0, "
                          "failures = 0, next_attempt_at = 0, updated_at = ? WHERE name = ?", (now, name))


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[Tx]:
    """One write transaction (taken at once: BEGIN IMMEDIATE), committed at the end of
    the block, rolled back if it raises. With synchronous=FULL the commit is on disk
    when the block ends."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield Tx(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _tx(conn: sqlite3.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
    with transaction(conn) as tx:
        return fn(tx, *args, **kwargs)


@contextmanager
def writing(path: Path) -> Iterator[Any]:
    """For a command that writes while no engine runs: ``run(fn, *args)`` calls
    ``fn(tx, *args)`` in one transaction, as the engine's writer would. The schema is
    brought up to date first (a data directory no engine of this version opened yet)."""
    conn = connect(path)
    try:
        migrate(conn)
        yield lambda fn, *args, **kwargs: _tx(conn, fn, *args, **kwargs)
    finally:
        conn.close()


__all__ = ["Tx", "transaction", "writing", "SchemaError", "AUDIT_COLUMNS"]
