"""Every place mfconsole leans on pynetdicom's internals, in one module.

mfconsole uses pynetdicom for DICOM upper-layer work, but a few behaviours it needs
(bounded reads, TLS client certificates bound to AE titles, private SOP classes
stored, one reader for C-STORE responses, socket options) are not reachable through
pynetdicom's public API. Each of them is here, with what it buys and why the public
API cannot give it. Nothing else in mfconsole touches a pynetdicom private name or a
service provider of an association (``assoc.dul``, ``assoc.dimse``, ``assoc.acse``);
tests/unit/test_pynetdicom_adapt.py checks that.

Two rules:

* These adaptations read pynetdicom's source as it is in the pinned version, so the
  module refuses to load with any other version (``check_version``). Upgrading
  pynetdicom means reading each adaptation below against the new source, then moving
  the pin in pyproject.toml and ``PINNED_VERSION`` together.
* Nothing is replaced in pynetdicom's classes or modules: every adaptation is a
  subclass used by mfconsole's own AEs, or is installed on one association of
  mfconsole's listener. A plain pynetdicom AE in the same process (a test's SCU, a
  peer simulator) behaves exactly like stock pynetdicom.
"""

from __future__ import annotations

import socket
import time
import weakref
from typing import Any, Callable, Iterable

import pynetdicom
from pydicom.uid import UID
from pynetdicom import AE, _config, acse, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA, SOPClassCommonExtendedNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from mfconsole.dimse import sockets

# The version whose source these adaptations were written against. Keep it equal to
# the pin in pyproject.toml (a unit test compares them).
PINNED_VERSION = "3.0.4"


class PynetdicomVersionError(ImportError):
    """The installed pynetdicom is not the one mfconsole's adaptations were made for."""


def check_version(installed: str | None = None) -> None:
    """Refuse any pynetdicom but the pinned one (a clear error instead of an
    association that fails in some odd way later)."""
    installed = pynetdicom.__version__ if installed is None else installed
    if installed != PINNED_VERSION:
        raise PynetdicomVersionError(
            f"mfconsole needs pynetdicom {PINNED_VERSION} exactly, but pynetdicom {installed} "
            f"is installed. mfconsole adapts pynetdicom internals that change between "
            f"releases (mfconsole/dimse/pynetdicom_adapt.py). Install the pinned version "
            f"(pip install 'pynetdicom=={PINNED_VERSION}'), or, to upgrade, check every "
            f"adaptation in that module against pynetdicom {installed}'s source and move "
            f"PINNED_VERSION and the pin in pyproject.toml together.")


check_version()


# ---------------------------------------------------------------------------
# Logging (process wide by nature: pynetdicom has one logging configuration).

def quiet_logging() -> None:
    """No patient identifiers and no per-PDU debug handlers in pynetdicom's logging.

    pynetdicom's only switches for these are the module ``pynetdicom._config`` (its
    documented configuration, but an underscore name); they are set when mfconsole
    sets up its logs, never at import."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


# ---------------------------------------------------------------------------
# Acceptor (the listener)

STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"   # PS3.4 B: the Storage Service Class UID


def storage_like(uid: UID) -> bool:
    """A proposed abstract syntax we take as storage: private, or unknown to pynetdicom
    (a retired or newer SOP class). Modalities send private SOP classes (vendor raw
    data, private SRs); they must be stored, not refused."""
    from pynetdicom import sop_class

    return uid.is_private or not hasattr(sop_class, uid.keyword or "_none_")


def unrestricted_contexts(rq_contexts: Iterable[PresentationContext],
                          ac_contexts: Iterable[PresentationContext]) -> list[PresentationContext]:
    """A context, with our storage transfer syntaxes, for each private or unknown
    abstract syntax the requestor proposes that we do not support already.

    pynetdicom's own unrestricted mode (``_config.UNRESTRICTED_STORAGE_SERVICE``) is
    process wide and accepts *any* proposed transfer syntax (Deflate included); these
    contexts are negotiated normally, on the listener's associations only."""
    known = {cx.abstract_syntax for cx in ac_contexts}
    storage_ts = next((cx.transfer_syntax for cx in ac_contexts
                       if cx.abstract_syntax != Verification), ["1.2.840.10008.1.2"])
    extra = []
    for rq in rq_contexts:
        uid = UID(rq.abstract_syntax)
        if uid not in known and storage_like(uid):
            cx = PresentationContext()
            cx.abstract_syntax = uid
            cx.transfer_syntax = list(storage_ts)
            extra.append(cx)
            known.add(uid)
    return extra


