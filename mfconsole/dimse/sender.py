"""C-STORE SCU to one destination: an association reused for many objects.

Objects are sent as the bytes we received (never re-encoded) whenever the peer
accepts their transfer syntax. An uncompressed object the peer refuses in its own
syntax goes in another uncompressed syntax the peer accepts (a header re-encode, no
pixel decoding); a compressed one the peer refuses is a message-scope failure, since
mfconsole does not transcode.

Knows nothing of SQLite: it gets bytes and UIDs, and answers with an Outcome.

Both upper layers (this pynetdicom one, and mfconsole/ul) share what comes before a
connection (``preflight``: egress, TLS, passcode) and the words of ``echo`` / ``test``
(``run_echo``, ``run_probe``); mfconsole.dimse.kind picks the layer.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from mfconsole import contract, egress, tls
from mfconsole.config import PRIORITIES, TLSConfig
from mfconsole.contract import Outbound, Outcome
from mfconsole.dimse import cstore, sockets
from mfconsole.dimse.kind import UPPER_LAYER
from mfconsole.dimse import pynetdicom_adapt as adapt
from mfconsole.dicomvalues import sop_name, ts_name
from mfconsole.dimse.odd_length import even_length
from mfconsole.dimse.status import association_rejected, context_refused, cstore_status

log = logging.getLogger("mfconsole.sender")

IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE)
MAX_CONTEXTS = 128      # PS3.8: presentation context ids are odd numbers 1..255
# What pynetdicom's build_context(Verification) offers (implicit, explicit, deflated,
# big endian): the Verification context both upper layers propose.
VERIFICATION_SYNTAXES = (IMPLICIT_LE, EXPLICIT_LE, "1.2.840.10008.1.2.1.99", EXPLICIT_BE)
VERIFICATION = (str(Verification), list(VERIFICATION_SYNTAXES))

@dataclass(frozen=True)
class Peer:
    """Where and how to associate. Built from a destination's config (or an
    ``AET@host:port`` target on the command line)."""
    host: str
    port: int
    called_ae: str
    calling_ae: str = "MFCONSOLE"
    connect_timeout_s: float = 10.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0
    priority: str = "medium"
    username: str | None = None
    passcode_file: Path | None = None
    tls: TLSConfig | None = None
    allow_cleartext: bool = False
    upper_layer: str = UPPER_LAYER   # who speaks DICOM: "pynetdicom" or "mfconsole"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def from_destination(cls, d: Any) -> "Peer":
        return cls(host=d.host, port=d.port, called_ae=d.ae_title, calling_ae=d.calling_ae_title,
                   connect_timeout_s=d.connect_timeout_s, acse_timeout_s=d.acse_timeout_s,
                   dimse_timeout_s=d.dimse_timeout_s, network_timeout_s=d.network_timeout_s,
                   priority=d.priority, username=d.username, passcode_file=d.passcode_file,
                   tls=d.tls, allow_cleartext=d.allow_cleartext, upper_layer=d.upper_layer)

    @property
    def loopback_only(self) -> bool:
        """Cleartext without allow_cleartext: only a loopback address will do."""
        return self.tls is None and not self.allow_cleartext


def _dial(check: egress.TcpCheck | None, peer: Peer, loopback_only: bool = False
          ) -> egress.Dial | Outcome:
    """The checked address to associate with (``check`` is [egress].allowed_tcp's, from
    the engine; None: no allowlist), or the Outcome that stops us: a refusal (permanent,
    nothing sent) or a host that does not resolve now (transient)."""
    try:
        verdict = (check(peer.host, peer.port, loopback_only=loopback_only) if check is not None
                   else egress.unchecked(peer.host, peer.port))
    except OSError as exc:   # the host name does not resolve now
        return contract.transport_failure(f"cannot connect to {peer.address}: {exc}")
    if isinstance(verdict, egress.Refusal):
        return contract.egress_refused(verdict.target, verdict.allowlist, verdict.resolved, verdict.why)
    return verdict


def _remote(dial: egress.Dial) -> str | tuple[str, int, int]:
    """pynetdicom's form of the checked address (a link-local IPv6 one keeps its scope)."""
    if dial.family == socket.AF_INET6 and len(dial.sockaddr) >= 4 and dial.sockaddr[3]:
        return (str(dial.sockaddr[0]), int(dial.sockaddr[2]), int(dial.sockaddr[3]))
    return dial.address


