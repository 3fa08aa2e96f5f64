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

import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfconsole.engine.latency import COMMIT_BUCKETS, Histogram
from mfconsole.engine.vault import SealResult, Vault, fsync_dir
from mfconsole.repository import Reads, SchemaError, Tx, connect, db_path, migrate
from mfconsole.repository.writes import transaction
from mfconsole.repository.reads import objects_table_exists, reading
from mfconsole.repository.states import HELD, INLINE, PENDING

log = logging.getLogger("mfconsole.store")

MAX_GROUP = 256
# Objects up to this size live in the database (see the module docstring); measured
# with bench/ingest.py: SQLite stores blobs of this size faster than the file system
# when every write must be durable.
INLINE_MAX = 256 * 1024
# Retention purge: objects per transaction, and the pause between two (bench/purge.py
# measures the C-STORE response time while purging).
PURGE_BATCH = 300
PURGE_PAUSE_S = 0.01


class StoreError(Exception):
    """The store could not commit; the sender must be told to retry (0xA700)."""


@dataclass(frozen=True)
class Route:
    destination: str
    handler: str | None = None
    rule: str | None = None       # the rule that made it: its coercion applies at send time
    priority: int = 0             # rules.URGENT: claimed before the destination's other deliveries
    # A study-stable destination (engine/holds.py): the quiet period before the study
    # is released (0: not held), and its late_instance policy.
    hold_s: float = 0.0
    late: str = ""


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
    called_ae: str = ""
    blob: str = ""          # path relative to the blob root, or INLINE
    sealed: bytes | None = field(default=None, repr=False)   # the INLINE blob
    size: int = 0
    digest: str = ""
    key_id: str = ""
    digests: tuple[tuple[str, str], ...] = ()   # under every loaded key (vault.SealResult)
    association_id: str = ""
    # Search tokens (vault.search_token) of the accession number and patient ID.
    accession_token: str | None = None
    patient_token: str | None = None
    # What routing decided (engine/router.py), rule names only: words for the `stored`
    # audit row ("" with [[routes]] alone), and for an object sent nowhere on purpose
    # its own audit row (event, status, detail), in the same transaction.
    routed_by: str = ""
    nowhere: tuple[str, str | None, str] | None = None


@dataclass(frozen=True)
class IngestResult:
    outcome: str            # stored | duplicate | new_version
    object_id: int
    version: int
    deliveries: int
    held: frozenset[str] = frozenset()   # destinations whose delivery was made held


@dataclass
class _Job:
    kind: str               # ingest | audit | call
    payload: Any
    future: Future | None = field(default=None)