class AcceptorACSE(acse.ACSE):
    """The ACSE of one listener association (installed by ``ListenerServer``).

    Two additions to pynetdicom's acceptor negotiation, which has no hook for either
    (its events come after the calling AE title checks, or not at all for contexts):

    * Calling AE titles bound to a client certificate (tls.client_cert_aets): the
      listener puts the titles the peer's certificate may use on the association
      (``assoc.cert_aets``); any other calling AE title is refused the way pynetdicom
      refuses one that is not in calling_aets, with A-ASSOCIATE-RJ 1/1/3, before
      anything else is negotiated.
    * Private and unknown SOP classes get contexts (``unrestricted_contexts``).

    It overrides ``ACSE._negotiate_as_acceptor`` (private) in a subclass: pynetdicom
    3.0.4's ``ACSE`` is replaced only on the association it is given to."""

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        allowed = getattr(self.assoc, "cert_aets", None)
        if allowed is None and getattr(self.assoc, "cert_binding", False):
            allowed = frozenset()    # bound titles required, none set (fail closed)
        if allowed is not None and rq is not None and str(rq.calling_ae_title).strip() not in allowed:
            # What pynetdicom does for a calling AE title not in require_calling_aet.
            self.requestor.ae_title = rq.calling_ae_title
            self.send_reject(0x01, 0x01, 0x03)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        if rq is not None:
            supported = self.acceptor.supported_contexts
            extra = unrestricted_contexts(rq.presentation_context_definition_list, supported)
            if extra:
                # A new list for this association only: the shared one stays as it is.
                self.acceptor.supported_contexts = list(supported) + extra
        super()._negotiate_as_acceptor()


def _serve_any_cstore_as_storage(assoc: Any) -> None:
    """Serve every C-STORE request of ``assoc`` with pynetdicom's Storage service.

    pynetdicom picks the service class from the request's SOP class UID; a private or
    unknown one gets none and the association is aborted, unless the process-wide
    ``_config.UNRESTRICTED_STORAGE_SERVICE`` is set. Its per-association equivalent:
    ``Association._serve_request`` (private) first maps the UID through the
    association's accepted SOP Class Common Extended items (``ServiceUser._common_ext``,
    private), so for the time one C-STORE request is served, its UID maps to the
    Storage Service Class there. The listener never accepts common extended items of
    its own (no EVT_SOP_COMMON handler), so there is nothing else in that table to
    keep; the wrapper is an attribute of this association only."""
    serve = assoc._serve_request
    items: dict[str, SOPClassCommonExtendedNegotiation] = {}

    def serve_request(msg: Any, context_id: int) -> None:
        if not isinstance(msg, C_STORE):
            return serve(msg, context_id)
        uid = str(getattr(msg, "AffectedSOPClassUID", None) or "")
        item = items.get(uid)
        if item is None:
            try:
                item = SOPClassCommonExtendedNegotiation()
                item.sop_class_uid = uid
                item.service_class_uid = STORAGE_SERVICE_CLASS
            except (TypeError, ValueError):   # a UID pynetdicom's decoder let through
                return serve(msg, context_id)
            items[uid] = item
        table = assoc.acceptor._common_ext
        table[uid] = item
        try:
            return serve(msg, context_id)
        finally:
            table.pop(uid, None)

    assoc._serve_request = serve_request


