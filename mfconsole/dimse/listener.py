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
from typing import Any, Callable, Protocol

from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, _config, acse, evt
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from mfconsole import tls
from mfconsole.config import ListenerConfig, is_loopback
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

    def ingest(self, data: memoryview, summary: HeaderSummary, meta: dict[str, Any]) -> str: ...
    def audit(self, event: str, **fields: Any) -> None: ...


# ---------------------------------------------------------------------------
# Unrestricted storage, our way. Modalities send private SOP classes (vendor raw
# data, private SRs); they must be stored, not refused. pynetdicom's own unrestricted
# mode accepts *any* proposed transfer syntax (Deflate included), so instead we add a
# context with our transfer syntaxes for each private/unknown abstract syntax proposed
# and negotiate normally.

def _storage_like(uid: UID) -> bool:
    from pynetdicom import sop_class

    return uid.is_private or not hasattr(sop_class, uid.keyword or "_none_")


def _negotiate_unrestricted(rq_contexts: list[PresentationContext],
                            ac_contexts: list[PresentationContext], roles: Any = None) -> Any:
    known = {cx.abstract_syntax for cx in ac_contexts}
    storage_ts = next((cx.transfer_syntax for cx in ac_contexts
                       if cx.abstract_syntax != Verification), [IMPLICIT_LE])
    extra = []
    for rq in rq_contexts:
        uid = UID(rq.abstract_syntax)
        if uid not in known and _storage_like(uid):
            cx = PresentationContext()
            cx.abstract_syntax = uid
            cx.transfer_syntax = list(storage_ts)
            extra.append(cx)
            known.add(uid)
    return negotiate_as_acceptor(rq_contexts, list(ac_contexts) + extra, roles)


_config.UNRESTRICTED_STORAGE_SERVICE = True
acse.negotiate_unrestricted = _negotiate_unrestricted  # type: ignore[assignment]


# Calling AE titles bound to a client certificate (tls.client_cert_aets): the listener
# puts the titles the peer's certificate may use on the association (``cert_aets``);
# any other calling AE title is refused the way pynetdicom refuses one that is not in
# calling_aets, with A-ASSOCIATE-RJ 1/1/3, before anything else is negotiated.
_negotiate_as_acceptor = acse.ACSE._negotiate_as_acceptor


def _negotiate_cert_bound(self: acse.ACSE) -> None:
    allowed = getattr(self.assoc, "cert_aets", None)
    rq = self.requestor.primitive
    if allowed is not None and rq is not None and str(rq.calling_ae_title).strip() not in allowed:
        self.requestor.ae_title = rq.calling_ae_title
        self.send_reject(0x01, 0x01, 0x03)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()
        return
    _negotiate_as_acceptor(self)


acse.ACSE._negotiate_as_acceptor = _negotiate_cert_bound  # type: ignore[method-assign]


# ---------------------------------------------------------------------------
# Sockets: see sockets.py.


def _server_context(cfg: Any) -> ssl.SSLContext:
    return sockets.dicom_context(tls.server_context(cfg))


class _Server(ThreadedAssociationServer):
    """pynetdicom's server with our socket options and a read deadline per socket."""

    daemon_threads = True
    network_timeout: float = 60.0
    # socketserver's default listen backlog is 5: a burst of connections (modalities
    # reconnecting after an outage, parallel senders, a few silent peers) overflows it
    # and the kernel makes the rest retry their handshake a second or more later.
    request_queue_size = socket.SOMAXCONN

    # With TLS, the listener's handshake: it runs on the connection's own thread, never
    # in get_request (the accept loop), and returns the TLS socket or None (refused).
    handshake: Callable[[socket.socket, Any], ssl.SSLSocket | None] | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        raw, address = self.socket.accept()  # type: ignore[union-attr]
        sock = sockets.adopt(raw)
        # A peer that stops mid-PDU must not hold its thread forever.
        sock.settimeout(self.network_timeout)
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.handshake is not None:
            request = self.handshake(request, client_address)
            if request is None:
                return
            request.settimeout(self.network_timeout)
        super().process_request_thread(request, client_address)