class BlobFile:
    """A blob file sealed as the object's bytes are written to it: a large object never
    has to be whole in memory. Files are grouped by the hour they were opened and named
    by a random id, never by a UID. ``close`` fsyncs the file (its directory is fsynced
    by the group commit); ``discard`` removes a blob that will not be committed."""

    def __init__(self, blob_root: Path, vault: Vault):
        self.rel = f"{time.strftime('%Y%m%d%H', time.gmtime())}/{uuid.uuid4().hex}.blob"
        self.path = blob_root / self.rel
        self.path.parent.mkdir(exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._out: Any = os.fdopen(fd, "wb")
        try:
            self._sealer = vault.sealer(self._out.write)
        except BaseException:
            self.discard()
            raise

    @property
    def size(self) -> int:
        """Plaintext bytes written so far."""
        return self._sealer.size

    def write(self, data: memoryview | bytes) -> None:
        self._sealer.update(data)

    def close(self) -> SealResult:
        """Seal the last chunk and make the file durable."""
        result = self._sealer.finish()
        out, self._out = self._out, None
        try:
            out.flush()
            os.fsync(out.fileno())
        finally:
            out.close()
        return result

    def discard(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        self.path.unlink(missing_ok=True)


class StoreRefused(Exception):
    """The store will not open as it is: the message says why and what to do."""


QUARANTINE = "quarantine"


def has_blob_files(blob_root: Path) -> bool:
    return blob_root.is_dir() and any(p.is_file() for p in blob_root.rglob("*.blob"))


def sealed_key_ids(db_path: Path) -> dict[str, int]:
    """Key id -> number of objects whose blob it sealed (nothing when there is no
    database yet). Read before the store opens, to check the keys a start needs."""
    if not objects_table_exists(db_path):
        return {}
    with reading(db_path) as reads:
        return reads.sealed_key_ids()


def has_stored_objects(db_path: Path) -> bool:
    """Whether the database has ever stored an object (purged ones too): not for a
    missing or new database, which beside blob files means the database was lost."""
    if not objects_table_exists(db_path):
        return False
    with reading(db_path) as reads:
        return reads.has_objects()


class Store:
    def __init__(self, data_dir: Path, vault: Vault, *, accept_empty_store: bool = False):
        self.data_dir = data_dir
        self.vault = vault
        self.db_path = db_path(data_dir)
        self.accept_empty_store = accept_empty_store
        self.blob_root = data_dir / "blobs"
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._local = threading.local()
        self.commits = 0          # group commits (for benchmarks and the console)
        self.committed_jobs = 0
        # How long each group commit took (its blob directories' fsync and the
        # transaction): the metrics export's mfconsole_store_commit_seconds.
        self.commit_latency = Histogram(COMMIT_BUCKETS)

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
        try:
            migrate(self._conn)
        except SchemaError as exc:
            self._conn.close()
            raise StoreRefused(str(exc)) from None
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
        with transaction(self._conn) as tx:
            requeued = tx.requeue_all_in_flight(time.time())
        referenced = Reads(self._conn).referenced_blobs()
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

    def seal(self, data: "memoryview | bytes | BlobFile", request: IngestRequest) -> None:
        """Encrypt ``data`` into the request: in memory when small, else a new file (or
        the file a BlobFile has been sealing as the object arrived)."""
        if isinstance(data, BlobFile):
            result = data.close()
            request.blob = data.rel
        elif len(data) <= INLINE_MAX:
            request.sealed, result = self.vault.seal_bytes(data)
            request.blob = INLINE
        else:
            blob = self.open_blob()
            try:
                blob.write(data)
                result = blob.close()
            except BaseException:
                blob.discard()
                raise
            request.blob = blob.rel
        request.size, request.digest, request.key_id = result.size, result.digest, result.key_id
        request.digests = result.digests

    def open_blob(self) -> "BlobFile":
        """A new blob file, sealed as its bytes are written (streaming ingest)."""
        return BlobFile(self.blob_root, self.vault)

    def ingest(self, data: "memoryview | bytes | BlobFile", request: IngestRequest) -> IngestResult:
        """Seal, then commit through the writer; returns only once committed."""
        committed = self.begin_ingest(data, request)
        try:
            return committed.result()
        except BaseException:
            self._remove_file(request.blob)   # (the callback does too; this is before we return)
            raise

    def begin_ingest(self, data: "memoryview | bytes | BlobFile", request: IngestRequest) -> Future:
        """Seal now, then queue the commit: the Future of the IngestResult, set once
        committed. A commit that fails leaves no blob behind."""
        try:
            self.seal(data, request)
        except BaseException:
            if isinstance(data, BlobFile):
                data.discard()
            raise
        try:
            committed = self._enqueue("ingest", request)
        except BaseException:
            self._ingested(request, None)
            raise
        committed.add_done_callback(lambda future: self._ingested(request, future))
        return committed

    def _ingested(self, request: IngestRequest, future: Future | None) -> None:
        request.sealed = None
        if future is None or future.exception() is not None:
            # The blob was never referenced; leave nothing behind.
            self._remove_file(request.blob)

    def _remove_file(self, rel: str) -> None:
        if rel and rel != INLINE:
            (self.blob_root / rel).unlink(missing_ok=True)

    def audit(self, event: str, **fields: Any) -> None:
        """Queue an audit row; it is committed with the next group (fire and forget)."""
        fields["event"] = event
        fields["ts"] = time.time()
        self._queue.put(_Job("audit", fields))

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(tx, *args)`` on the writer thread inside a transaction (``tx``: a
        repository ``Tx``); the one way anything writes while the engine runs."""
        return self._submit("call", (fn, args))

    def submit(self, fn: Any, *args: Any) -> Future:
        """``call`` without waiting: the Future of ``fn``'s result, set once its group
        is committed (or its exception). Calls run in the order they are submitted."""
        return self._enqueue("call", (fn, args))

    def _submit(self, kind: str, payload: Any) -> Any:
        return self._enqueue(kind, payload).result()

    def _enqueue(self, kind: str, payload: Any) -> Future:
        if self._writer is None:
            raise StoreError("store is closed")
        future: Future = Future()
        self._queue.put(_Job(kind, payload, future))
        return future

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
        results: list[tuple[_Job, Any]] = []
        redundant: list[str] = []
        started = time.monotonic()
        try:
            # New blob files are only durable once their directory entries are.
            dirs = {(self.blob_root / j.payload.blob).parent for j in batch
                    if j.kind == "ingest" and j.payload.blob != INLINE}
            for d in dirs:
                fsync_dir(d)
            with transaction(self._conn) as tx:
                for job in batch:
                    if job.kind == "ingest":
                        result = self._insert(tx, job.payload)
                        if result.outcome == "duplicate":
                            redundant.append(job.payload.blob)
                        results.append((job, result))
                    elif job.kind == "audit":
                        tx.audit(**job.payload)
                    else:
                        fn, args = job.payload
                        try:
                            results.append((job, tx.isolated(fn, *args)))
                        except Exception as exc:  # one bad call must not fail the group
                            results.append((job, exc))
        except Exception as exc:
            log.error("store commit failed (%s); %d request(s) answered with a failure",
                      exc.__class__.__name__, len(batch))
            for job in batch:
                if job.future is not None and not job.future.done():
                    job.future.set_exception(StoreError(f"commit failed: {exc.__class__.__name__}"))
            return
        self.commit_latency.observe(time.monotonic() - started)
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

    def _insert(self, tx: Tx, req: IngestRequest) -> IngestResult:
        now = time.time()
        latest = tx.latest_version(req.sop_instance_uid)
        who = {"listener": req.listener, "sop_instance_uid": req.sop_instance_uid,
               "calling_ae": req.calling_ae, "peer": req.peer, "ts": now}
        # Digests are keyed: compare under the key the stored one was made with.
        if latest is not None and latest["digest"] == dict(req.digests).get(latest["key_id"], req.digest):
            tx.audit("duplicate", object_id=latest["id"], **who,
                     detail="same SOP Instance UID and bytes; nothing new routed")
            return IngestResult("duplicate", latest["id"], latest["version"], 0)
        version = 1 if latest is None else latest["version"] + 1
        object_id = tx.insert_object({
            "sop_instance_uid": req.sop_instance_uid, "version": version,
            "sop_class_uid": req.sop_class_uid, "study_uid": req.study_uid,
            "series_uid": req.series_uid, "modality": req.modality,
            "transfer_syntax": req.transfer_syntax, "size": req.size, "digest": req.digest,
            "blob": req.blob, "key_id": req.key_id, "listener": req.listener,
            "calling_ae": req.calling_ae, "called_ae": req.called_ae or None, "peer": req.peer,
            "received_at": now, "superseded": 0,
            "accession_token": req.accession_token, "patient_token": req.patient_token,
            "association": req.association_id or None,
        }, req.sealed)
        outcome = "stored"
        if latest is not None:
            outcome = "new_version"
            tx.supersede_others(req.sop_instance_uid, object_id)
            tx.audit("conflict", object_id=object_id, **who,
                     detail=f"same SOP Instance UID, different bytes: stored as "
                            f"version {version} (previous object {latest['id']})")
        # Study-stable destinations (engine/holds.py): one upsert of the study's hold
        # each, and the delivery held (or, for a late instance sent alone, pending).
        held = frozenset(r.destination for r in req.routes if r.hold_s and tx.hold_study(
            r.destination, req.study_uid, now, r.hold_s, r.late == "update"))
        tx.add_deliveries(object_id, req.listener,
                          ((r.destination, r.handler, r.rule, r.priority,
                            HELD if r.destination in held else PENDING) for r in req.routes), now)
        tx.audit("stored", object_id=object_id, **who,
                 detail=f"version={version} size={req.size} routes={len(req.routes)}"
                        + (f" ({req.routed_by})" if req.routed_by else ""))
        if req.nowhere is not None:
            event, status, detail = req.nowhere
            tx.audit(event, object_id=object_id, status=status, detail=detail, **who)
        return IngestResult(outcome, object_id, version, len(req.routes), held)

    # -- reads (any thread; one read connection per thread) ----------------------

    def reader(self) -> Reads:
        """This thread's reads (one connection per thread, kept)."""
        reads = getattr(self._local, "reads", None)
        if reads is None:
            reads = Reads(connect(self.db_path))
            self._local.reads = reads
        return reads

    def read_object(self, object_id: int) -> bytes:
        data = self.read_objects([object_id])[0]
        if isinstance(data, Exception):
            raise data
        return data

    def read_objects(self, object_ids: list[int]) -> list[bytes | Exception]:
        """Each object's plaintext (one query for them all), or the exception reading
        it raised, so that one unreadable object does not sink the others."""
        where = self.reader().object_blobs(object_ids)
        out: list[bytes | Exception] = []
        for object_id in object_ids:
            try:
                try:
                    out.append(self._open(object_id, where.get(object_id)))
                except FileNotFoundError:
                    # `mfconsole rekey` may have moved it to a new blob since we read its row.
                    out.append(self._open(object_id, self.reader().object_blob(object_id)))
            except Exception as exc:
                out.append(exc)
        return out

    def _open(self, object_id: int, where: tuple[str, bytes | None] | None) -> bytes:
        if where is None:
            raise KeyError(object_id)
        blob, sealed = where
        if blob == INLINE:
            return self.vault.open_sealed(sealed, f"of object {object_id}")
        return self.vault.open_bytes(self.blob_root / blob)

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

        while stop is None or not stop.is_set():
            blobs, cursor_next = self.call(Tx.purge_batch, cutoff, cursor, batch, time.time())
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