def client_context(cfg: TLSConfig) -> ssl.SSLContext:
    """mfconsole.tls's client policy with our socket class (TCP_QUICKACK, and the
    handshake error kept for _association_failure)."""
    return sockets.dicom_context(tls.client_context(cfg))


def tls_context(peer: Peer) -> ssl.SSLContext | None:
    """A one-off context for ``peer``, or None without TLS (tls.TLSSetupError when a
    file cannot be used)."""
    return client_context(peer.tls) if peer.tls is not None else None


@dataclass(frozen=True)
class Preflight:
    """What is settled before each connection, the same for both upper layers and for
    deliveries, echo and test alike."""
    dial: egress.Dial                 # the checked address: nothing resolves it again
    tls: ssl.SSLContext | None
    passcode: bytes | None            # read now, so a rotated passcode needs no restart


def preflight(peer: Peer, check: egress.TcpCheck | None, reloading: tls.Reloading | None = None,
              *, loopback_only: bool = False) -> Preflight | Outcome:
    """The egress check, the TLS context (a sender's ``reloading`` one, renewed when its
    files change, else a one-off) and the passcode; or the Outcome that stops us before
    any byte is sent."""
    dial = _dial(check, peer, loopback_only)
    if isinstance(dial, Outcome):
        return dial
    try:
        ctx = reloading.get() if reloading is not None else tls_context(peer)
    except tls.TLSSetupError as exc:
        # A certificate file changed since the config was loaded: fix it, then resume.
        return Outcome(contract.PERMANENT, contract.DESTINATION, "configuration", str(exc))
    try:
        passcode = (peer.passcode_file.read_bytes().strip()
                    if peer.username and peer.passcode_file is not None else None)
    except OSError as exc:   # e.g. the passcode file vanished
        return Outcome(contract.PERMANENT, contract.DESTINATION, "configuration",
                       f"cannot read passcode_file: {exc.strerror}")
    return Preflight(dial, ctx, passcode)


