"""What a listener decides, apart from the bytes on the wire (mfconsole/ul/acceptor.py):
which transfer syntaxes it takes, the C-STORE status of each data set, and the board
of live and recent associations the console shows.

``store_object`` scans the raw data set bytes (never a full decode), hands them to the
sink to seal and commit, and waits for the group commit: only then is the answer
Success. Anything the store cannot commit is 0xA700, so the sender retries. This
module knows nothing of SQLite: it talks to an ``IngestSink``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from mfconsole.dimse.dataset_scan import DatasetRejected, HeaderSummary, scan_dataset

log = logging.getLogger("mfconsole.listener")

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
# Compressed syntaxes are accepted as opaque bytes: we never decode pixel data.
PASS_THROUGH = (
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102",
    "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105",
    "1.2.840.10008.1.2.4.106",
)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

REJECT_REASONS = {
    (1, 1, 3): "calling AE title not recognized",
    (1, 1, 7): "called AE title not recognized",
    (2, 3, 2): "local limit exceeded (max_associations)",
}


def transfer_syntaxes(accept_deflate: bool) -> list[str]:
    # Explicit first: when a peer offers several, the requestor's order decides, but
    # for contexts we build ourselves explicit VR keeps VRs of private tags.
    ts = [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, *PASS_THROUGH]
    if accept_deflate:
        ts.append(DEFLATED_LE)
    return ts


class IngestSink(Protocol):
    """What the listener needs from the engine."""

    # Top-level attributes to read from each data set beyond the routing fields (those
    # the configured rules match on; HeaderSummary.wanted). Read once per object.
    header_tags: frozenset[int]

    def begin_ingest(self, data: Any, summary: HeaderSummary, meta: dict[str, Any]) -> Future:
        """Seal a received object (``data``: its bytes, or a blob from open_blob) and
        hand it to the writer: the Future of its outcome, set once committed."""
    def open_blob(self) -> Any:
        """A blob to seal a large object into as it arrives: write(bytes), discard()."""
    def audit(self, event: str, **fields: Any) -> None: ...

    # Storage Commitment (a sink without them refuses every report context):
    def commitment_peer(self, calling_ae: str, host: str) -> str | None:
        """The destination with storage_commitment this requestor is, else None."""
    def commitment_report(self, report: Any, via: str, expected: str | None) -> int:
        """Record an N-EVENT-REPORT (dimse/commitment.Report) from ``expected``'s peer;
        the status of the N-EVENT-REPORT-RSP."""


@dataclass
class AssociationInfo:
    id: str
    listener: str
    peer: str
    calling_ae: str = ""
    called_ae: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None
    objects: int = 0
    bytes: int = 0
    refused: int = 0
    status: str = "negotiating"   # negotiating | active | released | aborted | rejected
    reason: str = ""
    tls: str = ""                 # protocol and suite, e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    direction: str = "in"         # in: a peer sends to a listener; out: we send to a destination
    key: str = ""                 # unique across engine runs: what stored objects record


class AssociationBoard:
    """Live and recent associations, lock-protected, read by snapshots."""

    def __init__(self, keep: int = 200, run: str = ""):
        self._lock = threading.Lock()
        self._live: dict[int, AssociationInfo] = {}
        self._recent: list[AssociationInfo] = []
        # The ids restart at 1 with every engine run: the run makes each key unique.
        self.run = run or time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self._keep = keep
        self._seq = 0

    def open(self, key: int, listener: str, peer: str, *, direction: str = "in") -> AssociationInfo:
        """``listener``: the listener it came in on, or (outbound) the destination."""
        with self._lock:
            self._seq += 1
            name = f"{listener}-{self._seq}"
            info = AssociationInfo(id=name, listener=listener, peer=peer, direction=direction,
                                   key=f"{name}@{self.run}")
            self._live[key] = info
            return info

    def get(self, key: int) -> AssociationInfo | None:
        with self._lock:
            return self._live.get(key)

    def close(self, key: int, status: str, reason: str = "") -> AssociationInfo | None:
        with self._lock:
            info = self._live.pop(key, None)
            if info is None:
                return None
            if info.status in ("negotiating", "active"):
                info.status = status
            if reason and not info.reason:
                info.reason = reason
            info.ended = time.time()
            self._recent.append(info)
            del self._recent[:-self._keep]
            return info

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            return {"live": [vars(i).copy() for i in self._live.values()],
                    "recent": [vars(i).copy() for i in reversed(self._recent)]}

    def live_count(self) -> int:
        with self._lock:
            return len(self._live)


# ---------------------------------------------------------------------------
# The C-STORE status decision: what to answer for a data set, and the ingest itself.

def store_object(sink: IngestSink, listener: str, view: memoryview, ts: str, cmd_class: str,
                 cmd_inst: str, *, calling: str, peer: str, association: str,
                 accept_deflate: bool, max_object_bytes: int, called: str = "") -> tuple[int, str]:
    """(C-STORE status, outcome or refusal reason) for one received data set; the
    data set is ingested (and committed) when the status is Success. Blocks for the
    group commit: never call it on an event loop (``begin_store`` does not)."""
    begun = begin_store(sink, listener, view, ts, cmd_class, cmd_inst, calling=calling, peer=peer,
                        association=association, accept_deflate=accept_deflate,
                        max_object_bytes=max_object_bytes, called=called)
    return begun if isinstance(begun, tuple) else begun.wait()


def begin_store(sink: IngestSink, listener: str, view: memoryview, ts: str, cmd_class: str,
                cmd_inst: str, *, calling: str, peer: str, association: str,
                accept_deflate: bool, max_object_bytes: int, called: str = ""
                ) -> "tuple[int, str] | Committing":
    """``store_object`` up to the commit: a refusal (status, reason), or the object
    sealed and handed to the writer (``Committing``). Waits for nothing."""
    if len(view) > max_object_bytes:
        reason = "object exceeds store.max_object_mb"
        refused(sink, listener, STATUS_OUT_OF_RESOURCES, reason, calling, peer, None)
        return STATUS_OUT_OF_RESOURCES, reason
    try:
        summary = scan_dataset(view, ts, allow_deflate=accept_deflate, wanted=sink.header_tags)
    except DatasetRejected as exc:
        refused(sink, listener, exc.status, exc.reason, calling, peer, None)
        return exc.status, exc.reason
    return begin_commit(sink, listener, view, summary, ts, cmd_class, cmd_inst,
                        calling=calling, peer=peer, association=association, called=called)


def commit_object(sink: IngestSink, listener: str, data: Any, summary: HeaderSummary, ts: str,
                  cmd_class: str, cmd_inst: str, *, calling: str, peer: str,
                  association: str, called: str = "") -> tuple[int, str]:
    """The rest of store_object once the data set is scanned (blocks for the commit)."""
    begun = begin_commit(sink, listener, data, summary, ts, cmd_class, cmd_inst,
                         calling=calling, peer=peer, association=association, called=called)
    return begun if isinstance(begun, tuple) else begun.wait()


def begin_commit(sink: IngestSink, listener: str, data: Any, summary: HeaderSummary, ts: str,
                 cmd_class: str, cmd_inst: str, *, calling: str, peer: str,
                 association: str, called: str = "") -> "tuple[int, str] | Committing":
    """The command must name the data set's SOP class and instance, then the sink
    seals ``data`` (the bytes, or the blob a streamed object was sealed into as it
    arrived) and queues its commit."""
    if cmd_class != summary.sop_class_uid or cmd_inst != summary.sop_instance_uid:
        reason = "command SOP Class/Instance UID does not match the data set"
        refused(sink, listener, STATUS_MISMATCH, reason, calling, peer, summary.sop_instance_uid)
        return STATUS_MISMATCH, reason
    meta = {"transfer_syntax": ts, "listener": listener, "calling_ae": calling,
            "called_ae": called, "peer": peer, "association": association}
    committing = Committing(listener, summary.sop_instance_uid, calling)
    try:
        committing.future = sink.begin_ingest(data, summary, meta)
    except Exception as exc:
        return committing.failed(exc)
    return committing


@dataclass
class Committing:
    """An object sealed and handed to the writer: Success once its commit is in."""
    listener: str
    sop_instance_uid: str
    calling: str
    future: Future | None = None

    def wait(self) -> tuple[int, str]:
        """(status, outcome), blocking until the commit (or its failure)."""
        assert self.future is not None
        try:
            return self.committed(self.future.result())
        except Exception as exc:
            return self.failed(exc)

    async def wait_async(self) -> tuple[int, str]:
        """``wait`` on an event loop."""
        assert self.future is not None
        try:
            return self.committed(await asyncio.wrap_future(self.future))
        except Exception as exc:
            return self.failed(exc)

    def committed(self, outcome: str) -> tuple[int, str]:
        log.debug("listener %s: %s %s from %s", self.listener, outcome, self.sop_instance_uid,
                  self.calling)
        return STATUS_SUCCESS, outcome

    def failed(self, exc: BaseException) -> tuple[int, str]:
        log.error("listener %s: store failed for %s from %s: %s; answered 0xA700",
                  self.listener, self.sop_instance_uid, self.calling, exc.__class__.__name__)
        return STATUS_OUT_OF_RESOURCES, "store failure"


def refused(sink: IngestSink, listener: str, status: int, reason: str, calling: str, peer: str,
            sop_instance_uid: str | None) -> None:
    log.warning("listener %s: refused object from %s (%s) with 0x%04X: %s",
                listener, calling, peer, status, reason)
    sink.audit("refused", listener=listener, calling_ae=calling, peer=peer,
               status=f"0x{status:04X}", detail=reason, sop_instance_uid=sop_instance_uid)