# Largest non-P-DATA PDU we read (an A-ASSOCIATE-RQ with 128 contexts and user
# identity is far below this). P-DATA-TF is bounded by the max PDU we advertise.
MAX_CONTROL_PDU = 1024 * 1024
# Tolerance over the advertised max PDU for peers that count the PDU header in it.
PDU_SLACK = 1024
_PDU_TYPES = frozenset(range(1, 8))


def _bound_pdu_reads(asock: Any, max_pdata: int, deadline_s: float,
                     on_refuse: Callable[[int, int, int], None]) -> None:
    """Replace ``recv`` of one AssociationSocket (an instance attribute) with a bounded
    reader.

    pynetdicom's DUL reads a PDU as recv(6) for the header, then recv(length) for the
    body: it would read (and hold) whatever length a peer declares, and each socket
    read gets the full network timeout, so a peer dripping a byte at a time holds the
    thread forever. pynetdicom has no setting for either. Here a declared length over
    the limit closes the connection before anything is read, and a whole PDU must
    arrive within ``deadline_s`` of its first byte. An OSError is how pynetdicom's
    DUL learns the transport is gone.
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
        limit = max_pdata + PDU_SLACK if pdu_type == 0x04 else MAX_CONTROL_PDU
        if nr_bytes > limit:
            on_refuse(pdu_type, nr_bytes, limit)
            raise OSError(f"PDU length {nr_bytes} exceeds {limit}")
        return read(nr_bytes)

    asock.recv = recv


def connection(assoc: Any) -> socket.socket | None:
    """The socket under an association (plain or TLS). pynetdicom keeps it in its DUL's
    AssociationSocket and does not expose it on the association."""
    asock = assoc.dul.socket
    return asock.socket if asock is not None else None


def release_waiting_acceptor(assoc: Any) -> None:
    """The connection of an acceptor closed before any A-ASSOCIATE-RQ: wake its thread.

    pynetdicom's acceptor thread keeps waiting acse_timeout for an A-ASSOCIATE-RQ on
    its DUL's queue after the connection is gone (holding two threads, and making a
    stop wait); None is what it gets when that wait times out, so we give it that."""
    if assoc.is_acceptor and assoc.requestor.primitive is None and assoc.dul.to_user_queue.empty():
        assoc.dul.to_user_queue.put(None)


class ListenerAE(AE):
    """An AE whose ``max_associations`` counts only peers that asked for an association.

    pynetdicom counts every accepted TCP connection (its acceptor negotiation reads
    ``ae.active_associations``), so a handful of silent or stalled connections (each
    dropped only at its ARTIM/network deadline) would lock real modalities out with
    "local limit exceeded". Connections that have not sent an A-ASSOCIATE-RQ are
    bounded by those deadlines instead.
    """

    @property
    def active_associations(self) -> list[Any]:
        return [a for a in super().active_associations
                if not a.is_acceptor or a.requestor.primitive is not None]


class _AcceptorRequestHandler(RequestHandler):
    """Makes each new association of a ListenerServer ours, before pynetdicom triggers
    its EVT_CONN_OPEN and starts its reactor (so before any read and before
    negotiation), whatever the listener's event handlers do.

    ``RequestHandler._create_association`` (private) is where pynetdicom builds the
    acceptor's Association; no public hook runs between that and the first read."""

    server: "ListenerServer"

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        server = self.server
        # ARTIM bounds the wait for A-ASSOCIATE-RQ, so a silent client is dropped.
        # pynetdicom's DUL starts with a fixed 30 s and never looks at acse_timeout.
        if server.ae.acse_timeout is not None:
            assoc.dul.artim_timer.timeout = server.ae.acse_timeout
        _bound_pdu_reads(assoc.dul.socket, server.max_pdata, server.network_timeout,
                         lambda pdu_type, length, limit: server.on_oversize(assoc, pdu_type,
                                                                            length, limit))
        assoc.acse = AcceptorACSE(assoc)
        assoc.cert_binding = server.cert_binding()
        _serve_any_cstore_as_storage(assoc)
        return assoc


