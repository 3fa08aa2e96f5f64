"""C-STORE / C-ECHO SCP: one pynetdicom AE per listener.

The C-STORE handler runs on the association's thread: it scans the raw dataset bytes
(never a full decode), seals them into the store and waits for the group commit; only
then does it answer Success. Anything the store cannot commit is 0xA700 so the sender
retries. This module knows nothing of SQLite: it talks to an ``IngestSink``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from mfconsole import tls
from mfconsole.config import ListenerConfig, is_loopback
from mfconsole.dimse import pynetdicom_adapt as adapt
from mfconsole.dimse import sockets
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

    def ingest(self, data: Any, summary: HeaderSummary, meta: dict[str, Any]) -> str:
        """Commit a received object: ``data`` is its bytes, or a blob from open_blob."""
    def open_blob(self) -> Any:
        """A blob to seal a large object into as it arrives: write(bytes), discard()."""
    def audit(self, event: str, **fields: Any) -> None: ...


# ---------------------------------------------------------------------------
# What the listener needs of pynetdicom beyond its public API (private SOP classes
# stored, calling AE titles bound to client certificates, bounded reads, our socket
# options, max_associations that ignores silent connections) is in
# pynetdicom_adapt.py, installed on this listener's AE and associations only.


def _server_context(cfg: Any) -> ssl.SSLContext:
    return sockets.dicom_context(tls.server_context(cfg))


# ---------------------------------------------------------------------------


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


class Listener:
    def __init__(self, cfg: ListenerConfig, sink: IngestSink, board: AssociationBoard,
                 max_object_bytes: int):
        self.cfg = cfg
        self.sink = sink
        self.board = board
        self.max_object_bytes = max_object_bytes
        self.server: adapt.ListenerServer | None = None
        self._thread: threading.Thread | None = None
        self._received: dict[int, int] = {}   # bytes of the DIMSE message in progress
        self._received_lock = threading.Lock()
        self._tls: tls.Reloading | None = None
        self.started_at: float | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self.server is None:
            return (self.cfg.host, self.cfg.port)
        host, port = self.server.server_address[:2]
        return (str(host), int(port))

    def start(self) -> None:
        cfg = self.cfg
        # Before any socket: certificate files that became unusable since the config
        # was loaded stop the start (TLSSetupError is an OSError naming the key).
        self._tls = tls.Reloading(_server_context, cfg.tls) if cfg.tls else None
        if self._tls is not None:
            self._tls.get()
        ae = adapt.ListenerAE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu_kb * 1024
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.require_called_aet = True
        ae.require_calling_aet = [] if cfg.any_calling_aet else list(cfg.calling_aets)
        ts = transfer_syntaxes(cfg.accept_deflate)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ts)
        ae.add_supported_context(Verification, [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE])
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = adapt.make_listener_server(
            ae, (cfg.host, cfg.port), handlers, network_timeout_s=cfg.network_timeout_s,
            max_pdata=cfg.max_pdu_kb * 1024, on_oversize=self._oversize_pdu,
            handshake=self._handshake if self._tls is not None else None,
            cert_binding=lambda: bool(self.cfg.tls is not None and self.cfg.tls.client_cert_aets))
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"listener-{cfg.name}", daemon=True)
        self._thread.start()
        self.started_at = time.time()
        mode = ("mTLS" if cfg.tls.require_client_cert else "TLS") if cfg.tls else "cleartext"
        log.info("listener %s: %s listening on %s:%d (%s)", cfg.name, cfg.ae_title, *self.address, mode)
        if cfg.tls is None and not is_loopback(cfg.host):
            log.warning("listener %s: cleartext on %s, a non-loopback address (allow_cleartext = "
                        "true): PHI crosses the network unencrypted", cfg.name, cfg.host)

    # Settings a running server takes for its next association; the others (address,
    # transfer syntaxes, PDU size) need the listener restarted.
    LIVE_KEYS = ("ae_title", "calling_aets", "max_associations", "acse_timeout_s",
                 "dimse_timeout_s", "network_timeout_s")

    def reconfigure(self, cfg: ListenerConfig) -> bool:
        """Apply ``cfg`` without touching associations in progress; False when it
        changes something only a restart can (the caller restarts the listener)."""
        from dataclasses import replace

        if replace(cfg, **{k: getattr(self.cfg, k) for k in self.LIVE_KEYS}) != self.cfg:
            return False
        server = self.server
        if server is not None:
            ae = server.ae
            ae.ae_title = server.ae_title = cfg.ae_title
            ae.require_calling_aet = [] if cfg.any_calling_aet else list(cfg.calling_aets)
            ae.maximum_associations = cfg.max_associations
            ae.acse_timeout, ae.dimse_timeout = cfg.acse_timeout_s, cfg.dimse_timeout_s
            ae.network_timeout = server.network_timeout = cfg.network_timeout_s
        self.cfg = cfg
        return True

    def stop(self, timeout: float) -> None:
        """Stop accepting, let associations in progress finish (bounded), then abort."""
        server = self.server
        if server is None:
            return
        server.shutdown()   # stops serve_forever and closes the listening socket
        deadline = time.monotonic() + timeout
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in list(server.active_associations):
            assoc.abort()
        self.server = None
        log.info("listener %s stopped", self.cfg.name)

    # -- association events -----------------------------------------------------

    def _peer(self, event: Any) -> str:
        addr = event.assoc.requestor.address_info
        return f"{addr.address}:{addr.port}"

    def _handshake(self, sock: socket.socket, address: Any) -> ssl.SSLSocket | None:
        """The TLS handshake of one connection, on its own thread, within
        acse_timeout_s in all; a failure is an audit event (peer and reason only)."""
        assert self._tls is not None
        peer = f"{address[0]}:{address[1]}"
        limit = self.cfg.acse_timeout_s
        deadline = time.monotonic() + limit
        try:
            sock.settimeout(limit)
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:   # a port scan or health check: nothing was attempted
                sock.close()
                log.info("listener %s: connection from %s closed before the TLS handshake",
                         self.cfg.name, peer)
                return None
            if first == b"\x01":   # PDU type 1: an A-ASSOCIATE-RQ, in cleartext
                return self._tls_refused(sock, peer, "the peer sent a cleartext association "
                                         "request; it must use TLS")
            return tls.accept(self._tls.get(), sock, max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            return self._tls_refused(sock, peer, f"not completed within acse_timeout_s={limit:g}")
        except (OSError, ValueError) as exc:
            return self._tls_refused(sock, peer, tls.failure_reason(exc))

    def _tls_refused(self, sock: socket.socket, peer: str, why: str) -> None:
        sock.close()
        log.warning("listener %s: TLS handshake with %s failed: %s", self.cfg.name, peer, why)
        self.sink.audit("refused", listener=self.cfg.name, peer=peer, status="TLS",
                        detail=f"TLS handshake failed: {why}")

    def _on_open(self, event: Any) -> None:
        # The server made the association ours already (pynetdicom_adapt.ListenerServer:
        # a deadline for its A-ASSOCIATE-RQ, bounded reads, our negotiation).
        info = self.board.open(id(event.assoc), self.cfg.name, self._peer(event))
        conn = adapt.connection(event.assoc)
        if isinstance(conn, ssl.SSLSocket):
            info.tls = tls.describe(conn)
            if self.cfg.tls is not None and self.cfg.tls.client_cert_aets:
                names = tls.identities(conn.getpeercert())
                event.assoc.cert_aets = self.cfg.tls.aets_for(names)
                event.assoc.cert_names = ", ".join(sorted(names)) or "no name"

    def _oversize_pdu(self, assoc: Any, pdu_type: int, length: int, limit: int) -> None:
        addr = assoc.requestor.address_info
        peer = f"{addr.address}:{addr.port}"
        log.warning("listener %s: closing connection from %s: PDU type 0x%02X declares %d "
                    "bytes (limit %d)", self.cfg.name, peer, pdu_type, length, limit)
        self.sink.audit("refused", listener=self.cfg.name, peer=peer, status="abort",
                        detail=f"PDU type 0x{pdu_type:02X} length {length} exceeds {limit}")

    def _on_established(self, event: Any) -> None:
        info = self.board.get(id(event.assoc))
        rq = event.assoc.requestor.primitive
        if info is not None:
            info.status = "active"
            info.calling_ae = str(rq.calling_ae_title).strip()
            info.called_ae = str(rq.called_ae_title).strip()
        self.sink.audit("association_accepted", listener=self.cfg.name,
                        calling_ae=str(rq.calling_ae_title).strip(), peer=self._peer(event))

    def _on_rejected(self, event: Any) -> None:
        rq = event.assoc.requestor.primitive
        calling = str(rq.calling_ae_title).strip() if rq is not None else ""
        called = str(rq.called_ae_title).strip() if rq is not None else ""
        cert_aets = getattr(event.assoc, "cert_aets", None)
        if cert_aets is not None and calling not in cert_aets:
            reason = (f"calling AE title not bound to the client certificate "
                      f"({event.assoc.cert_names}) in tls.client_cert_aets")
        elif not self.cfg.any_calling_aet and calling not in self.cfg.calling_aets:
            reason = REJECT_REASONS[(1, 1, 3)]
        elif called != self.cfg.ae_title:
            reason = REJECT_REASONS[(1, 1, 7)]
        else:
            reason = REJECT_REASONS[(2, 3, 2)]
        info = self.board.get(id(event.assoc))
        if info is not None:
            info.calling_ae, info.called_ae = calling, called
        self.board.close(id(event.assoc), "rejected", reason)
        log.warning("listener %s: rejected association from %s (calling %s, called %s): %s",
                    self.cfg.name, self._peer(event), calling, called, reason)
        self.sink.audit("association_rejected", listener=self.cfg.name, calling_ae=calling,
                        peer=self._peer(event), detail=f"{reason} (called AE {called})")

    def _on_released(self, event: Any) -> None:
        self.board.close(id(event.assoc), "released")

    def _on_aborted(self, event: Any) -> None:
        self.board.close(id(event.assoc), "aborted")

    def _on_closed(self, event: Any) -> None:
        adapt.release_waiting_acceptor(event.assoc)   # gone before its A-ASSOCIATE-RQ
        key = id(event.assoc)
        with self._received_lock:
            self._received.pop(key, None)
        info = self.board.close(key, "aborted", "connection closed")
        if info is not None and not info.calling_ae and info.status == "aborted":
            # Never got as far as an association request: a port scan, an HTTP
            # client, or a silent peer dropped at the deadline.
            log.info("listener %s: connection from %s closed before association",
                     self.cfg.name, info.peer)

    def _on_data(self, event: Any) -> None:
        """Bound what a peer can make us hold: abort before an object exceeds the limit.
        Counts P-DATA-TF bytes of the DIMSE message in progress."""
        data = event.data
        if not data or data[0] != 0x04:
            return
        key = id(event.assoc)
        with self._received_lock:
            total = self._received.get(key, 0) + len(data)
            self._received[key] = total
        if total > self.max_object_bytes + 1024 * 1024:
            with self._received_lock:
                self._received[key] = -(1 << 62)   # report once
            info = self.board.get(key)
            if info is not None:
                info.refused += 1
                info.reason = "object exceeds store.max_object_mb"
            log.warning("listener %s: aborting association from %s: object exceeds "
                        "store.max_object_mb (%d MiB)", self.cfg.name, self._peer(event),
                        self.max_object_bytes // (1024 * 1024))
            self.sink.audit("refused", listener=self.cfg.name, peer=self._peer(event),
                            status="abort", detail="object exceeds store.max_object_mb")
            event.assoc.abort()

    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int:
        key = id(event.assoc)
        with self._received_lock:
            self._received[key] = 0
        info = self.board.get(key)
        request = event.request
        ts = str(event.context.transfer_syntax)
        stream = request.DataSet
        view = stream.getbuffer()
        size = len(view)
        calling = info.calling_ae if info else ""
        peer = self._peer(event)
        try:
            status, outcome = self._store(view, ts, request, calling, peer, info.key if info else "")
        finally:
            view.release()
        if info is not None:
            if status == STATUS_SUCCESS:
                info.objects += 1
                info.bytes += size
            else:
                info.refused += 1
                info.reason = outcome
        return status

    def _store(self, view: memoryview, ts: str, request: Any, calling: str,
               peer: str, association: str = "") -> tuple[int, str]:
        return store_object(
            self.sink, self.cfg.name, view, ts,
            str(request.AffectedSOPClassUID or "").strip("\0 "),
            str(request.AffectedSOPInstanceUID or "").strip("\0 "),
            calling=calling, peer=peer, association=association,
            accept_deflate=self.cfg.accept_deflate, max_object_bytes=self.max_object_bytes)


# ---------------------------------------------------------------------------
# The C-STORE status decision, shared by both upper layers (this listener and
# mfconsole/ul/acceptor.py): what to answer for a data set, and the ingest itself.

def store_object(sink: IngestSink, listener: str, view: memoryview, ts: str, cmd_class: str,
                 cmd_inst: str, *, calling: str, peer: str, association: str,
                 accept_deflate: bool, max_object_bytes: int) -> tuple[int, str]:
    """(C-STORE status, outcome or refusal reason) for one received data set; the
    data set is ingested (and committed) when the status is Success. Blocks for the
    group commit: never call it on an event loop."""
    if len(view) > max_object_bytes:
        reason = "object exceeds store.max_object_mb"
        refused(sink, listener, STATUS_OUT_OF_RESOURCES, reason, calling, peer, None)
        return STATUS_OUT_OF_RESOURCES, reason
    try:
        summary = scan_dataset(view, ts, allow_deflate=accept_deflate)
    except DatasetRejected as exc:
        refused(sink, listener, exc.status, exc.reason, calling, peer, None)
        return exc.status, exc.reason
    return commit_object(sink, listener, view, summary, ts, cmd_class, cmd_inst,
                         calling=calling, peer=peer, association=association)


def commit_object(sink: IngestSink, listener: str, data: Any, summary: HeaderSummary, ts: str,
                  cmd_class: str, cmd_inst: str, *, calling: str, peer: str,
                  association: str) -> tuple[int, str]:
    """The rest of store_object once the data set is scanned: the command must name
    the data set's SOP class and instance, then the sink ingests ``data`` (the bytes,
    or the blob a streamed object was sealed into as it arrived)."""
    if cmd_class != summary.sop_class_uid or cmd_inst != summary.sop_instance_uid:
        reason = "command SOP Class/Instance UID does not match the data set"
        refused(sink, listener, STATUS_MISMATCH, reason, calling, peer, summary.sop_instance_uid)
        return STATUS_MISMATCH, reason
    meta = {"transfer_syntax": ts, "listener": listener, "calling_ae": calling,
            "peer": peer, "association": association}
    try:
        outcome = sink.ingest(data, summary, meta)
    except Exception as exc:
        log.error("listener %s: store failed for %s from %s: %s; answered 0xA700",
                  listener, summary.sop_instance_uid, calling, exc.__class__.__name__)
        return STATUS_OUT_OF_RESOURCES, "store failure"
    log.debug("listener %s: %s %s from %s", listener, outcome, summary.sop_instance_uid, calling)
    return STATUS_SUCCESS, outcome


def refused(sink: IngestSink, listener: str, status: int, reason: str, calling: str, peer: str,
            sop_instance_uid: str | None) -> None:
    log.warning("listener %s: refused object from %s (%s) with 0x%04X: %s",
                listener, calling, peer, status, reason)
    sink.audit("refused", listener=listener, calling_ae=calling, peer=peer,
               status=f"0x{status:04X}", detail=reason, sop_instance_uid=sop_instance_uid)