class _SharedContexts(list):
    """The listener's supported presentation contexts, shared by every association.

    pynetdicom deep-copies the server's contexts for each new association: with every
    Storage SOP class times our transfer syntaxes that costs tens of milliseconds of
    GIL per association, and modalities often open one association per object.
    Negotiation only reads the acceptor's contexts (it builds new ones for the
    result), so one read-only list serves all associations."""

    def __deepcopy__(self, memo: dict) -> "_SharedContexts":
        return self


class _AE(AE):
    """An AE whose ``max_associations`` counts only peers that asked for an association.

    pynetdicom counts every accepted TCP connection, so a handful of silent or stalled
    connections (each dropped only at its ARTIM/network deadline) would lock real
    modalities out with "local limit exceeded". Connections that have not sent an
    A-ASSOCIATE-RQ are bounded by those deadlines instead.
    """

    @property
    def active_associations(self) -> list[Any]:
        return [a for a in super().active_associations
                if not a.is_acceptor or a.requestor.primitive is not None]


# Largest non-P-DATA PDU we read (an A-ASSOCIATE-RQ with 128 contexts and user
# identity is far below this). P-DATA-TF is bounded by the max PDU we advertise.
_MAX_CONTROL_PDU = 1024 * 1024
# Tolerance over the advertised max PDU for peers that count the PDU header in it.
_PDU_SLACK = 1024
_PDU_TYPES = frozenset(range(1, 8))


def _bound_pdu_reads(asock: Any, max_pdata: int, deadline_s: float, on_refuse: Any) -> None:
    """Replace ``asock.recv`` (pynetdicom's AssociationSocket) with a bounded reader.

    pynetdicom reads a PDU as recv(6) for the header, then recv(length) for the body:
    it would read (and hold) whatever length a peer declares, and each socket read
    gets the full network timeout, so a peer dripping a byte at a time holds the
    thread forever. Here a declared length over the limit closes the connection
    before anything is read, and a whole PDU must arrive within ``deadline_s`` of
    its first byte. An OSError is how pynetdicom's DUL learns the transport is gone.
    """
    state: dict[str, Any] = {"pdu_type": None, "deadline": 0.0}

    def read(nr_bytes: int) -> bytearray:
        # Into one buffer of the (already bounded) declared size: a P-DATA PDU of a
        # large object arrives in a few big reads instead of many small copies.
        raw = asock.socket
        buf = bytearray(nr_bytes)
        got = 0
        shrunk = False
        with memoryview(buf) as view:
            try:
                while got < nr_bytes:
                    left = state["deadline"] - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("PDU not received within the network timeout")
                    if left < deadline_s:
                        raw.settimeout(left)
                        shrunk = True
                    n = raw.recv_into(view[got:])
                    if not n:
                        break   # peer closed: pynetdicom sees the short read
                    got += n
            finally:
                if shrunk:
                    try:
                        raw.settimeout(deadline_s)   # what get_request set: sends use it too
                    except OSError:
                        pass
        if got < nr_bytes:
            del buf[got:]
        return buf

    def recv(nr_bytes: int) -> bytearray:
        pdu_type = state["pdu_type"]
        if pdu_type is None:   # a PDU header
            state["deadline"] = time.monotonic() + deadline_s
            data = read(nr_bytes)
            if len(data) == 6 and data[0] in _PDU_TYPES:
                state["pdu_type"] = data[0]
            return data
        state["pdu_type"] = None   # the body of the PDU whose header we just read
        limit = max_pdata + _PDU_SLACK if pdu_type == 0x04 else _MAX_CONTROL_PDU
        if nr_bytes > limit:
            on_refuse(pdu_type, nr_bytes, limit)
            raise OSError(f"PDU length {nr_bytes} exceeds {limit}")
        return read(nr_bytes)

    asock.recv = recv


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