def _ignore_oversize(assoc: Any, pdu_type: int, length: int, limit: int) -> None:
    pass


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's server with our socket options, a read deadline per socket, the
    TLS handshake on the connection's own thread, and our associations
    (``_AcceptorRequestHandler``).

    pynetdicom's ``get_request`` wraps TLS in the accept loop (one slow handshake
    stalls every other connection) and leaves accepted sockets without a timeout."""

    daemon_threads = True
    network_timeout: float = 60.0
    # The largest P-DATA PDU we read (the max PDU we advertise), and who is told when
    # a peer declares a larger PDU (the association, the PDU type, its length, the
    # limit); the connection is closed then.
    max_pdata: int = 16 * 1024 * 1024
    on_oversize: Callable[[Any, int, int, int], None] = staticmethod(_ignore_oversize)
    # socketserver's default listen backlog is 5: a burst of connections (modalities
    # reconnecting after an outage, parallel senders, a few silent peers) overflows it
    # and the kernel makes the rest retry their handshake a second or more later.
    request_queue_size = socket.SOMAXCONN

    # With TLS, the listener's handshake: it runs on the connection's own thread, never
    # in get_request (the accept loop), and returns the TLS socket or None (refused).
    handshake: Callable[[socket.socket, Any], Any] | None = None

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


class SharedContexts(list):
    """The listener's supported presentation contexts, shared by every association.

    pynetdicom deep-copies the server's contexts for each new association (in
    ``RequestHandler._create_association``): with every Storage SOP class times our
    transfer syntaxes that costs tens of milliseconds of GIL per association, and
    modalities often open one association per object. Negotiation only reads the
    acceptor's contexts (it builds new ones for the result), so one read-only list
    serves all associations."""

    def __deepcopy__(self, memo: dict) -> "SharedContexts":
        return self


def make_listener_server(ae: ListenerAE, address: tuple[str, int], handlers: list[Any], *,
                         network_timeout_s: float, max_pdata: int,
                         on_oversize: Callable[[Any, int, int, int], None],
                         handshake: Callable[[socket.socket, Any], Any] | None,
                         cert_binding: Callable[[], bool] = lambda: False) -> ListenerServer:
    """A ListenerServer for ``ae``, not yet serving (the caller runs serve_forever).
    ``cert_binding()``: whether calling AE titles are bound to client certificates now
    (then an association the listener could not bind is refused, never let through)."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=ListenerServer,
                            request_handler=_AcceptorRequestHandler)
    server.network_timeout = network_timeout_s
    server.max_pdata = max_pdata
    server.on_oversize = on_oversize
    server.handshake = handshake
    server.cert_binding = cert_binding
    server.contexts = SharedContexts(server.contexts)
    # make_server(block=False) would start its own thread; we run serve_forever on
    # ours. pynetdicom's server.shutdown() removes the server from the AE's private
    # list of servers and fails if it is not there.
    ae._servers.append(server)
    return server


# ---------------------------------------------------------------------------
# Requestor (the sender)

class SenderAE(AE):
    """An AE whose associations use our socket class (TCP_NODELAY, TCP_QUICKACK).

    pynetdicom creates the requestor's socket in ``AE._create_socket`` (private) with
    a plain ``socket.socket`` and no way to pass options or a class. Without
    TCP_NODELAY and TCP_QUICKACK each small PDU waits for a delayed ACK (see
    sockets.py). The subclass re-wraps the socket pynetdicom made (bound, with its
    timeout), before it connects; only this AE's associations are affected."""

    def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> Any:
        asock = super()._create_socket(assoc, address, tls_args)
        raw = asock.socket
        timeout = raw.gettimeout()
        sock = sockets.adopt(raw)
        sock.settimeout(timeout)
        asock.socket = sock
        # pynetdicom drops its socket when the connect fails: keep ours, so the sender
        # can say why (connect_error).
        _opened[assoc] = sock
        return asock