def proposed(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """The presentation contexts for ``pairs`` (SOP class, TS), as (abstract syntax,
    transfer syntaxes): one per pair, plus, per SOP class with an uncompressed object,
    one offering every uncompressed syntax (the fallback). Both upper layers propose
    these."""
    contexts: list[tuple[str, list[str]]] = []
    fallback: list[str] = []
    for sop_class, ts in pairs:
        contexts.append((sop_class, [ts]))
        if ts in UNCOMPRESSED and sop_class not in fallback:
            fallback.append(sop_class)
    contexts += [(c, list(UNCOMPRESSED)) for c in fallback]
    # Verification keeps the association up when the peer takes none of the others,
    # so each object gets its own "not accepted" answer (a message-scope failure).
    return contexts[:MAX_CONTEXTS - 1] + [VERIFICATION]


def remember(known: dict[tuple[str, str], None], pairs: list[tuple[str, str]]) -> None:
    """Add ``pairs`` to what a sender proposes (``known``, in order), dropping the
    oldest others when they would not all fit in one association."""
    for pair in pairs:
        known[pair] = None
    while len(proposed(known)) >= MAX_CONTEXTS and len(known) > len(pairs):
        del known[next(iter(known))]


def refused(obj: Outbound) -> Outcome:
    """No accepted context for ``obj``, in its own syntax or (uncompressed) any other."""
    klass = sop_name(obj.sop_class_uid)
    if obj.transfer_syntax in UNCOMPRESSED:
        return context_refused(f"peer does not accept {klass} in any uncompressed "
                               "transfer syntax")
    return context_refused(
        f"peer does not accept {ts_name(obj.transfer_syntax)} for {klass}; "
        "mfconsole does not transcode")


def _user_identity(peer: Peer, passcode: bytes | None) -> list[Any]:
    if not peer.username:
        return []
    item = UserIdentityNegotiation()
    item.primary_field = peer.username.encode()
    item.user_identity_type = 2 if passcode is not None else 1
    if passcode is not None:
        item.secondary_field = passcode
    item.positive_response_requested = False
    return [item]


@dataclass
class _Attempt:
    """What happened while ``ae.associate`` ran (pynetdicom reports a refused
    connection, an ACSE timeout, a peer's A-ABORT and "no context accepted" all alike,
    as aborted)."""
    connected: bool = False
    answered: bool = False      # the peer sent at least one PDU
    accepted: bool = False      # ... and it was an A-ASSOCIATE-AC
    tls_error: OSError | None = None   # the TLS handshake failed (pynetdicom swallows it)
    connect_error: OSError | None = None   # the TCP connect failed: how
    opened_at: float = 0.0      # when the connection was made (monotonic)
    waited: float = 0.0         # from then until ae.associate returned


def _associate(ae: AE, peer: Peer, ready: Preflight, **kwargs: Any) -> tuple[Any, _Attempt]:
    """Associate with ``ready.dial.address`` (the address egress checked: pynetdicom
    never resolves ``peer.host`` again); TLS verifies the configured name, not the address."""
    seen = _Attempt()
    dial, tls_ctx = ready.dial, ready.tls
    ext_neg = _user_identity(peer, ready.passcode)
    if tls_ctx is not None:
        # The handshake runs within connect_timeout_s, as part of the connection.
        tls_ctx.handshake_error = None   # type: ignore[attr-defined]
        tls_ctx.connect_error = None     # type: ignore[attr-defined]
        kwargs["tls_args"] = (tls_ctx, tls.server_hostname(peer.tls, peer.host))

    def on_open(event: Any) -> None:
        seen.connected, seen.opened_at = True, time.monotonic()
        # pynetdicom drops the socket timeout once connected; without it a peer that
        # stops in the middle of a PDU blocks the reader (and this worker) for good.
        conn = adapt.connection(event.assoc)
        if conn is not None:
            conn.settimeout(peer.network_timeout_s)

    def on_accepted(event: Any) -> None:
        seen.accepted = True

    def on_pdu(event: Any) -> None:
        seen.answered = True

    assoc = ae.associate(_remote(dial), dial.port, ae_title=peer.called_ae, ext_neg=ext_neg or None,
                         evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACCEPTED, on_accepted),
                                       (evt.EVT_PDU_RECV, on_pdu)],
                         **kwargs)
    seen.tls_error = getattr(tls_ctx, "handshake_error", None)
    seen.waited = time.monotonic() - seen.opened_at if seen.connected else 0.0
    seen.connect_error = adapt.connect_error(assoc) or getattr(tls_ctx, "connect_error", None)
    return assoc, seen


def connect_failure(exc: OSError | None, timeout_s: float) -> str:
    """Why a TCP connect failed, in the words that send an administrator to the right
    place: nothing listening (or a firewall that rejects), a host or network that cannot
    be reached, or silence (a host that is down or a firewall that drops)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port, or a firewall rejects it)"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer within connect_timeout_s={timeout_s:g} (host down, or a firewall drops)"
    if exc is not None and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
        return f"unreachable ({errno.errorcode.get(exc.errno, exc.errno)}: no route to that address)"
    if exc is not None and exc.errno:
        return f"connect failed ({errno.errorcode.get(exc.errno, exc.errno)})"
    return f"refused, unreachable or no answer within connect_timeout_s={timeout_s:g}"


def _association_failure(assoc: Any, peer: Peer, seen: _Attempt) -> Outcome:
    """Why ``ae.associate`` did not give an established association."""
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        return association_rejected(int(rj.result), int(rj.result_source), int(rj.diagnostic))
    if seen.tls_error is not None:   # an untrusted certificate pauses; the rest is retried
        return contract.tls_failure(seen.tls_error, peer.address)
    if not seen.connected:
        return contract.transport_failure(f"cannot connect to {peer.address}: "
                                          + connect_failure(seen.connect_error, peer.connect_timeout_s))
    if seen.accepted:
        return context_refused(f"{peer.address} accepted none of the presentation "
                               "contexts we proposed")
    if not seen.answered:
        # pynetdicom reports a connection closed at once as it does an ACSE timeout;
        # only the time it took tells them apart.
        if seen.waited < 0.9 * peer.acse_timeout_s:
            return not_answered(peer)
        return not_answered(peer, timed_out=True)
    return contract.transport_failure(f"{peer.address} aborted the association request")


def not_answered(peer: Peer, timed_out: bool = False) -> Outcome:
    """No answer to our A-ASSOCIATE-RQ: silence, or the connection closed (or reset)."""
    if timed_out:
        return contract.transport_failure(
            f"{peer.address} did not answer the association request within "
            f"acse_timeout_s={peer.acse_timeout_s:g}")
    return contract.transport_failure(
        f"{peer.address} closed the connection without answering the association request")


def new_ae(peer: Peer) -> AE:
    """A fresh AE with ``peer``'s calling AE title and timeouts."""
    ae = adapt.SenderAE(ae_title=peer.calling_ae)   # our socket options
    ae.connection_timeout = peer.connect_timeout_s
    ae.acse_timeout = peer.acse_timeout_s
    ae.dimse_timeout = peer.dimse_timeout_s
    ae.network_timeout = peer.network_timeout_s
    return ae


