"""Socket options for every DICOM connection, accepted or opened.

TCP_NODELAY on every socket, and TCP_QUICKACK re-armed before each read: many peers
leave Nagle on (DCMTK since 3.6.2 unless TCP_NODELAY=1 is in its environment), and
without an immediate ACK from us each of their small PDUs waits for the delayed-ACK
timer (~40 ms): ~11 objects/s instead of hundreds, in both directions.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import transport

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


def adopt(raw: socket.socket) -> QuickAckSocket:
    """An accepted socket as a QuickAckSocket with TCP_NODELAY."""
    sock = QuickAckSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _create_requestor_socket(self: Any, address: Any) -> socket.socket:
    """pynetdicom's AssociationSocket._create_socket (SO_REUSEADDR, network timeout,
    bind), with our socket class and options."""
    family = socket.AF_INET if address.is_ipv4 else socket.AF_INET6
    sock = QuickAckSocket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if self.assoc.network_timeout is not None:
        sock.settimeout(self.assoc.network_timeout)
    sock.bind(address.as_tuple)
    self._is_connected = False
    return sock


transport.AssociationSocket._create_socket = _create_requestor_socket  # type: ignore[method-assign]
