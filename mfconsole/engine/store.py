"""The durable store: SQLite (WAL, synchronous=FULL) rows + encrypted blobs.

One writer thread owns the write connection and group-commits: association threads
seal their object (encrypt, in parallel) and hand a request to the writer, then wait;
the writer takes everything queued, writes all rows in one transaction and commits
(one WAL fsync for the whole group). Success is only answered after that commit
returns.

Small objects (up to INLINE_MAX, the bulk of SRs and headers-only traffic) are sealed
in memory and stored in the `blob_data` table inside that same transaction, so the
WAL fsync is their only durability barrier. Larger ones are sealed to a file (fsynced
by the association thread) whose directory the writer fsyncs once per group before
committing; files are grouped by the hour they arrived, so a group usually shares one
directory. Blob files are named by a random id, never by a UID. A file that is
written but never committed (crash between the two) is an orphan and is moved to
quarantine/ at the next start (never deleted: it may be the only copy). The store knows nothing of the network.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import sqlite_utils

from mfconsole.engine.vault import Vault, fsync_dir

log = logging.getLogger("mfconsole.store")

SCHEMA_VERSION = 1
MAX_GROUP = 256
# Objects up to this size live in the database (see the module docstring); measured
# with bench/ingest.py: SQLite stores blobs of this size faster than the file system
# when every write must be durable.
INLINE_MAX = 256 * 1024
INLINE = "inline"           # objects.blob for an object held in blob_data
# Retention purge: objects per transaction, and the pause between two (bench/purge.py
# measures the C-STORE response time while purging).
PURGE_BATCH = 300
PURGE_PAUSE_S = 0.01

# Delivery states (DESIGN.md): pending → in_flight → delivered | filtered | dead; a dead
# letter is then replayed (back to pending, or "replayed" when re-targeted to a new
# delivery row) or discarded by an operator.
PENDING, IN_FLIGHT, DELIVERED, FILTERED, DEAD = "pending", "in_flight", "delivered", "filtered", "dead"
REPLAYED, DISCARDED = "replayed", "discarded"
ACTIVE_STATES = (PENDING, IN_FLIGHT)
FINISHED_STATES = (DELIVERED, FILTERED, REPLAYED, DISCARDED)


class StoreError(Exception):
    """The store could not commit; the sender must be told to retry (0xA700)."""


@dataclass(frozen=True)
class Route:
    destination: str
    handler: str | None = None


@dataclass
class IngestRequest:
    """What an association hands the writer. Routing-safe fields only."""
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str | None
    modality: str | None
    transfer_syntax: str
    listener: str
    calling_ae: str
    peer: str
    routes: tuple[Route, ...]
    blob: str = ""          # path relative to the blob root, or INLINE
    sealed: bytes | None = field(default=None, repr=False)   # the INLINE blob
    size: int = 0
    digest: str = ""
    key_id: str = ""
    digests: tuple[tuple[str, str], ...] = ()   # under every loaded key (vault.SealResult)
    association_id: str = ""


@dataclass(frozen=True)
class IngestResult:
    outcome: str            # stored | duplicate | new_version
    object_id: int
    version: int
    deliveries: int


@dataclass
class _Job:
    kind: str               # ingest | audit | call
    payload: Any
    future: Future | None = field(default=None)


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


def create_schema(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    db["objects"].create({
        "id": int, "sop_instance_uid": str, "version": int, "sop_class_uid": str,
        "study_uid": str, "series_uid": str, "modality": str, "transfer_syntax": str,
        "size": int, "digest": str, "blob": str, "key_id": str, "listener": str,
        "calling_ae": str, "peer": str, "received_at": float, "superseded": int,
        "purged_at": float,
    }, pk="id", not_null={"sop_instance_uid", "version", "digest", "blob"},
        defaults={"superseded": 0}, if_not_exists=True)
    db["objects"].create_index(["sop_instance_uid", "version"], unique=True, if_not_exists=True)
    db["objects"].create_index(["received_at"], if_not_exists=True)
    # The retention purge walks only objects that still hold a blob; purged rows stay
    # (audit trail) and would otherwise be rescanned at every batch.
    conn.execute("CREATE INDEX IF NOT EXISTS objects_unpurged ON objects (received_at, id) "
                 "WHERE purged_at IS NULL")
    db["deliveries"].create({
        "id": int, "object_id": int, "destination": str, "listener": str, "handler": str,
        "state": str, "attempts": int, "retry_at": float, "lease_until": float,
        "last_status": str, "last_class": str, "last_reason": str,
        "handler_version": str, "handler_digest": str, "created_at": float, "updated_at": float,
    }, pk="id", not_null={"object_id", "destination", "state"},
        defaults={"attempts": 0}, foreign_keys=[("object_id", "objects", "id")],
        if_not_exists=True)
    if "handler_digest" not in db["deliveries"].columns_dict:   # data dirs from before handlers
        db["deliveries"].add_column("handler_digest", str)
    if "suspect" not in db["deliveries"].columns_dict:
        # Transfers of this delivery that were cut short (abort, drop, no answer): see
        # outbox.record. Suspects go last in a batch and never probe a down peer.
        db["deliveries"].add_column("suspect", int, not_null_default=0)
    db["deliveries"].create_index(["destination", "state", "retry_at"], if_not_exists=True)
    db["deliveries"].create_index(["object_id"], if_not_exists=True)
    db["deliveries"].create_index(["state"], if_not_exists=True)
    db["audit"].create({
        "id": int, "ts": float, "event": str, "listener": str, "destination": str,
        "object_id": int, "delivery_id": int, "sop_instance_uid": str, "calling_ae": str,
        "peer": str, "status": str, "detail": str, "actor": str,
    }, pk="id", if_not_exists=True)
    if "actor" not in db["audit"].columns_dict:
        # Who did an operator action (mfconsole.actor): data dirs from before it.
        db["audit"].add_column("actor", str)
    db["audit"].create_index(["ts"], if_not_exists=True)
    db["audit"].create_index(["event"], if_not_exists=True)
    db["blob_data"].create({"object_id": int, "sealed": bytes}, pk="object_id",
                           not_null={"sealed"}, foreign_keys=[("object_id", "objects", "id")],
                           if_not_exists=True)
    conn.execute("""CREATE TABLE IF NOT EXISTS destination_state (
        name TEXT PRIMARY KEY, paused INTEGER NOT NULL DEFAULT 0, pause_reason TEXT,
        down INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0, last_status TEXT, last_reason TEXT,
        updated_at REAL)""")
    columns = {r[1] for r in conn.execute("PRAGMA table_info(destination_state)")}
    if "suspect_delivery" not in columns:
        # The delivery in flight at the last cut-short transfer, and whether anything
        # was delivered since: how outbox.record tells a poison object from a bad peer.
        conn.execute("ALTER TABLE destination_state ADD COLUMN suspect_delivery INTEGER")
        conn.execute("ALTER TABLE destination_state ADD COLUMN delivered_since_suspect "
                     "INTEGER NOT NULL DEFAULT 0")
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                 (str(SCHEMA_VERSION),))


class StoreRefused(Exception):
    """The store will not open as it is: the message says why and what to do."""


DB_NAME = "mfconsole.db"
QUARANTINE = "quarantine"


def has_blob_files(blob_root: Path) -> bool:
    return blob_root.is_dir() and any(p.is_file() for p in blob_root.rglob("*.blob"))


def sealed_key_ids(db_path: Path) -> dict[str, int]:
    """Key id -> number of objects whose blob it sealed (nothing when there is no
    database yet). Read before the store opens, to check the keys a start needs."""
    return dict(_objects_query(db_path, "SELECT key_id, COUNT(*) FROM objects "
                                        "WHERE purged_at IS NULL GROUP BY key_id"))


def has_stored_objects(db_path: Path) -> bool:
    """Whether the database has ever stored an object (purged ones too): not for a
    missing or new database, which beside blob files means the database was lost."""
    return bool(_objects_query(db_path, "SELECT 1 FROM objects LIMIT 1"))


def _objects_query(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` over the objects table of a database that may not exist yet."""
    if not db_path.exists():
        return []
    conn = connect(db_path, readonly=True)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'objects'").fetchone() is None:
            return []
        return [tuple(r) for r in conn.execute(sql)]
    finally:
        conn.close()