def establish(peer: Peer, ready: Preflight, contexts: list[tuple[str, list[str]]]) -> Any:
    """A pynetdicom association proposing ``contexts`` (abstract syntax, transfer
    syntaxes), or the Outcome saying why there is none."""
    try:
        assoc, seen = _associate(new_ae(peer), peer, ready,
                                 contexts=[build_context(c, ts) for c, ts in contexts])
    except OSError as exc:
        return contract.transport_failure(f"cannot connect to {peer.address}: "
                                          f"{exc.strerror or exc.__class__.__name__}")
    if not assoc.is_established:
        return _association_failure(assoc, peer, seen)
    return assoc


class DimseSender:
    """An association to one peer, opened on demand, reused, released when idle.
    Not thread-safe: one sender per delivery worker thread."""

    max_batch = (1, 0)    # C-STORE carries one object per request
    in_order = False

    def __init__(self, peer: Peer, egress_dial: egress.TcpCheck):
        self.peer = peer
        self.egress_dial = egress_dial   # host, port → the address to dial, or a Refusal
        self.assoc: Any = None
        self.pairs: dict[tuple[str, str], None] = {}   # (SOP class, TS) proposed, in order
        self.last_used = 0.0
        self._msg_id = 0
        self._stored = 0     # objects this association has taken (see Outcome.others_delivered)
        # Rebuilt at the next association when a certificate file is renewed.
        self._tls = tls.Reloading(client_context, peer.tls) if peer.tls is not None else None

    # -- association -------------------------------------------------------------

    def _needs(self, pairs: Iterable[tuple[str, str]]) -> bool:
        return any(p not in self.pairs for p in pairs)

    def usable(self) -> bool:
        """The association is up and the peer has not released or aborted it."""
        return self.assoc is not None and adapt.usable(self.assoc)

    def open(self, pairs: Iterable[tuple[str, str]]) -> Outcome | None:
        """Make sure an association proposing ``pairs`` is up; an Outcome on failure."""
        pairs = list(dict.fromkeys(pairs))
        if self.usable() and not self._needs(pairs):
            return None
        self.close()
        remember(self.pairs, pairs)
        p = self.peer
        ready = preflight(p, self.egress_dial, self._tls, loopback_only=p.loopback_only)
        if isinstance(ready, Outcome):   # checked before every connect
            return ready
        assoc = establish(p, ready, proposed(self.pairs))
        if isinstance(assoc, Outcome):
            return assoc
        self.assoc = assoc
        self._stored = 0
        if not adapt.pause_reactor(assoc):
            self.close()
            return contract.transport_failure(f"{p.address} dropped the association at once")
        self.last_used = time.monotonic()
        return None

    def close(self) -> None:
        assoc, self.assoc = self.assoc, None
        if assoc is None:
            return
        adapt.resume_reactor(assoc)   # the reactor answers a peer's release or abort
        if assoc.is_established and not adapt.peer_ended(assoc):
            try:
                assoc.release()
            except Exception:   # the peer may already be gone
                assoc.abort()
            return
        deadline = time.monotonic() + 1
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.005)
        if assoc.is_established:
            assoc.abort()

    def drop(self) -> None:
        """Abort at once (no release handshake with a peer that stopped answering)."""
        assoc, self.assoc = self.assoc, None
        if assoc is not None:
            adapt.resume_reactor(assoc)
            assoc.abort()

    def close_if_idle(self, idle_s: float) -> None:
        if self.assoc is None:
            return
        if adapt.idle_timer_expired(self.assoc):
            # Nothing from the peer for network_timeout_s (the reactor, paused, would
            # have aborted too).
            self.drop()
        elif time.monotonic() - self.last_used > idle_s or not self.usable():
            self.close()

    # -- C-STORE -----------------------------------------------------------------

    def prepare(self, items: Iterable[Any]) -> Outcome | None:
        return self.open((i.sop_class_uid, i.transfer_syntax) for i in items)

    def send_many(self, objs: list[Outbound]) -> list[Outcome]:
        done: list[Outcome] = []
        for obj in objs:
            done.append(self.send(obj))
            if not done[-1].is_success and done[-1].scope == contract.DESTINATION:
                break
        return done

    def send(self, obj: Outbound) -> Outcome:
        failed = self.open([(obj.sop_class_uid, obj.transfer_syntax)])
        if failed is not None:
            return failed
        try:
            data, context = self._choose(obj)
        except Exception as exc:   # e.g. a value pydicom cannot write back (3-byte US)
            return contract.internal_error(
                exc, f"re-encoding {ts_name(obj.transfer_syntax)} for the peer "
                     "(it does not accept the object's own transfer syntax)")
        if context is None:
            return self._refused(obj)
        data, padded = even_length(data, str(context.transfer_syntax[0]))
        if data is None:
            return Outcome(
                contract.PERMANENT, contract.MESSAGE, "odd length",
                f"the data set has an odd length ({padded} bytes) that mfconsole cannot pad: "
                "DICOM requires even lengths and the peer would abort the association")
        self.last_used = time.monotonic()
        outcome = self._store(obj, data, context)
        if outcome.is_success:
            self._stored += 1
            if padded:
                outcome = dataclasses.replace(outcome, reason=f"{outcome.reason} (odd-length last "
                                              "element padded by one byte, as DICOM requires)")
        return outcome

    def _accepted(self, sop_class: str) -> dict[str, Any]:
        return {str(cx.transfer_syntax[0]): cx for cx in self.assoc.accepted_contexts
                if cx.abstract_syntax == sop_class}

    def _choose(self, obj: Outbound) -> tuple[bytes, Any]:
        accepted = self._accepted(obj.sop_class_uid)
        if obj.transfer_syntax in accepted:
            return obj.data, accepted[obj.transfer_syntax]
        if obj.transfer_syntax in UNCOMPRESSED:
            for ts in UNCOMPRESSED:
                if ts in accepted:
                    return reencode(obj.data, obj.transfer_syntax, ts), accepted[ts]
        return obj.data, None

    def _refused(self, obj: Outbound) -> Outcome:
        return refused(obj)

    def _store(self, obj: Outbound, data: bytes, context: Any) -> Outcome:
        """One C-STORE: the request written by ``cstore`` (the data set goes out as the
        bytes we hold), the response read by pynetdicom."""
        assoc = self.assoc
        self._msg_id = self._msg_id % 65535 + 1
        command = cstore.command_set(self._msg_id, PRIORITIES.get(self.peer.priority, 0),
                                     obj.sop_class_uid, obj.sop_instance_uid)
        # The reactor is paused (``adapt.pause_reactor``): the response can only reach us.
        others = self._stored > 0
        try:
            cstore.send(assoc, context.context_id, command, data)
            rsp = adapt.next_response(assoc)
        except OSError as exc:
            self.drop()
            return contract.no_response(f"connection to {self.peer.address} lost during the "
                                        f"C-STORE ({exc.__class__.__name__})", others_delivered=others)
        if rsp is None:
            # DIMSE timeout, the peer aborted, or the connection went silent mid-PDU:
            # the outcome is unknown, and a re-store is idempotent.
            aborted, closed = adapt.why_no_response(assoc)
            self.drop()
            return contract.no_response(
                "peer aborted the association during the C-STORE" if aborted else
                f"connection to {self.peer.address} closed during the C-STORE (silent beyond "
                f"network_timeout_s={self.peer.network_timeout_s:g}, or dropped)" if closed else
                f"no C-STORE response within dimse_timeout_s={self.peer.dimse_timeout_s:g}",
                others_delivered=others)
        status = rsp.Status
        if status is None:
            return Outcome(contract.BOUNDED, contract.MESSAGE, "invalid response",
                           "C-STORE response without a status")
        return cstore_status(int(status))


