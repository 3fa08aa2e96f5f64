"""The listener: a C-STORE / C-ECHO SCP on mfconsole's own upper layer (PS3.8), one
asyncio event loop thread serving every connection of a listener.

Why our own: pynetdicom gives each connection two polling threads (DUL and reactor),
from the TCP accept on; a hundred idle sockets cost two hundred threads and a core
and a half, and its throughput was half of Orthanc's. Here an idle connection is a
coroutine waiting on a socket. The blocking part
of a C-STORE, the ingest (it waits for the store's group commit), runs in a small
fixed pool (max_associations workers): never on the loop thread.

Per connection (``_Connection.run``) the state machine of PS3.8 9.2, acceptor side:
  awaiting A-ASSOCIATE-RQ (ARTIM: acse_timeout_s for its first byte)
  -> associated (P-DATA, A-RELEASE-RQ, A-ABORT; network_timeout_s of silence
     between messages, dimse_timeout_s inside one)
  -> closing (after our A-ASSOCIATE-RJ / A-RELEASE-RP / A-ABORT: ARTIM again for the
     peer to close, then we close).
With a tls table the listener runs its own accept loop (``_serve_tls``): each
accepted socket first waits for one byte (peeked, so a cleartext A-ASSOCIATE-RQ is
recognised and refused), then its TLS handshake runs on the loop as a coroutine,
acse_timeout_s for both in all; the policy and context are mfconsole.tls's (as for
every TLS connection of mfconsole). A handshaking connection counts as not yet associated.
Every PDU, once its first byte is in, must arrive whole within network_timeout_s,
and a declared length over the limit (1 MiB for control PDUs, the max PDU length
we advertised for P-DATA) is refused with A-ABORT before any of its body is read.
We never send A-RELEASE-RQ (an acceptor of storage has nothing to release), so a
release collision cannot arise from our side; at stop, associations still running
after shutdown_timeout_s are aborted.

What is not about bytes on the wire (IngestSink, AssociationBoard rows, the C-STORE
status decision) is mfconsole/dimse/listener.py.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import resource
import socket
import threading
import time
from asyncio import sslproto
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from mfconsole import tls
from mfconsole.config import ListenerConfig, is_loopback
from mfconsole.dimse import cstore
from mfconsole.dimse.listener import (DEFLATED_LE, STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS,
                                      AssociationBoard, AssociationInfo, IngestSink, begin_store,
                                      refused, store_object)
from mfconsole.dimse.dataset_scan import can_stream
from mfconsole.ul import dimse, incoming, negotiation, pdu

log = logging.getLogger("mfconsole.listener")

MAX_CONTROL_PDU = 1024 * 1024        # an A-ASSOCIATE-RQ with 128 contexts is ~20 KiB
PDU_SLACK = 1024                     # peers that count the PDU header in the max length
# A-ASSOCIATE-RQs over LARGE_RQ bytes (real ones are a few KiB) are read only while all
# such bodies being read fit in RQ_BUDGET: thousands of connections each declaring
# 1 MiB would otherwise make us hold gigabytes before any of them is associated.
LARGE_RQ, RQ_BUDGET = 64 * 1024, 16 * 1024 * 1024
ABORT_OVER = 1024 * 1024             # the listener's abort threshold over max_object_mb
# Objects up to this size are scanned and sealed on the event loop (SHA-256 and AES-GCM
# of 64 KiB: well under a millisecond); larger ones, and deflated ones (inflating may
# take long), on the listener's worker pool.
ON_LOOP_MAX = 64 * 1024
STATUS_UNRECOGNIZED_OPERATION = 0x0211
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


BUDGET_REFUSAL = "out of resources: in-flight budget"


class InflightBudget:
    """Data set bytes held in memory by every association of every listener on this
    upper layer, from an object's first fragment until it is committed or refused
    (store.inflight_mb). Shared across listeners' loop threads, hence the lock.

    An object alone in flight may go over the limit (up to max_object_mb): were it
    refused, a sender retrying an object bigger than the budget would be refused
    forever. With others in flight, a fragment that would go over is refused, so of
    two objects competing for the budget one always goes on."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0        # the most ever held at once (bench/ul_inflight.py, tests)
        self.refusals = 0
        self._lock = threading.Lock()

    def take(self, n: int, held: int) -> bool:
        """Reserve ``n`` more bytes for an object that holds ``held`` already."""
        with self._lock:
            if self.used + n > self.limit and self.used > held:
                self.refusals += 1
                return False
            self.used += n
            if self.used > self.peak:
                self.peak = self.used
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class _Quiet:
    """One kind of per-connection log line (closed before association, a failed TLS
    handshake): the first FEW of an INTERVAL are logged as they come, the rest only
    counted, in one summary line at the end of each interval while they last. A
    connect/close flood must not flood the log (nor cost a line of I/O per
    connection on the loop thread). The audit trail still has every refusal."""

    FEW, INTERVAL = 5, 10.0

    def __init__(self, listener: str, what: str):
        self.listener, self.what = listener, what
        self._window = -1e9
        self._count = 0
        self._suppressed = 0
        self._timer: asyncio.TimerHandle | None = None

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if self._timer is None and now - self._window >= self.INTERVAL:
            self._window, self._count = now, 0
        self._count += 1
        if self._count <= self.FEW and self._timer is None:
            log.log(level, msg, *args)
            return
        self._suppressed += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, self._window + self.INTERVAL - now), self.flush, True)

    def flush(self, again: bool = False) -> None:
        """The summary line; with ``again``, another interval of quiet follows if
        there was anything to count in this one."""
        self._timer = None
        suppressed, self._suppressed = self._suppressed, 0
        if not suppressed:
            return
        log.warning("listener %s: %d more %s in the last %g s (not logged one by one)",
                    self.listener, suppressed, self.what, self.INTERVAL)
        if again:
            self._window = time.monotonic()
            self._timer = asyncio.get_running_loop().call_later(self.INTERVAL, self.flush, True)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()