_opened: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def connect_error(assoc: Any) -> OSError | None:
    """Why the connect of a SenderAE association failed, if it did (plain TCP; over
    TLS the context keeps it: sockets.QuickAckSSLSocket)."""
    sock = _opened.get(assoc)
    return getattr(sock, "connect_error", None)


def pause_reactor(assoc: Any) -> bool:
    """Stop pynetdicom's reactor thread for as long as we use the association.

    The reactor takes any DIMSE message it finds off the queue; pynetdicom pauses it
    around each of its own send_c_*() calls, but between two back-to-back calls it
    can wake up late and take the next response ("Received unexpected C-STORE
    service message"; about 1 in 700 here), leaving us to wait out dimse_timeout_s.
    Paused once, it cannot. There is no public pause: this clears the private event
    ``Association._reactor_checkpoint`` and waits for ``Association._is_paused``.
    Its other duties (answering a peer's release or abort) are done by
    ``peer_ended``/``resume_reactor``. The confirm after a few milliseconds catches a
    reactor that was just about to wake when we cleared."""
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + 5
    confirmed = 0
    while confirmed < 2:
        if not assoc.is_established or time.monotonic() > deadline:
            return False
        if assoc._is_paused:
            confirmed += 1
            time.sleep(0.003)
        else:
            confirmed = 0
            time.sleep(0.0001)
    return True


def resume_reactor(assoc: Any) -> None:
    """Let the reactor run again, so it answers a peer's release or abort (and a
    release or abort of ours can complete)."""
    assoc._reactor_checkpoint.set()


def peer_ended(assoc: Any) -> bool:
    """The peer released or aborted (or the connection dropped).

    The public ``Association.is_released``/``is_aborted`` are set by the reactor, which
    we keep paused, and no event fires; the association's ACSE looks at its DUL's
    queue itself. A release request found there is taken off the queue."""
    return bool(assoc.acse.is_aborted() or assoc.acse.is_release_requested())


def usable(assoc: Any) -> bool:
    """The association is up and the peer has not released or aborted it."""
    return bool(assoc.is_established and assoc.dul.is_alive() and not peer_ended(assoc))


def idle_timer_expired(assoc: Any) -> bool:
    """Nothing from the peer for network_timeout. The running reactor aborts on the
    DUL's idle timer; paused, it cannot, and the timer has no public view."""
    return bool(assoc.dul.idle_timer_expired())


def send_pdata(assoc: Any, primitives: Iterable[P_DATA]) -> None:
    """Queue P-DATA primitives to the DUL. pynetdicom's public sends take a Dataset and
    encode it (twice) themselves; cstore.py writes the bytes we hold instead."""
    for primitive in primitives:
        assoc.dul.send_pdu(primitive)


def next_response(assoc: Any) -> Any:
    """The next DIMSE message from the peer (None at dimse_timeout or when the
    association ends), read from the DIMSE provider's queue: with the reactor
    paused nothing else reads it. pynetdicom's public send_c_store reads its
    response the same way, but only after encoding the data set itself."""
    _, rsp = assoc.dimse.get_msg(block=True)
    return rsp


def why_no_response(assoc: Any) -> tuple[bool, bool]:
    """(the peer sent A-ABORT, the connection is closed or dropped), after
    ``next_response`` gave None. The public flags would be set by the (paused)
    reactor; the ACSE, the DUL thread and its state machine know now."""
    aborted = assoc.acse.is_aborted("a-abort")
    closed = (assoc.acse.is_aborted("a-p-abort") or not assoc.dul.is_alive()
              or assoc.dul.state_machine.current_state == "Sta1")
    return bool(aborted), bool(closed)
