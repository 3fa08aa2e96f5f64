"""Socket options for every DICOM connection, accepted or opened.

TCP_NODELAY on every socket, and TCP_QUICKACK re-armed before each read: many peers
leave Nagle on (DCMTK since 3.6.2 unless TCP_NODELAY=1 is in its environment), and
without an immediate ACK from us each of their small PDUs waits for the delayed-ACK
timer (~40 ms): ~11 objects/s instead of hundreds, in both directions. The same holds
over TLS (QuickAckSSLSocket, the class of every DICOM TLS context's sockets).

The acceptor (mfconsole/ul/acceptor.py) and the requestor (mfconsole/ul/requestor.py)
put these on every socket they accept or open.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class QuickAckSocket(socket.socket):
    def _quickack(self) -> None:
        if _QUICKACK is not None:
            try:
                self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass

    def recv(self, bufsize: int, flags: int = 0) -> bytes:  # type: ignore[override]
        self._quickack()
        return super().recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:  # type: ignore[override]
        self._quickack()
        return super().recv_into(buffer, nbytes, flags)


class QuickAckSSLSocket(ssl.SSLSocket):
    """TLS with TCP_QUICKACK re-armed before each read."""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:  # type: ignore[override]
        QuickAckSocket._quickack(self)   # type: ignore[arg-type]
        return super().recv(buflen, flags)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:  # type: ignore[override]
        QuickAckSocket._quickack(self)   # type: ignore[arg-type]
        return super().recv_into(buffer, nbytes, flags)


def dicom_context(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """``ctx`` (from mfconsole.tls) with our socket class for its connections."""
    ctx.sslsocket_class = QuickAckSSLSocket
    return ctx


def adopt(raw: socket.socket) -> QuickAckSocket:
    """``raw`` (accepted, or bound and not yet connected) as a QuickAckSocket with
    TCP_NODELAY; ``raw`` is detached and must not be used again."""
    sock = QuickAckSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