def reencode(data: bytes, source_ts: str, target_ts: str) -> bytes:
    """Re-encode an uncompressed data set in another uncompressed transfer syntax."""
    src = UID(source_ts)
    ds = read_dataset(DicomBytesIO(data), src.is_implicit_VR, src.is_little_endian)
    dst = UID(target_ts)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = dst.is_little_endian, dst.is_implicit_VR
    write_dataset(out, Dataset(ds))
    return out.getvalue()


# -- operator tools ---------------------------------------------------------------

@dataclass(frozen=True)
class EchoResult:
    ok: bool
    rtt_ms: float
    detail: str


# An echo or probe, as one upper layer does it (pynetdicom's: echo_exchange and
# probe_exchange below; mfconsole's: mfconsole/ul/echo.py): given what preflight settled
# (and the contexts, for a probe), it associates, asks, releases, and answers (see
# run_echo, run_probe) or gives the Outcome that stopped it. mfconsole.dimse.kind
# picks the layer.
EchoExchange = Callable[[Peer, Preflight], "int | None | Outcome"]
ProbeExchange = Callable[[Peer, Preflight, list[tuple[str, list[str]]]],
                         "set[tuple[str, str]] | Outcome"]


def run_echo(peer: Peer, egress_dial: egress.TcpCheck | None, exchange: EchoExchange) -> EchoResult:
    """C-ECHO with the round-trip time of the whole exchange (connect to release), to
    the address ``egress_dial`` checked (None: the first ``peer.host`` resolves to).
    ``exchange`` answers the C-ECHO status, or None when no response came. The words
    are the same whichever upper layer speaks."""
    ready = preflight(peer, egress_dial)
    if isinstance(ready, Outcome):
        return EchoResult(False, 0.0, ready.reason)
    t0 = time.perf_counter()
    status = exchange(peer, ready)
    rtt = (time.perf_counter() - t0) * 1000
    if isinstance(status, Outcome):
        return EchoResult(False, rtt, status.reason)
    if status is None:
        return EchoResult(False, rtt, "no C-ECHO response (association aborted or timed out)")
    if status != 0:
        return EchoResult(False, rtt, f"C-ECHO status 0x{status:04X}")
    return EchoResult(True, rtt, "C-ECHO success")


