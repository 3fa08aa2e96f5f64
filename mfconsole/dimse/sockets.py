"""Socket options for every DICOM connection, accepted or opened.

TCP_NODELAY on every socket, and TCP_QUICKACK re-armed before each read: many peers
leave Nagle on (DCMTK since 3.6.2 unless TCP_NODELAY=1 is in its environment), and
without an immediate ACK from us each of their small PDUs waits for the delayed-ACK
timer (~40 ms): ~11 objects/s instead of hundreds, in both directions. The same holds
over TLS (QuickAckSSLSocket, the class of every DICOM TLS context's sockets).

The listener's server and the sender's AE (pynetdicom_adapt.py) put these on their
own sockets; other pynetdicom AEs in the process keep pynetdicom's plain sockets.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class QuickAckSocket(socket.socket):
    # Why a connect failed (refused, unreachable, timed out): pynetdicom logs it and
    # reports only "aborted"; the sender reads it here to say which.
    connect_error: OSError | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            self.connect_error = exc
            raise

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
    """TLS with TCP_QUICKACK re-armed before each read. A failed handshake is kept on
    the context as ``handshake_error``: pynetdicom's requestor swallows it, and a sender
    must tell a certificate it does not trust (pause) from a dropped connection (retry).
    Such a context serves one sender thread at a time."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            self.context.handshake_error = exc   # type: ignore[attr-defined]
            raise

    def connect(self, address: Any) -> None:
        """A failed TCP connect (before any handshake) is kept on the context as
        ``connect_error``, like a failed handshake."""
        try:
            super().connect(address)
        except ssl.SSLError:
            raise
        except OSError as exc:
            if getattr(self.context, "handshake_error", None) is None:
                self.context.connect_error = exc   # type: ignore[attr-defined]
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:  # type: ignore[override]
        QuickAckSocket._quickack(self)   # type: ignore[arg-type]
        return super().recv(buflen, flags)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:  # type: ignore[override]
        QuickAckSocket._quickack(self)   # type: ignore[arg-type]
        return super().recv_into(buffer, nbytes, flags)


def dicom_context(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """``ctx`` (from mfconsole.tls) with our socket class for its connections."""
    ctx.sslsocket_class = QuickAckSSLSocket
    ctx.handshake_error = None   # type: ignore[attr-defined]
    return ctx


def adopt(raw: socket.socket) -> QuickAckSocket:
    """``raw`` (accepted, or bound and not yet connected) as a QuickAckSocket with
    TCP_NODELAY; ``raw`` is detached and must not be used again."""
    sock = QuickAckSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
