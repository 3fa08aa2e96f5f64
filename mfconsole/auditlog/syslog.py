"""Syslog messages (RFC 5424) over TLS (RFC 5425) or, to a loopback collector, TCP.

A message is ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM XML``; on the
stream each is framed by octet counting (``LEN SP MESSAGE``, RFC 5425 4.3), so the
XML may hold newlines.

Syslog has no acknowledgement. So that "written" means "read by the receiver", a
batch is sent on a connection of its own that we then close: our TLS close_notify (a
TCP half-close in cleartext) goes after the last message, and the batch counts as
delivered only when the receiver closes its side in turn, which it does after reading
everything before it. A receiver that dies before then leaves the batch unconfirmed:
it is sent again (at-least-once; never lost).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

BOM = b"\xef\xbb\xbf"
MSGID = "IHE+RFC-3881"
FACILITY_AUTHPRIV = 10          # security/authorization messages (RFC 5424 table 1)
NOTICE, WARNING = 5, 4


class SendError(OSError):
    """A batch was not (or not provably) read by the receiver; ``why`` in safe words."""


def _field(text: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` long, "-" when empty."""
    clean = "".join(c for c in text if "!" <= c <= "~")[:limit]
    return clean or "-"


def timestamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def format_message(body: bytes, *, ts: float, hostname: str, app_name: str, procid: str,
                   severity: int = NOTICE, facility: int = FACILITY_AUTHPRIV,
                   msgid: str = MSGID) -> bytes:
    """One RFC 5424 message: header, no structured data, MSG = BOM + UTF-8 ``body``."""
    header = (f"<{facility * 8 + severity}>1 {timestamp(ts)} {_field(hostname, 255)} "
              f"{_field(app_name, 48)} {_field(procid, 128)} {_field(msgid, 32)} - ")
    return header.encode("ascii") + BOM + body


def frame(message: bytes) -> bytes:
    """Octet-counting framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


@dataclass(frozen=True)
class Target:
    """Where to send: the address to dial (checked by the caller's allowlist), the
    host as configured (the name TLS verifies), and the TLS context (None: cleartext)."""
    host: str
    address: str
    port: int
    context: ssl.SSLContext | None
    server_hostname: str


def send_batch(target: Target, messages: Iterable[bytes], *, timeout_s: float,
               connect: Callable[..., socket.socket] = socket.create_connection) -> int:
    """Send ``messages`` (already formatted) on a new connection and wait until the
    receiver has read them all (see the module's docstring). Returns the bytes sent;
    raises SendError otherwise."""
    where = f"{target.host}:{target.port}"
    try:
        raw = connect((target.address, target.port), timeout=timeout_s)
    except OSError as exc:
        raise SendError(f"cannot connect to {where}: {exc.strerror or exc.__class__.__name__}") from None
    sock: Any = raw
    try:
        if target.context is not None:
            try:
                sock = target.context.wrap_socket(raw, server_hostname=target.server_hostname)
            except ssl.SSLCertVerificationError as exc:
                raise SendError(f"TLS with {where}: {exc.verify_message or 'certificate not trusted'}") from None
            except (ssl.SSLError, OSError) as exc:
                raise SendError(f"TLS with {where}: {getattr(exc, 'reason', None) or exc.__class__.__name__}") from None
        data = b"".join(frame(msg) for msg in messages)
        try:
            sock.sendall(data)
            _confirm(sock)
        except (ssl.SSLError, OSError) as exc:
            raise SendError(f"sending to {where}: {getattr(exc, 'reason', None) or exc.strerror or exc.__class__.__name__}") from None
        return len(data)
    finally:
        try:
            sock.close()
        except OSError:
            pass


def _confirm(sock: Any) -> None:
    """Close our side and wait for the receiver to close its own: it has then read all
    we sent. Anything else it sends is not syslog and is dropped."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.unwrap()           # our close_notify; returns at the receiver's
            return
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return                  # it closed the connection after reading ours: done
    else:
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