class _Closed(Exception):
    """The connection is over (closed by the peer, aborted, or timed out)."""


def pending_limits(cfg: ListenerConfig) -> tuple[int, int]:
    """(all, per peer address) connections not yet associated: the configured ones,
    never over half the process's file descriptors (so idle sockets can never starve
    the store and the associations of descriptors). 0 means that bound (at most 8192),
    and half of it per address."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
    bound = max(64, soft // 2)
    total = min(cfg.max_pending_connections or 8192, bound)
    per_address = min(cfg.max_pending_per_address or max(16, total // 2), total)
    return total, per_address


class Listener:
    """One configured listener: start, stop, reconfigure (what it can take live), its
    bound address."""

    # Settings a running listener takes for its next association; the others (address,
    # TLS, transfer syntaxes, PDU size) need the listener restarted.
    LIVE_KEYS = ("ae_title", "calling_aets", "max_associations", "acse_timeout_s",
                 "dimse_timeout_s", "network_timeout_s", "max_pending_connections",
                 "max_pending_per_address")
    # A hook for user identity negotiation (negotiation.UserIdentityHook); None: the
    # item is ignored.
    user_identity: negotiation.UserIdentityHook | None = None

    def __init__(self, cfg: ListenerConfig, sink: IngestSink, board: AssociationBoard,
                 max_object_bytes: int, *, inflight: InflightBudget | None = None):
        self.cfg = cfg
        # Without the engine's budget (shared by all listeners), one of our own.
        self.inflight = inflight if inflight is not None else InflightBudget(512 * 1024 * 1024)
        self.quiet = {what: _Quiet(cfg.name, what) for what in (
            "connection(s) closed before association", "connection(s) that sent no DICOM PDU",
            "TLS handshake failure(s)", "connection(s) closed before the TLS handshake")}
        self.sink = sink
        self.board = board
        self.max_object_bytes = max_object_bytes
        self.started_at: float | None = None
        self.pending_max, self.pending_per_peer = pending_limits(cfg)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._conns: set[_Connection] = set()
        self._pending_by_peer: collections.Counter[str] = collections.Counter()
        self.associated = 0
        self._pending = 0
        self.large_rq_bytes = 0          # bodies of large A-ASSOCIATE-RQs being read
        self._dropped = 0
        self._dropped_logged = 0.0
        self._failure = ""
        self._tls: tls.Reloading | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    # -- lifecycle (engine thread) --------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            return (self.cfg.host, self.cfg.port)
        host, port = self._sock.getsockname()[:2]
        return (str(host), int(port))

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        cfg = self.cfg
        # Before any socket: certificate files that became unusable since the config
        # was loaded stop the start (TLSSetupError is an OSError naming the key).
        self._tls = tls.Reloading(tls.server_context, cfg.tls) if cfg.tls else None
        if self._tls is not None:
            self._tls.get()
        # Bound here, so a port in use is an OSError for the engine.
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self._sock = socket.create_server((cfg.host, cfg.port), family=family,
                                          backlog=socket.SOMAXCONN)
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.max_associations),
                                        thread_name_prefix=f"ingest-{cfg.name}")
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name=f"listener-{cfg.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if self._server is None:   # the loop could not serve the socket: nothing listens
            failure = self._failure
            self.stop(0)
            raise OSError(f"the event loop did not start: {failure or 'no answer within 10 s'}")
        self.started_at = time.time()
        mode = ("mTLS" if cfg.tls.require_client_cert else "TLS") if cfg.tls else "cleartext"
        log.info("listener %s: %s listening on %s:%d (%s, mfconsole upper layer)",
                 cfg.name, cfg.ae_title, *self.address, mode)
        if cfg.tls is None and not is_loopback(cfg.host):
            log.warning("listener %s: cleartext on %s, a non-loopback address (allow_cleartext = "
                        "true): PHI crosses the network unencrypted", cfg.name, cfg.host)

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        # limit: the StreamReader's buffer high-water mark; a P-DATA PDU of our max
        # length fits without the transport pausing in the middle of it.
        try:
            if self._tls is not None:
                self._server = _AcceptLoop(loop.create_task(self._serve_tls()))
            else:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._accept, sock=self._sock, limit=self._buffer_limit()))
        except Exception as exc:
            self._failure = exc.__class__.__name__
        finally:
            ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _buffer_limit(self) -> int:
        return max(65536, self.cfg.max_pdu_kb * 1024 + PDU_SLACK)

    def reconfigure(self, cfg: ListenerConfig) -> bool:
        """Only LIVE_KEYS change in place (read per association); False otherwise."""
        if replace(cfg, **{k: getattr(self.cfg, k) for k in self.LIVE_KEYS}) != self.cfg:
            return False
        self.cfg = cfg
        self.pending_max, self.pending_per_peer = pending_limits(cfg)
        return True

    def stop(self, timeout: float) -> None:
        """Stop accepting, let associations in progress finish (bounded), then abort."""
        loop = self._loop
        if loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), loop)
        try:
            future.result(timeout + 10)
        except Exception as exc:   # the loop is stopped below in any case
            log.error("listener %s: stop: %s", self.cfg.name, exc.__class__.__name__)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        if self._pool is not None:
            self._pool.shutdown(wait=True)   # an ingest in progress ends with its commit
        if self._sock is not None:
            self._sock.close()   # closed with the server already, unless it never served
        self._loop = self._thread = self._server = self._pool = None
        self._sock = None
        log.info("listener %s stopped", self.cfg.name)

    async def _shutdown(self, timeout: float) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handshakes):   # not associated yet: closed at once
            task.cancel()
        for conn in [c for c in self._conns if c.phase != "associated"]:
            conn.close()
        deadline = time.monotonic() + timeout
        while self.associated and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self._conns):
            conn.abort_and_close("listener stopped")
        while self._conns and time.monotonic() < deadline + 2:
            await asyncio.sleep(0.02)
        for quiet in self.quiet.values():   # what was counted is logged before we stop
            quiet.cancel()

    # -- connections (loop thread) ---------------------------------------------------

    def _over_limit(self, host: str) -> bool:
        """Pre-association bounds: the newest connection over a limit is closed at once."""
        if self.pending < self.pending_max and self._pending_by_peer[host] < self.pending_per_peer:
            return False
        self._dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged > 10:
            log.warning("listener %s: closed %d connection(s) over the limit of connections "
                        "without an association (%d in all, %d per address; latest from %s)",
                        self.cfg.name, self._dropped, self.pending_max, self.pending_per_peer, host)
            self._dropped, self._dropped_logged = 0, now
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("peername") or ("?", 0)
        host = str(address[0])
        if self._over_limit(host):
            writer.transport.abort()
            return
        conn = _Connection(self, reader, writer, host, f"{host}:{address[1]}")
        self._conns.add(conn)
        self._count(conn, "pending")
        try:
            await conn.run()
        finally:
            self._count(conn, "done")
            self._conns.discard(conn)
            conn.close()
            conn.finish()

    # -- TLS (loop thread) -------------------------------------------------------------

    async def _serve_tls(self) -> None:
        """Accept, and hand each socket to its own handshake task. Our loop rather than
        asyncio.start_server(ssl=...): that one takes one context for good (a renewed
        certificate must be taken at the next connection), reads before we can tell a
        cleartext A-ASSOCIATE-RQ from a ClientHello, and reports handshake failures to
        nobody (they must be audited)."""
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        self._sock.setblocking(False)
        while True:
            try:
                sock, address = await loop.sock_accept(self._sock)
            except OSError as exc:
                # Out of descriptors or buffers: the backlog waits a little, as asyncio's
                # own server does, rather than the loop spinning on the same failure.
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("listener %s: accept failed: %s", self.cfg.name, exc.strerror)
                    await asyncio.sleep(1)
                continue
            task = loop.create_task(self._tls_accept(sock, address))
            self._handshakes.add(task)           # held: the loop keeps only weak references
            task.add_done_callback(self._handshakes.discard)

    async def _tls_accept(self, sock: socket.socket, address: tuple) -> None:
        host = str(address[0])
        if self._over_limit(host):
            sock.close()
            return
        # Counted as a connection without an association while it handshakes.
        self._pending += 1
        self._pending_by_peer[host] += 1
        try:
            streams = await self._handshake(sock, f"{host}:{address[1]}")
        finally:
            self._pending -= 1
            self._pending_by_peer[host] -= 1
            if not self._pending_by_peer[host]:
                del self._pending_by_peer[host]
        if streams is not None:
            await self._accept(*streams)

    async def _handshake(self, sock: socket.socket, peer: str
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The server side of the handshake, within acse_timeout_s in all from the
        accept (a client dripping half a ClientHello gets no longer than a silent
        one); a failure is an audit event (peer and reason only)."""
        assert self._tls is not None
        loop = asyncio.get_running_loop()
        limit = self.cfg.acse_timeout_s
        deadline = loop.time() + limit
        try:
            first = await _peek(loop, sock, limit)
            if not first:   # a port scan or health check: nothing was attempted
                sock.close()
                self.quiet["connection(s) closed before the TLS handshake"].log(
                    logging.INFO, "listener %s: connection from %s closed before the TLS handshake",
                    self.cfg.name, peer)
                return None
            if first == b"\x01":   # PDU type 1: an A-ASSOCIATE-RQ, in cleartext
                return self._tls_refused(sock, peer, "the peer sent a cleartext association "
                                         "request; it must use TLS")
            ctx = self._tls.get()   # a stat of the files; rebuilt only when they changed
            reader = asyncio.StreamReader(limit=self._buffer_limit(), loop=loop)
            protocol = _StreamProtocol(reader, loop=loop)
            handshake = loop.create_future()
            # ssl_shutdown_timeout: a peer that never answers our close_notify holds
            # its descriptor no longer than ARTIM would (asyncio's default is 30 s).
            tls_protocol = _AlertingSSLProtocol(
                loop, protocol, ctx, handshake, server_side=True,
                ssl_handshake_timeout=max(0.01, deadline - loop.time()),
                ssl_shutdown_timeout=limit)
            raw, _ = await loop.connect_accepted_socket(lambda: tls_protocol, sock)
            try:
                await handshake
            except BaseException:
                raw.abort()
                raise
            assert protocol.transport is not None
            return reader, asyncio.StreamWriter(protocol.transport, protocol, reader, loop)
        except TimeoutError:
            return self._tls_refused(sock, peer, f"not completed within acse_timeout_s={limit:g}")
        except ConnectionAbortedError as exc:
            if "taking longer" in str(exc):   # asyncio's ssl_handshake_timeout
                return self._tls_refused(sock, peer, f"not completed within acse_timeout_s={limit:g}")
            return self._tls_refused(sock, peer, tls.failure_reason(exc))
        except (OSError, ValueError) as exc:
            return self._tls_refused(sock, peer, tls.failure_reason(exc))
        except asyncio.CancelledError:   # the listener stops: nothing to audit
            sock.close()
            raise

    def _tls_refused(self, sock: socket.socket, peer: str, why: str) -> None:
        sock.close()
        self.quiet["TLS handshake failure(s)"].log(
            logging.WARNING, "listener %s: TLS handshake with %s failed: %s", self.cfg.name, peer, why)
        self.sink.audit("refused", listener=self.cfg.name, peer=peer, status="TLS",
                        detail=f"TLS handshake failed: {why}")

    def _count(self, conn: "_Connection", phase: str) -> None:
        """Move ``conn`` to ``phase``: pending (no association: not yet, or no more,
        lingering after a release, rejection or abort until the peer closes; the
        pre-association limits bound these, so lingering cannot bypass them),
        associated (max_associations), done (closed)."""
        if conn.phase == "pending":
            self._pending -= 1
            self._pending_by_peer[conn.host] -= 1
            if not self._pending_by_peer[conn.host]:
                del self._pending_by_peer[conn.host]
        elif conn.phase == "associated":
            self.associated -= 1
        conn.phase = phase
        if phase == "pending":
            self._pending += 1
            self._pending_by_peer[conn.host] += 1
        elif phase == "associated":
            self.associated += 1


