"""The database file, its connections and its schema, versioned by ordered migrations.

``meta.schema_version`` says which migrations a database has had. Opening it for
writing (the engine's store, or an operator command while no engine runs) applies the
missing ones in order, each in its own transaction with the version bump, so a crash
between two leaves a database at a known version. A database written by a newer
mfconsole (a version above the last one here) is refused, never guessed at.

Migrations 2 to 6 were once applied ad hoc by a version that still wrote
``schema_version = 1``: each of them checks what exists before it adds it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

DB_NAME = "mfconsole.db"


class SchemaError(Exception):
    """The database cannot be used by this version (the message says why and what to do)."""


def db_path(data_dir: Path) -> Path:
    return data_dir / DB_NAME


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the settings every connection must have."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30,
                               check_same_thread=False, isolation_level=None)
    else:
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
    # FULL on every connection: a commit is on disk (WAL fsynced) when it returns.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def _add_column(conn: sqlite3.Connection, table: str, column: str, decl: str) -> None:
    if column not in _columns(conn, table):
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


def _v1_tables(conn: sqlite3.Connection) -> None:
    """Objects, their deliveries, the audit trail, small sealed objects, destination
    state and meta: the schema as first released."""
    # One statement at a time: executescript would commit the migration's transaction.
    for statement in """
        CREATE TABLE IF NOT EXISTS objects (
            id INTEGER PRIMARY KEY, sop_instance_uid TEXT NOT NULL, version INTEGER NOT NULL,
            sop_class_uid TEXT, study_uid TEXT, series_uid TEXT, modality TEXT,
            transfer_syntax TEXT, size INTEGER, digest TEXT NOT NULL, blob TEXT NOT NULL,
            key_id TEXT, listener TEXT, calling_ae TEXT, peer TEXT, received_at FLOAT,
            superseded INTEGER DEFAULT 0, purged_at FLOAT);
        CREATE UNIQUE INDEX IF NOT EXISTS idx_objects_sop_instance_uid_version
            ON objects (sop_instance_uid, version);
        CREATE INDEX IF NOT EXISTS idx_objects_received_at ON objects (received_at);
        CREATE TABLE IF NOT EXISTS deliveries (
            id INTEGER PRIMARY KEY, object_id INTEGER NOT NULL REFERENCES objects(id),
            destination TEXT NOT NULL, listener TEXT, handler TEXT, state TEXT NOT NULL,
            attempts INTEGER DEFAULT 0, retry_at FLOAT, lease_until FLOAT, last_status TEXT,
            last_class TEXT, last_reason TEXT, handler_version TEXT, created_at FLOAT,
            updated_at FLOAT);
        CREATE INDEX IF NOT EXISTS idx_deliveries_destination_state_retry_at
            ON deliveries (destination, state, retry_at);
        CREATE INDEX IF NOT EXISTS idx_deliveries_object_id ON deliveries (object_id);
        CREATE INDEX IF NOT EXISTS idx_deliveries_state ON deliveries (state);
        CREATE TABLE IF NOT EXISTS audit (
            id INTEGER PRIMARY KEY, ts FLOAT, event TEXT, listener TEXT, destination TEXT,
            object_id INTEGER, delivery_id INTEGER, sop_instance_uid TEXT, calling_ae TEXT,
            peer TEXT, status TEXT, detail TEXT);
        CREATE INDEX IF NOT EXISTS idx_audit_ts ON audit (ts);
        CREATE INDEX IF NOT EXISTS idx_audit_event ON audit (event);
        CREATE TABLE IF NOT EXISTS blob_data (
            object_id INTEGER PRIMARY KEY REFERENCES objects(id), sealed BLOB NOT NULL);
        CREATE TABLE IF NOT EXISTS destination_state (
            name TEXT PRIMARY KEY, paused INTEGER NOT NULL DEFAULT 0, pause_reason TEXT,
            down INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL DEFAULT 0, last_status TEXT, last_reason TEXT,
            updated_at REAL);
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
    """.split(";"):
        if statement.strip():
            conn.execute(statement)


def _v2_handler_digest(conn: sqlite3.Connection) -> None:
    """Which handler file (by digest) produced what a delivery sent."""
    _add_column(conn, "deliveries", "handler_digest", "TEXT")


def _v3_suspect(conn: sqlite3.Connection) -> None:
    """Transfers of a delivery that were cut short (abort, drop, no answer): the
    delivery queue sends suspects last and never lets one probe a down peer."""
    _add_column(conn, "deliveries", "suspect", "INTEGER NOT NULL DEFAULT 0")


def _v4_actor(conn: sqlite3.Connection) -> None:
    """Who did an operator action (uid and login name)."""
    _add_column(conn, "audit", "actor", "TEXT")


def _v5_destination_suspect(conn: sqlite3.Connection) -> None:
    """The delivery in flight at a destination's last cut-short transfer, and whether
    anything was delivered since: how a poison object is told from a bad peer."""
    _add_column(conn, "destination_state", "suspect_delivery", "INTEGER")
    _add_column(conn, "destination_state", "delivered_since_suspect", "INTEGER NOT NULL DEFAULT 0")


def _v6_unpurged_index(conn: sqlite3.Connection) -> None:
    """The retention purge walks only objects that still hold a blob; purged rows stay
    (audit trail) and would otherwise be rescanned at every batch."""
    conn.execute("CREATE INDEX IF NOT EXISTS objects_unpurged ON objects (received_at, id) "
                 "WHERE purged_at IS NULL")


def _v7_object_browser(conn: sqlite3.Connection) -> None:
    """What the object browser filters on: search tokens (keyed hashes of the
    accession number and patient ID: the values themselves stay in the sealed blob),
    the association an object came on, and indexes for calling AE and study."""
    _add_column(conn, "objects", "accession_token", "TEXT")
    _add_column(conn, "objects", "patient_token", "TEXT")
    _add_column(conn, "objects", "association", "TEXT")
    conn.execute("CREATE INDEX IF NOT EXISTS objects_accession ON objects (accession_token) "
                 "WHERE accession_token IS NOT NULL")
    conn.execute("CREATE INDEX IF NOT EXISTS objects_patient ON objects (patient_token) "
                 "WHERE patient_token IS NOT NULL")
    conn.execute("CREATE INDEX IF NOT EXISTS objects_association ON objects (association) "
                 "WHERE association IS NOT NULL")
    conn.execute("CREATE INDEX IF NOT EXISTS objects_calling_ae ON objects (calling_ae, id)")
    conn.execute("CREATE INDEX IF NOT EXISTS objects_study ON objects (study_uid)")
    conn.execute("CREATE INDEX IF NOT EXISTS audit_actor ON audit (actor) WHERE actor IS NOT NULL")
    conn.execute("CREATE INDEX IF NOT EXISTS audit_object ON audit (object_id) WHERE object_id IS NOT NULL")
    conn.execute("CREATE INDEX IF NOT EXISTS audit_delivery ON audit (delivery_id) "
                 "WHERE delivery_id IS NOT NULL")


def _v8_coercion(conn: sqlite3.Connection) -> None:
    """Which rule made a delivery (its coercion is looked up by that name at send time),
    what coercion changed on the copy sent (attributes and operations, never values),
    and the called AE title an object arrived for (a handler's Context)."""
    _add_column(conn, "deliveries", "rule", "TEXT")
    _add_column(conn, "deliveries", "coerced", "TEXT")
    _add_column(conn, "objects", "called_ae", "TEXT")


def _v9_priority(conn: sqlite3.Connection) -> None:
    """Urgent deliveries (a rule's priority = "urgent": 1, else 0) are claimed before a
    destination's other due ones. The due query is one index range per priority, in
    retry order (deliveries_due); it replaces (destination, state, retry_at), which
    every query that used it finds in the new index's first two columns."""
    _add_column(conn, "deliveries", "priority", "INTEGER NOT NULL DEFAULT 0")
    conn.execute("CREATE INDEX IF NOT EXISTS deliveries_due "
                 "ON deliveries (destination, state, priority, retry_at)")
    conn.execute("DROP INDEX IF EXISTS idx_deliveries_destination_state_retry_at")


def _v10_study_hold(conn: sqlite3.Connection) -> None:
    """Study-stable delivery: one row per (destination, study) held or once released.
    ``release_at`` is when the held deliveries of the study go out (wall clock, so a
    restart keeps the timer; NULL: nothing held now), pushed back by each new instance;
    ``released_at`` the last release (a late instance then follows the destination's
    late_instance policy); ``objects`` the deliveries of the hold under way; ``updating``
    1 when that hold is a late group of a study released before."""
    conn.execute("CREATE TABLE IF NOT EXISTS study_holds ("
                 "destination TEXT NOT NULL, study_uid TEXT NOT NULL, first_at REAL NOT NULL, "
                 "last_at REAL NOT NULL, release_at REAL, released_at REAL, "
                 "objects INTEGER NOT NULL DEFAULT 0, updating INTEGER NOT NULL DEFAULT 0, "
                 "PRIMARY KEY (destination, study_uid))")
    conn.execute("CREATE INDEX IF NOT EXISTS study_holds_release ON study_holds "
                 "(destination, release_at) WHERE release_at IS NOT NULL")


def _v11_commitment(conn: sqlite3.Connection) -> None:
    """Storage Commitment (PS3.4 Annex J) of dimse destinations: a delivered object's
    custody is confirmed by the PACS. ``commit_state`` marks a delivered delivery
    whose commitment is outstanding ('awaiting': to be requested; 'requested': under
    the transaction ``commit_txn``); the retention purge keeps its object. The
    transactions themselves, matched by Transaction UID when the report comes."""
    _add_column(conn, "deliveries", "commit_state", "TEXT")
    _add_column(conn, "deliveries", "commit_txn", "TEXT")
    _add_column(conn, "deliveries", "commit_requests", "INTEGER NOT NULL DEFAULT 0")
    _add_column(conn, "deliveries", "commit_resends", "INTEGER NOT NULL DEFAULT 0")
    conn.execute("CREATE INDEX IF NOT EXISTS deliveries_commit ON deliveries "
                 "(destination, commit_state) WHERE commit_state IS NOT NULL")
    conn.execute("CREATE INDEX IF NOT EXISTS deliveries_commit_txn ON deliveries (commit_txn) "
                 "WHERE commit_txn IS NOT NULL")
    conn.execute("CREATE TABLE IF NOT EXISTS commitments ("
                 "transaction_uid TEXT PRIMARY KEY, destination TEXT NOT NULL, "
                 "state TEXT NOT NULL, objects INTEGER NOT NULL, requested_at REAL NOT NULL, "
                 "deadline REAL NOT NULL, reported_at REAL, event_type INTEGER, via TEXT)")
    conn.execute("CREATE INDEX IF NOT EXISTS commitments_open ON commitments (destination, deadline) "
                 "WHERE state = 'requested'")


def _v12_audit_export(conn: sqlite3.Connection) -> None:
    """How far each export of the audit trail got (``name``: "arr" for [audit_export]):
    ``last_id`` the last audit row the receiver has read, advanced only after that;
    ``last_error`` why the last attempt failed (NULL once one succeeds)."""
    conn.execute("CREATE TABLE IF NOT EXISTS audit_exports ("
                 "name TEXT PRIMARY KEY, last_id INTEGER NOT NULL DEFAULT 0, "
                 "exported INTEGER NOT NULL DEFAULT 0, updated_at REAL, last_error TEXT, "
                 "failed_at REAL)")
def _v13_alerts(conn: sqlite3.Connection) -> None:
    """Alerts (mfconsole/engine/alerts.py): the conditions seen (a health problem key,
    since when, last seen, since when it is gone, whether its start was announced)
    and the outbox of messages, one row per message and channel, kept once sent
    (``sent_at``) so a restart announces nothing twice."""
    conn.execute("CREATE TABLE IF NOT EXISTS alert_conditions ("
                 "key TEXT PRIMARY KEY, severity INTEGER NOT NULL, text TEXT NOT NULL, "
                 "since REAL NOT NULL, last_seen REAL NOT NULL, absent_since REAL, "
                 "notified_started INTEGER NOT NULL DEFAULT 0)")
    conn.execute("CREATE TABLE IF NOT EXISTS alert_outbox ("
                 "id INTEGER PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL, "
                 "channel TEXT NOT NULL, subject TEXT NOT NULL, text TEXT NOT NULL, "
                 "created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
                 "next_attempt_at REAL NOT NULL, sent_at REAL, last_error TEXT)")
    conn.execute("CREATE INDEX IF NOT EXISTS alert_outbox_unsent ON alert_outbox (channel, id) "
                 "WHERE sent_at IS NULL")


# In order; a migration is never edited once released: a change is a new one.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _v1_tables, _v2_handler_digest, _v3_suspect, _v4_actor, _v5_destination_suspect,
    _v6_unpurged_index, _v7_object_browser, _v8_coercion, _v9_priority, _v10_study_hold,
    _v11_commitment, _v12_audit_export, _v13_alerts)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The version a database is at: 0 for a new (empty) one."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row is not None else 0


def migrate(conn: sqlite3.Connection) -> tuple[int, int]:
    """Bring a database opened for writing to SCHEMA_VERSION; (from, to)."""
    start = schema_version(conn)
    if start > SCHEMA_VERSION:
        raise SchemaError(
            f"the database is at schema version {start}, written by a newer mfconsole; this one "
            f"knows versions up to {SCHEMA_VERSION}: run the newer version (or restore the "
            "database from a backup made by this one)")
    for version in range(start + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version - 1](conn)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                         (str(version),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return start, SCHEMA_VERSION
