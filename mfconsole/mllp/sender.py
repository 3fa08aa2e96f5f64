"""HL7 v2 over MLLP to one EHR interface: a connection reused for many messages.

Framing is 0x0B, message, 0x1C 0x0D. Each message waits for its ACK before the next
goes (delivery is in order per destination); the ACK is read with a deadline and a
size bound, and it only counts when MSA-2 names our MSH-10. Anything else (no ACK, a
garbled or oversized one, another control id) leaves the outcome unknown: the
connection is dropped and the same message (same MSH-10) is sent again later.

Gets message bytes, answers with an Outcome; knows nothing of SQLite or handlers.
"""

from __future__ import annotations

import dataclasses

import select
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Iterable

from mfconsole import contract, egress, tls
from mfconsole.contract import Outbound, Outcome
from mfconsole.mllp.status import hl7_ack

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
MAX_ACK_BYTES = 64 * 1024     # an ACK is a few hundred bytes; more is not an ACK


@dataclass(frozen=True)
class Ack:
    code: str              # MSA-1: AA, AE, AR, CA, CE, CR
    control_id: str        # MSA-2: the MSH-10 it acknowledges
    text: str = ""         # MSA-3 / ERR, routing-safe only when the peer makes it so


class AckError(ValueError):
    """Not a usable ACK (routing-safe message)."""