class AssociationBoard:
    """Live and recent associations, lock-protected, read by snapshots."""

    def __init__(self, keep: int = 200):
        self._lock = threading.Lock()
        self._live: dict[int, AssociationInfo] = {}
        self._recent: list[AssociationInfo] = []
        self._keep = keep
        self._seq = 0

    def open(self, key: int, listener: str, peer: str) -> AssociationInfo:
        with self._lock:
            self._seq += 1
            info = AssociationInfo(id=f"{listener}-{self._seq}", listener=listener, peer=peer)
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
        self.server: _Server | None = None
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
        ae = _AE(ae_title=cfg.ae_title)
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
        server = ae.make_server((cfg.host, cfg.port), evt_handlers=handlers, server_class=_Server)
        server.network_timeout = cfg.network_timeout_s
        if self._tls is not None:
            server.handshake = self._handshake
        server.contexts = _SharedContexts(server.contexts)
        ae._servers.append(server)   # shutdown() expects to find itself there
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
        # ARTIM bounds the wait for A-ASSOCIATE-RQ: a silent client is dropped.
        event.assoc.dul.artim_timer.timeout = self.cfg.acse_timeout_s
        # Before the association's reactor starts: bound what and how slowly it reads.
        peer = self._peer(event)
        _bound_pdu_reads(event.assoc.dul.socket, self.cfg.max_pdu_kb * 1024,
                         self.cfg.network_timeout_s,
                         lambda pdu_type, length, limit: self._oversize_pdu(peer, pdu_type, length, limit))
        info = self.board.open(id(event.assoc), self.cfg.name, peer)
        conn = event.assoc.dul.socket.socket
        if isinstance(conn, ssl.SSLSocket):
            info.tls = tls.describe(conn)
            if self.cfg.tls is not None and self.cfg.tls.client_cert_aets:
                names = tls.identities(conn.getpeercert())
                event.assoc.cert_aets = self.cfg.tls.aets_for(names)
                event.assoc.cert_names = ", ".join(sorted(names)) or "no name"

    def _oversize_pdu(self, peer: str, pdu_type: int, length: int, limit: int) -> None:
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
        assoc = event.assoc
        if assoc.is_acceptor and assoc.requestor.primitive is None and assoc.dul.to_user_queue.empty():
            # pynetdicom's acceptor thread keeps waiting acse_timeout for an
            # A-ASSOCIATE-RQ after the connection is gone (holding two threads, and
            # making a stop wait); None is what it gets when that wait times out.
            assoc.dul.to_user_queue.put(None)
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
            status, outcome = self._store(view, ts, request, calling, peer)
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
               peer: str) -> tuple[int, str]:
        if len(view) > self.max_object_bytes:
            reason = "object exceeds store.max_object_mb"
            self._refused(STATUS_OUT_OF_RESOURCES, reason, calling, peer, None)
            return STATUS_OUT_OF_RESOURCES, reason
        try:
            summary = scan_dataset(view, ts, allow_deflate=self.cfg.accept_deflate)
        except DatasetRejected as exc:
            self._refused(exc.status, exc.reason, calling, peer, None)
            return exc.status, exc.reason
        cmd_class = str(request.AffectedSOPClassUID or "").strip("\0 ")
        cmd_inst = str(request.AffectedSOPInstanceUID or "").strip("\0 ")
        if cmd_class != summary.sop_class_uid or cmd_inst != summary.sop_instance_uid:
            reason = "command SOP Class/Instance UID does not match the data set"
            self._refused(STATUS_MISMATCH, reason, calling, peer, summary.sop_instance_uid)
            return STATUS_MISMATCH, reason
        meta = {"transfer_syntax": ts, "listener": self.cfg.name, "calling_ae": calling,
                "peer": peer}
        try:
            outcome = self.sink.ingest(view, summary, meta)
        except Exception as exc:
            log.error("listener %s: store failed for %s from %s: %s; answered 0xA700",
                      self.cfg.name, summary.sop_instance_uid, calling, exc.__class__.__name__)
            return STATUS_OUT_OF_RESOURCES, "store failure"
        log.debug("listener %s: %s %s from %s", self.cfg.name, outcome,
                  summary.sop_instance_uid, calling)
        return STATUS_SUCCESS, outcome

    def _refused(self, status: int, reason: str, calling: str, peer: str,
                 sop_instance_uid: str | None) -> None:
        log.warning("listener %s: refused object from %s (%s) with 0x%04X: %s",
                    self.cfg.name, calling, peer, status, reason)
        self.sink.audit("refused", listener=self.cfg.name, calling_ae=calling, peer=peer,
                        status=f"0x{status:04X}", detail=reason,
                        sop_instance_uid=sop_instance_uid)