class Store:
    def __init__(self, data_dir: Path, vault: Vault, *, accept_empty_store: bool = False):
        self.data_dir = data_dir
        self.vault = vault
        self.db_path = data_dir / DB_NAME
        self.accept_empty_store = accept_empty_store
        self.blob_root = data_dir / "blobs"
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._local = threading.local()
        self.commits = 0          # group commits (for benchmarks and the console)
        self.committed_jobs = 0

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> dict[str, int]:
        """Create or open the database, recover from a crash, start the writer."""
        if not self.accept_empty_store and has_blob_files(self.blob_root) and not has_stored_objects(self.db_path):
            # A database that was lost or restored from before these blobs: opening it
            # would orphan every blob. Refuse rather than guess.
            raise StoreRefused(
                f"{self.blob_root} holds encrypted objects but {self.db_path} is missing or "
                "references none of them: restore the database from its backup (see README, "
                "Backup and restore), or start with --accept-empty-store to begin a new "
                f"database (the blobs are then moved to {self.data_dir / QUARANTINE}, never deleted)")
        self.blob_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.data_dir, 0o700)
        self._conn = connect(self.db_path)
        os.chmod(self.db_path, 0o600)
        create_schema(self._conn)
        recovered = self._recover()
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()
        return recovered

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        self._conn.close()

    def _recover(self) -> dict[str, int]:
        """After a crash: in-flight leases expire (we hold the data_dir lock, so no
        other process owns them), and blobs no committed row references are moved to
        quarantine/ (a crash between blob and commit leaves one; so does a database
        restored from before them: the engine never deletes what may be the only copy)."""
        now = time.time()
        with _transaction(self._conn):
            cur = self._conn.execute(
                "UPDATE deliveries SET state = ?, lease_until = NULL, updated_at = ? "
                "WHERE state = ?", (PENDING, now, IN_FLIGHT))
            requeued = cur.rowcount
        referenced = {row[0] for row in self._conn.execute(
            "SELECT blob FROM objects WHERE purged_at IS NULL")}
        orphans = 0
        folder = self.data_dir / QUARANTINE / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for path in sorted(self.blob_root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(self.blob_root).as_posix()
                if rel not in referenced:
                    target = folder / rel
                    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    os.rename(path, target)
                    orphans += 1
        if orphans:
            fsync_dir(folder)
            log.warning("%d blob(s) without a database row moved to %s (nothing deleted)",
                        orphans, folder)
        if requeued or orphans:
            self.audit("recovered", detail=f"requeued={requeued} quarantined_blobs={orphans}"
                                           + (f" in {folder.relative_to(self.data_dir)}" if orphans else ""))
        return {"requeued": requeued, "orphan_blobs": orphans}

    # -- ingest (called from association threads) -----------------------------

    def seal(self, data: memoryview | bytes, request: IngestRequest) -> None:
        """Encrypt ``data`` into the request: in memory when small, else a new file."""
        if len(data) <= INLINE_MAX:
            request.sealed, result = self.vault.seal_bytes(data)
            request.blob = INLINE
        else:
            name = uuid.uuid4().hex
            rel = f"{time.strftime('%Y%m%d%H', time.gmtime())}/{name}.blob"
            path = self.blob_root / rel
            path.parent.mkdir(exist_ok=True, mode=0o700)
            result = self.vault.seal_to_file(data, path)
            request.blob = rel
        request.size, request.digest, request.key_id = result.size, result.digest, result.key_id
        request.digests = result.digests

    def ingest(self, data: memoryview | bytes, request: IngestRequest) -> IngestResult:
        """Seal, then commit through the writer; returns only once committed."""
        self.seal(data, request)
        try:
            return self._submit("ingest", request)
        except BaseException:
            # The blob was never referenced; leave nothing behind.
            self._remove_file(request.blob)
            raise
        finally:
            request.sealed = None

    def _remove_file(self, rel: str) -> None:
        if rel and rel != INLINE:
            (self.blob_root / rel).unlink(missing_ok=True)

    def audit(self, event: str, **fields: Any) -> None:
        """Queue an audit row; it is committed with the next group (fire and forget)."""
        fields["event"] = event
        fields["ts"] = time.time()
        self._queue.put(_Job("audit", fields))

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(conn, *args)`` on the writer thread inside a transaction."""
        return self._submit("call", (fn, args))

    def _submit(self, kind: str, payload: Any) -> Any:
        if self._writer is None:
            raise StoreError("store is closed")
        future: Future = Future()
        self._queue.put(_Job(kind, payload, future))
        return future.result()

    # -- the writer --------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit_group(batch)
            if stop:
                return

    def _commit_group(self, batch: list[_Job]) -> None:
        conn = self._conn
        results: list[tuple[_Job, Any]] = []
        redundant: list[str] = []
        try:
            # New blob files are only durable once their directory entries are.
            dirs = {(self.blob_root / j.payload.blob).parent for j in batch
                    if j.kind == "ingest" and j.payload.blob != INLINE}
            for d in dirs:
                fsync_dir(d)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for job in batch:
                    if job.kind == "ingest":
                        result = self._insert(conn, job.payload)
                        if result.outcome == "duplicate":
                            redundant.append(job.payload.blob)
                        results.append((job, result))
                    elif job.kind == "audit":
                        _insert_audit(conn, job.payload)
                    else:
                        fn, args = job.payload
                        conn.execute("SAVEPOINT call")
                        try:
                            results.append((job, fn(conn, *args)))
                            conn.execute("RELEASE call")
                        except Exception as exc:  # one bad call must not fail the group
                            conn.execute("ROLLBACK TO call")
                            conn.execute("RELEASE call")
                            results.append((job, exc))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except Exception as exc:
            log.error("store commit failed (%s); %d request(s) answered with a failure",
                      exc.__class__.__name__, len(batch))
            for job in batch:
                if job.future is not None and not job.future.done():
                    job.future.set_exception(StoreError(f"commit failed: {exc.__class__.__name__}"))
            return
        self.commits += 1
        self.committed_jobs += len(batch)
        for rel in redundant:
            self._remove_file(rel)
        for job, result in results:
            if job.future is None:
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _insert(self, conn: sqlite3.Connection, req: IngestRequest) -> IngestResult:
        now = time.time()
        latest = conn.execute(
            "SELECT id, version, digest, key_id FROM objects WHERE sop_instance_uid = ? "
            "ORDER BY version DESC LIMIT 1", (req.sop_instance_uid,)).fetchone()
        # Digests are keyed: compare under the key the stored one was made with.
        if latest is not None and latest["digest"] == dict(req.digests).get(latest["key_id"], req.digest):
            _insert_audit(conn, {"ts": now, "event": "duplicate", "listener": req.listener,
                                 "object_id": latest["id"], "sop_instance_uid": req.sop_instance_uid,
                                 "calling_ae": req.calling_ae, "peer": req.peer,
                                 "detail": "same SOP Instance UID and bytes; nothing new routed"})
            return IngestResult("duplicate", latest["id"], latest["version"], 0)
        version = 1 if latest is None else latest["version"] + 1
        cur = conn.execute(
            "INSERT INTO objects (sop_instance_uid, version, sop_class_uid, study_uid, series_uid, "
            "modality, transfer_syntax, size, digest, blob, key_id, listener, calling_ae, peer, "
            "received_at, superseded) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0)",
            (req.sop_instance_uid, version, req.sop_class_uid, req.study_uid, req.series_uid,
             req.modality, req.transfer_syntax, req.size, req.digest, req.blob, req.key_id,
             req.listener, req.calling_ae, req.peer, now))
        object_id = cur.lastrowid
        if req.blob == INLINE:
            conn.execute("INSERT INTO blob_data (object_id, sealed) VALUES (?, ?)",
                         (object_id, req.sealed))
        outcome = "stored"
        if latest is not None:
            outcome = "new_version"
            conn.execute("UPDATE objects SET superseded = 1 WHERE sop_instance_uid = ? AND id != ?",
                         (req.sop_instance_uid, object_id))
            _insert_audit(conn, {"ts": now, "event": "conflict", "listener": req.listener,
                                 "object_id": object_id, "sop_instance_uid": req.sop_instance_uid,
                                 "calling_ae": req.calling_ae, "peer": req.peer,
                                 "detail": f"same SOP Instance UID, different bytes: stored as "
                                           f"version {version} (previous object {latest['id']})"})
        conn.executemany(
            "INSERT INTO deliveries (object_id, destination, listener, handler, state, attempts, "
            "retry_at, created_at, updated_at) VALUES (?,?,?,?,?,0,?,?,?)",
            [(object_id, r.destination, req.listener, r.handler, PENDING, now, now, now)
             for r in req.routes])
        _insert_audit(conn, {"ts": now, "event": "stored", "listener": req.listener,
                             "object_id": object_id, "sop_instance_uid": req.sop_instance_uid,
                             "calling_ae": req.calling_ae, "peer": req.peer,
                             "detail": f"version={version} size={req.size} routes={len(req.routes)}"})
        return IngestResult(outcome, object_id, version, len(req.routes))

    # -- reads (any thread; one read connection per thread) ----------------------

    def reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.db_path)
            self._local.conn = conn
        return conn

    def read_object(self, object_id: int) -> bytes:
        try:
            return self._read_object(object_id)
        except FileNotFoundError:
            # `mfconsole rekey` may have moved it to a new blob since we read its row.
            return self._read_object(object_id)

    def _read_object(self, object_id: int) -> bytes:
        row = self.reader().execute("SELECT blob, purged_at FROM objects WHERE id = ?",
                                    (object_id,)).fetchone()
        if row is None or row["purged_at"] is not None:
            raise KeyError(object_id)
        if row["blob"] == INLINE:
            sealed = self.reader().execute("SELECT sealed FROM blob_data WHERE object_id = ?",
                                           (object_id,)).fetchone()
            return self.vault.open_sealed(sealed[0], f"of object {object_id}")
        return self.vault.open_bytes(self.blob_root / row["blob"])

    # -- retention ---------------------------------------------------------------

    def purge_expired(self, retention_days: int, now: float | None = None, *,
                      stop: threading.Event | None = None, batch: int = PURGE_BATCH,
                      progress: Any = None) -> int:
        """Remove blobs of objects older than the retention whose deliveries are all
        finished (delivered or filtered). Dead letters and queued objects are kept:
        nothing is lost because it waited too long. The row stays for the audit trail.

        In batches of ``batch`` objects, one short transaction each, with a pause
        between them: C-STORE commits queue behind one batch at most, never behind
        the whole purge. ``progress(done)`` is called after each batch."""
        cutoff = (now or time.time()) - retention_days * 86400
        cursor: tuple[float, int] = (float("-inf"), 0)
        total = 0

        def purge_batch(conn: sqlite3.Connection) -> tuple[list[str], tuple[float, int] | None]:
            # The next candidates by (received_at, id), finished or not, so each batch
            # costs the same however many kept objects (dead letters) lie before them.
            rows = conn.execute(
                "SELECT o.id, o.blob, o.received_at, NOT EXISTS (SELECT 1 FROM deliveries d "
                "WHERE d.object_id = o.id "
                f"AND d.state NOT IN ({','.join('?' * len(FINISHED_STATES))})) AS finished "
                "FROM objects o INDEXED BY objects_unpurged "
                "WHERE o.purged_at IS NULL AND o.received_at < ? AND (o.received_at, o.id) > (?, ?) "
                "ORDER BY o.received_at, o.id LIMIT ?",
                (*FINISHED_STATES, cutoff, *cursor, batch)).fetchall()
            if not rows:
                return [], None
            done = [r for r in rows if r["finished"]]
            stamp = time.time()
            conn.executemany("UPDATE objects SET purged_at = ? WHERE id = ?",
                             [(stamp, r["id"]) for r in done])
            conn.executemany("DELETE FROM blob_data WHERE object_id = ?", [(r["id"],) for r in done])
            return [r["blob"] for r in done], (rows[-1]["received_at"], rows[-1]["id"])

        while stop is None or not stop.is_set():
            blobs, cursor_next = self.call(purge_batch)
            for rel in blobs:
                self._remove_file(rel)
            total += len(blobs)
            if progress is not None:
                progress(total)
            if cursor_next is None:
                break
            cursor = cursor_next
            time.sleep(PURGE_PAUSE_S)   # leave the writer to ingest between batches
        if total:
            self.audit("purged", detail=f"{total} object(s) older than {retention_days} days")
        return total


def _insert_audit(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    cols = ("ts", "event", "listener", "destination", "object_id", "delivery_id",
            "sop_instance_uid", "calling_ae", "peer", "status", "detail", "actor")
    conn.execute(f"INSERT INTO audit ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                 tuple(row.get(c) for c in cols))


class _transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def rows(conn: sqlite3.Connection, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(sql, tuple(params))]


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
