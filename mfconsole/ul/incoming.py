"""Streaming ingest: a large C-STORE data set is scanned and sealed into its blob as
its P-DATA fragments arrive, so an association holds about one chunk of it however
large the object (the 8 x 60 MB case of bench/ul_inflight.py).

An object starts in memory, like every small one (an SR is never more than a few
PDUs, and an in-memory object is sealed into the database in one step). Once
STREAM_AT bytes of it have arrived and more are coming, the acceptor opens a blob
(IngestSink.open_blob) and from then on hands the bytes over a chunk at a time to a
Streamed object, on the listener's worker pool (encryption, hashing and the file
write release the GIL; the event loop only collects fragments). The header is
scanned by the same walk as a whole data set (dataset_scan.DatasetStream): a
malformed one is known early, its blob discarded and the rest of its bytes dropped,
and the refusal answered at its last fragment as for a whole object.

Deflated data sets stay whole in memory: their elements exist only once the whole
stream is inflated (dataset_scan.can_stream).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from mfconsole.dimse.dataset_scan import DatasetRejected, DatasetStream
from mfconsole.dimse.listener import (STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, IngestSink,
                                      commit_object, refused)

log = logging.getLogger("mfconsole.listener")

# From this many bytes held of one object on, it streams. Above the store's inline
# size (such objects go to a blob file anyway), and large enough that a PDU of any
# negotiated size is a small part of it.
STREAM_AT = 1024 * 1024
# Bytes collected on the event loop before they go to the worker pool in one piece:
# one pool hop per MiB, not one per PDU.
HAND_OVER = 1024 * 1024


class Streamed:
    """One object on its way into its blob. feed() and discard() run on pool threads
    (one at a time per object: the acceptor awaits each feed before the next; the lock
    covers a discard from a connection that ends meanwhile)."""

    def __init__(self, sink: IngestSink, ts: str):
        self.ts = ts
        self.size = 0
        self.rejected: DatasetRejected | None = None
        self.failed = False   # the blob could not be written (disk full...): 0xA700
        self._scan = DatasetStream(ts, wanted=sink.header_tags)
        self._lock = threading.Lock()
        self._blob: Any = sink.open_blob()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self.size += len(data)
            if self._blob is None or self.rejected is not None:
                return   # discarded or refused: its bytes are only counted
            try:
                self._scan.feed(data)
            except DatasetRejected as exc:
                self._refuse(exc)
                return
            try:
                self._blob.write(data)
            except OSError as exc:
                log.error("streaming an object into its blob failed: %s; it will be answered "
                          "0xA700", exc.__class__.__name__)
                self.failed = True
                self._blob.discard()

    def _refuse(self, exc: DatasetRejected) -> None:
        self.rejected = exc
        self._blob.discard()

    def discard(self) -> None:
        with self._lock:
            if self._blob is not None:
                self._blob.discard()
                self._blob = None

    def store(self, sink: IngestSink, listener: str, cmd_class: str, cmd_inst: str, *,
              calling: str, peer: str, association: str, max_object_bytes: int,
              called: str = "") -> tuple[int, str]:
        """(C-STORE status, outcome or refusal reason) once the last fragment is fed:
        store_object's decision for an object that arrived as a blob. Blocks for the
        group commit."""
        with self._lock:
            blob, self._blob = self._blob, None
        if blob is None:
            return STATUS_OUT_OF_RESOURCES, "association ended"
        reason = ""
        if self.failed:
            reason, status = "store failure", STATUS_OUT_OF_RESOURCES
        elif self.size > max_object_bytes:
            reason, status = "object exceeds store.max_object_mb", STATUS_OUT_OF_RESOURCES
        elif self.rejected is not None:
            reason, status = self.rejected.reason, self.rejected.status
        else:
            try:
                summary = self._scan.finish()
            except DatasetRejected as exc:
                reason, status = exc.reason, exc.status
        if reason:
            blob.discard()
            if self.failed:
                return status, reason   # not the peer's fault: nothing to audit as refused
            refused(sink, listener, status, reason, calling, peer, None)
            return status, reason
        status, outcome = commit_object(sink, listener, blob, summary, self.ts, cmd_class, cmd_inst,
                                        calling=calling, peer=peer, association=association,
                                        called=called)
        if status != STATUS_SUCCESS:
            blob.discard()   # refused, or the store gave up on it (it may be gone already)
        return status, outcome