def frame(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


def control_id(message: bytes) -> str:
    """MSH-10 of an encoded HL7 v2 message."""
    msh = message.split(b"\r", 1)[0]
    if not msh.startswith(b"MSH") or len(msh) < 8:
        raise ValueError("not an HL7 v2 message (no MSH segment first)")
    fields = msh.decode("latin-1").split(msh[3:4].decode("latin-1"))
    return fields[9] if len(fields) > 9 else ""


def parse_ack(payload: bytes) -> Ack:
    """MSA of an ACK message (segments separated by CR; LF tolerated)."""
    text = payload.decode("latin-1").replace("\r\n", "\r").replace("\n", "\r")
    segments = [s for s in text.split("\r") if s]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise AckError("reply is not an HL7 message")
    sep = segments[0][3]
    for seg in segments[1:]:
        fields = seg.split(sep)
        if fields[0] == "MSA":
            if len(fields) < 3 or fields[1] not in ("AA", "AE", "AR", "CA", "CE", "CR"):
                raise AckError("ACK has no valid MSA-1 acknowledgment code")
            return Ack(fields[1], fields[2], fields[3] if len(fields) > 3 else "")
    raise AckError("reply has no MSA segment")


def read_frame(sock: socket.socket, deadline: float, limit: int = MAX_ACK_BYTES) -> bytes:
    """One MLLP block, or AckError/TimeoutError. Bytes before the start block are
    ignored (some peers send a stray LF)."""
    buf = bytearray()
    while True:
        end = buf.find(END_BLOCK)
        start = buf.find(START_BLOCK)
        if start >= 0 and end > start:
            return bytes(buf[start + 1:end])
        if len(buf) > limit + 3:
            raise AckError(f"reply larger than {limit // 1024} KiB without an MLLP end block")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionResetError("peer closed the connection")
        buf += chunk


def _peer_closed(sock: socket.socket) -> bool:
    """True when the peer has closed (or reset) a connection we hold: many receivers
    take one message per connection and then hang up."""
    try:
        ready, _, _ = select.select([sock], [], [], 0)
        if not ready:
            return False
        if not isinstance(sock, ssl.SSLSocket):
            return sock.recv(1, socket.MSG_PEEK) == b""
        # TLS cannot peek. What is readable may be session tickets (TLS 1.3) or the
        # peer's close_notify; an idle MLLP peer sends nothing else.
        sock.setblocking(False)
        try:
            return sock.recv(1) == b""
        except ssl.SSLWantReadError:
            return False
    except OSError:
        return True


def _silent(what: str, others_delivered: bool) -> Outcome:
    """No ACK, or the connection dropped, during one message. Messages go in order, so
    no other message can show the receiver is alive: this is the receiver's failure
    (retried, "down" in time), unless this connection had delivered earlier messages
    and then failed on this one. An ACK that is garbled, oversized or for another
    MSH-10 is an answer, and stays ambiguous (see outbox.attribute)."""
    outcome = contract.no_response(what, others_delivered=others_delivered)
    return outcome if others_delivered else dataclasses.replace(outcome, ambiguous=False)


class MllpSender:
    """One connection to one MLLP peer. Not thread-safe: one per delivery worker."""

    max_batch = (1, 0)
    in_order = True

    def __init__(self, destination: Any, egress_dial: egress.TcpCheck):
        self.host: str = destination.host
        self.port: int = destination.port
        self.connect_timeout_s: float = destination.connect_timeout_s
        self.ack_timeout_s: float = destination.ack_timeout_s
        self.tls = destination.tls
        # Rebuilt at the next connection when a certificate file is renewed.
        self._tls = tls.Reloading(tls.client_context, self.tls) if self.tls is not None else None
        # Cleartext without allow_cleartext: only a loopback address will do.
        self.loopback_only = self.tls is None and not getattr(destination, "allow_cleartext", False)
        self.egress_dial = egress_dial   # host, port → the address to dial, or a Refusal
        self.sock: socket.socket | None = None
        self.last_used = 0.0
        self._acked = 0      # messages this connection delivered (Outcome.others_delivered)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def prepare(self, items: Iterable[Any] = ()) -> Outcome | None:
        if self.sock is not None and not _peer_closed(self.sock):
            return None
        self.close()
        try:   # before every connect: the address the host resolves to now, if allowed
            dial = self.egress_dial(self.host, self.port, loopback_only=self.loopback_only)
        except OSError as exc:   # the host name does not resolve now
            return contract.transport_failure(f"cannot connect to {self.address}: {exc}")
        if isinstance(dial, egress.Refusal):
            return contract.egress_refused(dial.target, dial.allowlist, dial.resolved, dial.why)
        try:
            ctx = self._tls.get() if self._tls is not None else None
        except tls.TLSSetupError as exc:   # a file changed since the config was loaded
            return Outcome(contract.PERMANENT, contract.DESTINATION, "configuration", str(exc))
        try:   # exactly the checked address (no second resolution of the name)
            sock = socket.create_connection((dial.address, dial.port), timeout=self.connect_timeout_s)
        except OSError as exc:
            return contract.transport_failure(
                f"cannot connect to {self.address}: {exc.__class__.__name__} "
                f"(connect_timeout_s={self.connect_timeout_s:g})")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            try:   # the handshake, within connect_timeout_s; it verifies the name, not the address
                sock = ctx.wrap_socket(
                    sock, server_hostname=tls.server_hostname(self.tls, self.host))
            except OSError as exc:
                sock.close()
                return contract.tls_failure(exc, self.address)
        self.sock, self.last_used, self._acked = sock, time.monotonic(), 0
        return None

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def close_if_idle(self, idle_s: float) -> None:
        if self.sock is not None and time.monotonic() - self.last_used > idle_s:
            self.close()

    def send_many(self, objs: list[Outbound]) -> list[Outcome]:
        done: list[Outcome] = []
        for obj in objs:
            done.append(self.send(obj.data))
            if not done[-1].is_success:   # in order: nothing overtakes a failed message
                break
        return done

    def send(self, message: bytes) -> Outcome:
        try:
            ours = control_id(message)
        except ValueError as exc:
            return Outcome(contract.PERMANENT, contract.MESSAGE, "not HL7", str(exc))
        reused = self.sock is not None
        failed = self.prepare()
        if failed is not None:
            return failed
        reused = reused and self.sock is not None
        others = self._acked > 0
        try:
            try:
                ack = self._exchange(message)
            except OSError as exc:
                if not reused or isinstance(exc, TimeoutError):
                    raise
                # The peer hung up on an idle connection just as we reused it (its FIN
                # was still on the way): once more on a fresh connection.
                self.close()
                failed = self.prepare()
                if failed is not None:
                    return failed
                ack = self._exchange(message)
        except TimeoutError:
            self.close()
            return _silent(f"no ACK within ack_timeout_s={self.ack_timeout_s:g}; "
                           f"MSH-10 {ours} will be sent again", others)
        except AckError as exc:
            self.close()
            return contract.no_response(f"{exc}; MSH-10 {ours} will be sent again",
                                        others_delivered=others)
        except OSError as exc:
            self.close()
            return _silent(f"connection to {self.address} lost during the exchange "
                           f"({exc.__class__.__name__}); MSH-10 {ours} will be sent again", others)
        self.last_used = time.monotonic()
        if ack.control_id != ours:
            self.close()
            return contract.no_response(f"ACK for MSH-10 {ack.control_id!r}, not ours ({ours}); "
                                        "sent again", others_delivered=others)
        outcome = hl7_ack(ack.code)
        if outcome.is_success:
            self._acked += 1
        return outcome

    def _exchange(self, message: bytes) -> Ack:
        assert self.sock is not None
        self.sock.settimeout(self.ack_timeout_s)
        self.sock.sendall(frame(message))
        return parse_ack(read_frame(self.sock, time.monotonic() + self.ack_timeout_s))