class _AlertingSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS (what loop.start_tls builds), except that a failed handshake
    sends its alert: asyncio closes the socket without flushing what OpenSSL wrote,
    so a peer refused for its protocol version or suites would see a bare EOF
    instead of the alert naming why."""

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            try:
                self._process_outgoing()   # the alert, written at once (a few bytes)
            except Exception:
                pass
        super()._on_handshake_complete(handshake_exc)


class _StreamProtocol(asyncio.StreamReaderProtocol):
    """Keeps the TLS transport it is given when the handshake completes."""

    transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        super().connection_made(transport)


class _AcceptLoop:
    """The TLS accept task, with what the listener asks of an asyncio.Server."""

    def __init__(self, task: asyncio.Task[None]):
        self._task = task

    def close(self) -> None:
        self._task.cancel()


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float) -> bytes:
    """The first byte of a non-blocking socket, left in it (b"": closed), within
    ``timeout`` (else TimeoutError)."""
    fd = sock.fileno()
    async with asyncio.timeout(timeout):
        while True:
            ready = loop.create_future()
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            try:
                return sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue


class _Connection:
    def __init__(self, owner: Listener, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, host: str, peer: str):
        self.owner = owner
        self.cfg = owner.cfg           # the settings of the listener when it connected
        self.reader, self.writer = reader, writer
        self.host, self.peer = host, peer
        self.associated = False       # an A-ASSOCIATE-AC was sent (P-DATA may be read)
        self.phase = ""                # how the listener counts it: see _count
        self._large = 0                # bytes of RQ_BUDGET this connection holds
        self.held = 0                  # bytes of the in-flight budget it holds
        # A large object being sealed into its blob as it arrives (incoming.py), and
        # the pool's work on its latest chunk.
        self._streamed: incoming.Streamed | None = None
        self._feeding: asyncio.Future[None] | None = None
        self.max_send = 0              # the requestor's max PDU length (0: unlimited)
        self.contexts: dict[int, str] = {}
        # Storage Commitment contexts (reports only) and the destination that reports.
        self.reports: set[int] = set()
        self.reporter: str | None = None
        self.status = "aborted"        # the board status if it ends without one
        self.reason = "connection closed"
        self.info: AssociationInfo = owner.board.open(id(self), self.cfg.name, peer)
        # Over TLS: the calling AE titles the client certificate may use (None: not
        # bound), and its names for the rejection reason.
        self.cert_aets: frozenset[str] | None = None
        self.cert_names = ""
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.info.tls = tls.describe(ssl_object)
            if self.cfg.tls is not None and self.cfg.tls.client_cert_aets:
                self._bind(ssl_object)
        sock = writer.get_extra_info("socket")
        self._sock = sock
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def _bind(self, ssl_object: object) -> None:
        """The AE titles of tls.client_cert_aets this certificate may call as. Fail
        closed: names that cannot be read bind no title (refused 1/1/3), never none."""
        assert self.cfg.tls is not None
        self.cert_aets = frozenset()
        try:
            names = tls.identities(ssl_object.getpeercert())   # type: ignore[attr-defined]
        except Exception as exc:
            log.error("listener %s: cannot read the client certificate's names from %s: %s",
                      self.cfg.name, self.peer, exc.__class__.__name__)
            self.cert_names = "names unreadable"
            return
        self.cert_aets = self.cfg.tls.aets_for(names)
        self.cert_names = ", ".join(sorted(names)) or "no name"

    # -- the state machine ------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        try:
            pdu_type, body = await self._read_pdu(cfg.acse_timeout_s, first=True)
            if pdu_type != pdu.ASSOCIATE_RQ:
                if pdu_type == pdu.ABORT:
                    self.reason = "aborted by the peer"
                else:
                    self.reason = f"{pdu.PDU_NAMES[pdu_type]} before an association"
                    await self._abort(pdu.UNEXPECTED_PDU)
                return
            if not await self._associate(body):
                return
            await self._associated()
        except _Closed:
            pass
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:   # a bug of ours: this connection ends, the listener serves on
            log.error("listener %s: association from %s aborted: %s", cfg.name, self.peer,
                      exc.__class__.__name__)
            log.debug("listener %s: traceback", cfg.name, exc_info=True)
            self.reason = f"internal error ({exc.__class__.__name__})"
            self.abort_and_close(self.reason)
        finally:
            self._release()   # an object cut short gives its bytes back
            self._drop_streamed()

    def _release(self) -> None:
        if self.held:
            self.owner.inflight.give(self.held)
            self.held = 0

    async def _associate(self, body: bytes) -> bool:
        try:
            rq = pdu.decode_associate_rq(body)
        except pdu.PDUError as exc:
            log.info("listener %s: malformed A-ASSOCIATE-RQ from %s: %s", self.cfg.name, self.peer, exc)
            await self._abort(exc.reason)
            return False
        owner = self.owner
        cfg = owner.cfg   # the current settings (reconfigure) decide the negotiation
        self.cfg = cfg
        reporter = self._commitment_peer(rq)
        decision = negotiation.negotiate(rq, cfg, owner.associated, owner.user_identity,
                                         self.cert_aets, self.cert_names,
                                         commitment=reporter is not None)
        self.info.calling_ae, self.info.called_ae = rq.calling_ae, rq.called_ae
        if decision.reject is not None:
            self.status, self.reason = "rejected", decision.reason
            log.warning("listener %s: rejected association from %s (calling %s, called %s): %s",
                        cfg.name, self.peer, rq.calling_ae, rq.called_ae, decision.reason)
            owner.sink.audit("association_rejected", listener=cfg.name, calling_ae=rq.calling_ae,
                             peer=self.peer, detail=f"{decision.reason} (called AE {rq.called_ae})")
            await self._send(pdu.encode_associate_rj(*decision.reject))
            self.finish()   # off the live board now; ARTIM follows
            await self._linger()
            return False
        await self._send(decision.ac)
        self.associated = True
        owner._count(self, "associated")
        self.contexts = decision.accepted
        self.reports, self.reporter = decision.commitment, reporter
        self.max_send = rq.max_length
        self.info.status = "active"
        owner.sink.audit("association_accepted", listener=cfg.name, calling_ae=rq.calling_ae,
                         peer=self.peer)
        return True

    def _commitment_peer(self, rq: pdu.AssociateRQ) -> str | None:
        """The destination a requestor proposing Storage Commitment is (None: not one
        that asks for it, and the context is refused, audited)."""
        if not any(cx.abstract_syntax == negotiation.STORAGE_COMMITMENT for cx in rq.contexts):
            return None
        lookup = getattr(self.owner.sink, "commitment_peer", None)
        found = lookup(rq.calling_ae, self.host) if lookup is not None else None
        if found is None:
            log.warning("listener %s: Storage Commitment refused to %s (calling %s): not a dimse "
                        "destination with storage_commitment", self.cfg.name, self.peer, rq.calling_ae)
            self.owner.sink.audit(
                "commitment_refused", listener=self.cfg.name, calling_ae=rq.calling_ae,
                peer=self.peer, status="user rejection",
                detail="Storage Commitment Push Model context refused: the peer is not a dimse "
                       "destination with storage_commitment (AE title and host)")
        return found

    async def _commitment_report(self, message: dimse.Command, cx_id: int,
                                 data: bytearray | memoryview) -> bytes:
        """An N-EVENT-REPORT-RQ of Storage Commitment: read, handed to the engine (on the
        pool: it waits for a commit), answered with the status the engine gives."""
        from mfconsole.dimse import commitment as sc

        try:
            report = sc.read_report(data, self.contexts[cx_id], message.event_type)
        except sc.CommitmentError as exc:
            log.warning("listener %s: storage commitment report from %s refused: %s",
                        self.cfg.name, self.peer, exc)
            self.owner.sink.audit("commitment_unmatched", listener=self.cfg.name, peer=self.peer,
                                  calling_ae=self.info.calling_ae, status="0x0110", detail=str(exc))
            return sc.event_report_response(message.message_id, message.event_type, 0x0110)
        sink, via = self.owner.sink, f"new association from {self.peer} on listener {self.cfg.name}"
        status = await asyncio.get_running_loop().run_in_executor(
            self.owner._pool, lambda: sink.commitment_report(report, via, self.reporter))
        return sc.event_report_response(message.message_id, message.event_type, status)

    async def _associated(self) -> None:
        cfg = self.cfg
        command = bytearray()
        message: dimse.Command | None = None
        message_cx = 0
        data: bytearray | memoryview | None = None
        received = 0          # data set bytes of the message in progress, kept or not
        dropping = False      # over the in-flight budget: its bytes are read and dropped
        pending = bytearray()  # a streamed object's bytes not yet handed to the pool
        while True:
            idle = cfg.network_timeout_s if (message is None and not command) else cfg.dimse_timeout_s
            pdu_type, body = await self._read_pdu(idle)
            if pdu_type == pdu.RELEASE_RQ:
                await self._send(pdu.encode_release_rp())
                self.status, self.reason = "released", ""
                self.owner._count(self, "pending")   # a new association may come while we linger
                self.finish()
                await self._linger()
                return
            if pdu_type == pdu.ABORT:
                self.reason = "aborted by the peer"
                return
            if pdu_type != pdu.P_DATA_TF:
                await self._abort(pdu.UNEXPECTED_PDU, f"{pdu.PDU_NAMES[pdu_type]} in an association")
                return
            try:
                pdvs = pdu.decode_pdata(memoryview(body))
            except pdu.PDUError as exc:
                await self._abort(exc.reason, f"malformed P-DATA-TF: {exc}")
                return
            for cx_id, control, fragment in pdvs:
                if cx_id not in self.contexts:
                    await self._abort(pdu.INVALID_PARAMETER,
                                      f"PDV for presentation context {cx_id}, not accepted")
                    return
                if control & 0x01:   # a command fragment
                    if message is not None or (command and cx_id != message_cx):
                        await self._abort(pdu.UNEXPECTED_PARAMETER, "command fragment out of order")
                        return
                    command += fragment
                    message_cx = cx_id
                    if len(command) > dimse.MAX_COMMAND_SET:
                        await self._abort(pdu.INVALID_PARAMETER, "command set too large")
                        return
                    if not control & 0x02:
                        continue
                    try:
                        message = dimse.decode_command(command)
                    except dimse.CommandError as exc:
                        await self._abort(pdu.INVALID_PARAMETER, f"unreadable command set: {exc}")
                        return
                    command = bytearray()
                    if message.has_data_set:
                        continue
                    await self._dispatch(message, message_cx, None)
                    message = None
                    continue
                # A data set fragment: only after a command that announced one.
                if message is None or not message.has_data_set or cx_id != message_cx:
                    await self._abort(pdu.UNEXPECTED_PARAMETER, "data set fragment without its command")
                    return
                last = bool(control & 0x02)
                received += len(fragment)
                if received > self.owner.max_object_bytes + ABORT_OVER:
                    await self._too_big()
                    return
                if self._streamed is not None:   # on its way into its blob
                    pending += fragment
                    if len(pending) >= incoming.HAND_OVER or last:
                        await self._hand_over(pending)
                        pending = bytearray()
                    if last:
                        await self._store_streamed(message, message_cx)
                        self._release()
                        message, received = None, 0
                    continue
                if not dropping and not self.owner.inflight.take(len(fragment), self.held):
                    dropping, data = True, None   # refused at its last fragment
                    self._release()
                if not dropping:
                    self.held += len(fragment)
                    if data is None and last:
                        data = fragment   # the whole data set in one PDV: no copy
                    else:
                        if not isinstance(data, bytearray):
                            data = bytearray(data or b"")
                        data += fragment
                        if not last and len(data) >= incoming.STREAM_AT \
                                and message.command_field == dimse.C_STORE_RQ \
                                and can_stream(self.contexts[message_cx]):
                            # Large: from here on it is sealed into its blob as it comes.
                            await self._stream(data, self.contexts[message_cx])
                            data = None
                            continue
                if last:
                    try:
                        if dropping:
                            await self._over_budget(message, message_cx)
                        else:
                            assert data is not None
                            await self._dispatch(message, message_cx, data)
                    finally:
                        data = None   # our last reference: the bytes go before the budget
                        self._release()
                    message, received, dropping = None, 0, False

    # -- streaming ingest (incoming.py) -----------------------------------------------

    async def _stream(self, first: bytearray, ts: str) -> None:
        loop = asyncio.get_running_loop()
        self._streamed = await loop.run_in_executor(
            self.owner._pool, incoming.Streamed, self.owner.sink, ts)
        await self._hand_over(first)

    async def _hand_over(self, chunk: bytearray) -> None:
        """Give ``chunk`` to the pool to be scanned and sealed, once the previous one is
        done: the next chunk is collected from the network meanwhile."""
        assert self._streamed is not None
        if self._feeding is not None:
            await self._feeding
        self._feeding = asyncio.get_running_loop().run_in_executor(
            self.owner._pool, self._streamed.feed, chunk)

    async def _store_streamed(self, message: dimse.Command, cx_id: int) -> None:
        streamed, owner, cfg, info = self._streamed, self.owner, self.cfg, self.info
        assert streamed is not None
        if self._feeding is not None:
            await self._feeding
            self._feeding = None
        try:
            status, outcome = await asyncio.get_running_loop().run_in_executor(
                owner._pool, lambda: streamed.store(
                    owner.sink, cfg.name, message.sop_class_uid, message.sop_instance_uid,
                    calling=info.calling_ae, peer=self.peer, association=info.key,
                    max_object_bytes=owner.max_object_bytes, called=info.called_ae))
        finally:
            self._streamed = None
        self._tally(status, outcome, streamed.size)
        rsp = cstore.response_set(cstore.C_STORE_RSP, message.message_id, message.sop_class_uid,
                                  status, message.sop_instance_uid)
        await self._send_message(cx_id, rsp)

    def _drop_streamed(self) -> None:
        """The connection ended inside a streamed object: its blob goes (after any feed
        in progress, which holds the object's lock)."""
        streamed, self._streamed = self._streamed, None
        if streamed is None:
            return
        try:
            assert self.owner._pool is not None
            self.owner._pool.submit(streamed.discard)
        except (RuntimeError, AssertionError):   # the pool is shutting down
            streamed.discard()

    # -- DIMSE ------------------------------------------------------------------------

    async def _dispatch(self, message: dimse.Command, cx_id: int,
                        data: bytearray | memoryview | None) -> None:
        field = message.command_field
        if cx_id in self.reports:   # the Storage Commitment context: reports only
            if field == dimse.N_EVENT_REPORT_RQ and data is not None:
                rsp = await self._commitment_report(message, cx_id, data)
            elif field & 0x8000:
                raise await self._abort_closed(pdu.UNEXPECTED_PARAMETER, "a DIMSE response sent to us")
            else:
                rsp = cstore.response_set(field | 0x8000, message.message_id, message.sop_class_uid,
                                          STATUS_UNRECOGNIZED_OPERATION)
        elif field == dimse.C_ECHO_RQ:
            rsp = cstore.response_set(cstore.C_ECHO_RSP, message.message_id,
                                      message.sop_class_uid or negotiation.VERIFICATION, STATUS_SUCCESS)
        elif field == dimse.C_STORE_RQ and data is not None:
            status = await self._store(message, self.contexts[cx_id], data)
            rsp = cstore.response_set(cstore.C_STORE_RSP, message.message_id, message.sop_class_uid,
                                      status, message.sop_instance_uid)
        elif field == dimse.C_CANCEL_RQ:
            return   # nothing of ours to cancel: C-STORE is answered once, whole
        elif field & 0x8000:
            raise await self._abort_closed(pdu.UNEXPECTED_PARAMETER, "a DIMSE response sent to us")
        else:
            rsp = cstore.response_set(field | 0x8000, message.message_id, message.sop_class_uid,
                                      STATUS_UNRECOGNIZED_OPERATION)
        await self._send_message(cx_id, rsp)

    async def _store(self, message: dimse.Command, ts: str, data: bytearray | memoryview) -> int:
        owner, cfg, info = self.owner, self.cfg, self.info
        with memoryview(data) as view:
            size = len(view)
            store = functools.partial(
                store_object if size > ON_LOOP_MAX or ts == DEFLATED_LE else begin_store,
                owner.sink, cfg.name, view, ts, message.sop_class_uid, message.sop_instance_uid,
                calling=info.calling_ae, peer=self.peer, association=info.key,
                accept_deflate=cfg.accept_deflate, max_object_bytes=owner.max_object_bytes,
                called=info.called_ae)
            if store.func is store_object:
                begun = await asyncio.get_running_loop().run_in_executor(owner._pool, store)
            else:
                # Small: scanned and sealed here (tens of microseconds), then only the
                # commit is waited for. A pool thread in between cost more than that.
                begun = store()
        status, outcome = begun if isinstance(begun, tuple) else await begun.wait_async()
        self._tally(status, outcome, size)
        return status

    def _tally(self, status: int, outcome: str, size: int) -> None:
        info = self.info
        if status == STATUS_SUCCESS:
            info.objects += 1
            info.bytes += size
        else:
            info.refused += 1
            info.reason = outcome

    async def _over_budget(self, message: dimse.Command, cx_id: int) -> None:
        """0xA700 for an object that would have gone over store.inflight_mb: transient,
        the sender retries it (its bytes were dropped as they came)."""
        cfg, info = self.cfg, self.info
        info.refused += 1
        info.reason = BUDGET_REFUSAL
        if message.command_field == dimse.C_STORE_RQ:
            refused(self.owner.sink, cfg.name, STATUS_OUT_OF_RESOURCES, BUDGET_REFUSAL,
                    info.calling_ae, self.peer, message.sop_instance_uid or None)
        rsp = cstore.response_set(message.command_field | 0x8000, message.message_id,
                                  message.sop_class_uid, STATUS_OUT_OF_RESOURCES,
                                  message.sop_instance_uid)
        await self._send_message(cx_id, rsp)

    async def _send_message(self, cx_id: int, command: bytes) -> None:
        """A command set without data set, in PDVs within the requestor's max length."""
        size = self.max_send - 6 if self.max_send > 6 else len(command)
        for start in range(0, len(command), size):
            last = 0x02 if start + size >= len(command) else 0x00
            await self._send(pdu.encode_pdata([(cx_id, 0x01 | last, command[start:start + size])]))

    async def _too_big(self) -> None:
        cfg, info = self.cfg, self.info
        info.refused += 1
        info.reason = "object exceeds store.max_object_mb"
        log.warning("listener %s: aborting association from %s: object exceeds "
                    "store.max_object_mb (%d MiB)", cfg.name, self.peer,
                    self.owner.max_object_bytes // (1024 * 1024))
        self.owner.sink.audit("refused", listener=cfg.name, peer=self.peer, status="abort",
                              detail="object exceeds store.max_object_mb")
        await self._abort(pdu.REASON_NOT_SPECIFIED)

    # -- transport ------------------------------------------------------------------------

    def _quickack(self) -> None:
        # Re-armed before every wait for bytes, as sockets.QuickAckSocket does before
        # each recv: a peer with Nagle on (DCMTK's default) holds the next segment of
        # a PDU (often its body, written apart from its header) until we ACK the last
        # one; a delayed ACK costs ~40 ms per object. Setting it also sends an ACK
        # that is due at once.
        if _QUICKACK is not None and self._sock is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass

    async def _read_pdu(self, idle: float, first: bool = False) -> tuple[int, bytes]:
        """The next PDU: its first byte within ``idle`` seconds, all of it within
        network_timeout_s of that byte; a declared length over the limit is refused
        before its body is read. One timer per PDU, moved once its first byte is in
        (a PDU is a few reads: a timer each cost a visible share of ingest CPU)."""
        reader = self.reader
        started = False          # the first byte is in: network_timeout_s applies
        length, body, busy = 0, b"", False
        try:
            async with asyncio.timeout(idle) as deadline:
                self._quickack()
                head = await reader.readexactly(1)
                pdu_type = head[0]
                if pdu_type not in pdu.PDU_TYPES:
                    # Not DICOM (an HTTP request, a TLS ClientHello, a scanner): nothing
                    # more of it is read, and no ARTIM: such a peer would not understand
                    # an A-ABORT.
                    self.owner.quiet["connection(s) that sent no DICOM PDU"].log(
                        logging.INFO, "listener %s: connection from %s sent no DICOM PDU "
                        "(first byte 0x%02X); closed", self.cfg.name, self.peer, pdu_type)
                    self.reason = "not a DICOM PDU"
                    self._abort_now(pdu.UNRECOGNIZED_PDU)
                started = True
                deadline.reschedule(asyncio.get_running_loop().time() + self.cfg.network_timeout_s)
                # The six-byte header travels in one segment; the body may follow in
                # another, held by a Nagle-on peer until we ACK: re-armed before it.
                rest = await reader.readexactly(5)
                length = int.from_bytes(rest[1:], "big")
                limit = (self.cfg.max_pdu_kb * 1024 + PDU_SLACK if pdu_type == pdu.P_DATA_TF
                         else MAX_CONTROL_PDU)
                if length > LARGE_RQ and pdu_type == pdu.ASSOCIATE_RQ and length <= limit:
                    busy = self.owner.large_rq_bytes + length > RQ_BUDGET
                    if not busy:
                        self._large = length
                        self.owner.large_rq_bytes += length
                # Before an association only an A-ASSOCIATE-RQ is read: the body of
                # anything else (P-DATA, say) is not.
                if length <= limit and not busy and (self.associated or pdu_type == pdu.ASSOCIATE_RQ) and length:
                    self._quickack()
                    body = await reader.readexactly(length)
        except TimeoutError:
            if started:
                self.reason = (f"PDU not received within network_timeout_s="
                               f"{self.cfg.network_timeout_s:g}")
                self._abort_now(pdu.REASON_NOT_SPECIFIED)
            if first:
                self.reason = f"no A-ASSOCIATE-RQ within acse_timeout_s={idle:g}"
            else:
                self.reason = f"nothing received for {idle:g} s"
                await self._abort(pdu.REASON_NOT_SPECIFIED)
            raise _Closed from None
        except asyncio.IncompleteReadError:
            if started:
                self.reason = "connection closed in the middle of a PDU"
            raise _Closed from None
        finally:
            self.owner.large_rq_bytes -= self._large
            self._large = 0
        if length > limit:
            self._oversize(pdu_type, length, limit)
            self._abort_now(pdu.INVALID_PARAMETER)
        if busy:
            self.reason = f"A-ASSOCIATE-RQ of {length} bytes while others hold the budget"
            log.warning("listener %s: closing connection from %s: A-ASSOCIATE-RQ declares %d bytes "
                        "while %d bytes of large requests are being read (budget %d)",
                        self.cfg.name, self.peer, length, self.owner.large_rq_bytes, RQ_BUDGET)
            self.owner.sink.audit("refused", listener=self.cfg.name, peer=self.peer, status="abort",
                                  detail=f"A-ASSOCIATE-RQ length {length} over the budget of large "
                                  f"requests ({RQ_BUDGET} bytes in all)")
            self._abort_now(pdu.REASON_NOT_SPECIFIED)
        if not self.associated and pdu_type not in (pdu.ASSOCIATE_RQ, pdu.ABORT):
            log.info("listener %s: PDU type 0x%02X from %s before an association; aborted",
                     self.cfg.name, pdu_type, self.peer)
        return pdu_type, body

    def _oversize(self, pdu_type: int, length: int, limit: int) -> None:
        log.warning("listener %s: closing connection from %s: PDU type 0x%02X declares %d "
                    "bytes (limit %d)", self.cfg.name, self.peer, pdu_type, length, limit)
        self.owner.sink.audit("refused", listener=self.cfg.name, peer=self.peer, status="abort",
                              detail=f"PDU type 0x{pdu_type:02X} length {length} exceeds {limit}")
        self.reason = f"PDU type 0x{pdu_type:02X} length {length} exceeds {limit}"

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        if not self.writer.transport.get_write_buffer_size():
            return     # the socket took it all: nothing to wait for (nor a timer to set)
        try:
            async with asyncio.timeout(self.cfg.network_timeout_s):
                await self.writer.drain()
        except TimeoutError:
            self.reason = "peer does not read"
            raise _Closed from None

    async def _abort(self, reason: int, why: str = "") -> None:
        """A-ABORT (provider), then ARTIM for the peer to close."""
        self.owner._count(self, "pending")
        if why:
            log.warning("listener %s: aborting association from %s: %s", self.cfg.name, self.peer, why)
            self.reason = why
        try:
            self.writer.write(pdu.encode_abort(pdu.ABORT_PROVIDER, reason))
            await self._linger()
        except (ConnectionError, OSError):
            pass

    async def _abort_closed(self, reason: int, why: str = "") -> _Closed:
        await self._abort(reason, why)
        return _Closed()

    def _abort_now(self, reason: int) -> None:
        """A-ABORT and close at once, without ARTIM: for a peer that sends what we will
        not read (too long, too slow, not DICOM)."""
        try:
            self.writer.write(pdu.encode_abort(pdu.ABORT_PROVIDER, reason))
        except (ConnectionError, OSError, RuntimeError):
            pass
        self.close()
        raise _Closed

    async def _linger(self) -> None:
        """ARTIM after our RJ, RP or A-ABORT: the requestor closes the transport; one
        that does not is closed at acse_timeout_s. What it still sends is dropped (a
        bounded read, so it cannot grow a buffer)."""
        try:
            async with asyncio.timeout(self.cfg.acse_timeout_s):
                await self.writer.drain()
                while await self.reader.read(65536):
                    pass
        except (TimeoutError, ConnectionError, OSError):
            pass

    def abort_and_close(self, why: str) -> None:
        """From the listener's stop: no linger."""
        if self.associated:
            self.reason = why
            try:
                self.writer.write(pdu.encode_abort(pdu.ABORT_USER, pdu.REASON_NOT_SPECIFIED))
            except (ConnectionError, OSError, RuntimeError):
                pass
        self.close()

    def close(self) -> None:
        try:
            self.writer.close()
        except (ConnectionError, OSError, RuntimeError):
            pass

    def finish(self) -> None:
        """The board row: released, rejected, or aborted with a reason. Once: a
        second call finds no live row."""
        key = id(self)
        if self.status == "rejected":
            # The rejection reason is the row's reason.
            self.owner.board.close(key, "rejected", self.reason)
            return
        info = self.owner.board.close(key, self.status, "" if self.status == "released" else self.reason)
        if info is not None and not info.calling_ae and info.status == "aborted":
            self.owner.quiet["connection(s) closed before association"].log(
                logging.INFO, "listener %s: connection from %s closed before association",
                self.cfg.name, info.peer)