def run_probe(peer: Peer, pairs: Iterable[tuple[str, str]], egress_dial: egress.TcpCheck | None,
              exchange: ProbeExchange) -> tuple[Outcome | None, list[tuple[str, str, bool]]]:
    """Propose each (SOP class, transfer syntax) as its own context; report which the
    peer accepts. Sends no object. Dials what ``egress_dial`` checked, as ``run_echo``."""
    ready = preflight(peer, egress_dial)
    if isinstance(ready, Outcome):
        return ready, []
    pairs = list(dict.fromkeys(pairs))[:MAX_CONTEXTS]
    contexts = [(c, [t]) for c, t in pairs] or [VERIFICATION]
    accepted = exchange(peer, ready, contexts)
    if isinstance(accepted, Outcome):
        return accepted, []
    return None, [(c, t, (c, t) in accepted) for c, t in pairs]


def echo_exchange(peer: Peer, ready: Preflight) -> int | None | Outcome:
    assoc = establish(peer, ready, [VERIFICATION])
    if isinstance(assoc, Outcome):
        return assoc
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return int(status.Status) if status and "Status" in status else None


def probe_exchange(peer: Peer, ready: Preflight, contexts: list[tuple[str, list[str]]]
                   ) -> set[tuple[str, str]] | Outcome:
    assoc = establish(peer, ready, contexts)
    if isinstance(assoc, Outcome):
        return assoc
    try:
        return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
