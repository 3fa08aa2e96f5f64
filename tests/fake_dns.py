"""A resolver the test controls, and a trap listener that must stay silent.

    dns = FakeDNS(monkeypatch, {"pacs.test": ["127.0.0.1"]})
    dns.set("pacs.test", "127.0.0.2")        # a DNS or /etc/hosts change, now
    dns.set_then("pacs.test", ["127.0.0.1"], ["127.0.0.2"])   # changes right after one lookup

FakeDNS replaces ``socket.getaddrinfo`` in this process (the in-process engine, its
workers, pynetdicom, httpcore): the names it holds answer with their addresses (in
that order), ``localhost`` included when it is set; every other host — literal
addresses, names it does not hold — goes to the real resolver. Peers in subprocesses
are not affected.

    with Trap(port) as trap:                 # listens on 127.0.0.2:port
        ...
        assert trap.connections == 0 and trap.received == b""

127.0.0.0/8 is all loopback on Linux: a peer on 127.0.0.1:port and the trap on
127.0.0.2:port are two listeners, and what reaches the trap went to the wrong address.
"""

from __future__ import annotations

import socket
import threading
from typing import Any


class FakeDNS:
    def __init__(self, monkeypatch: Any, names: dict[str, list[str]] | None = None):
        self._real = socket.getaddrinfo
        self._lock = threading.Lock()
        self.names: dict[str, list[str]] = {}
        self._next: dict[str, list[str]] = {}
        self.lookups: list[str] = []
        for name, addresses in (names or {}).items():
            self.set(name, *addresses)
        monkeypatch.setattr(socket, "getaddrinfo", self._getaddrinfo)

    def set(self, name: str, *addresses: str) -> None:
        """``name`` resolves to ``addresses`` from now on (none: it does not resolve)."""
        with self._lock:
            self.names[name.lower().rstrip(".")] = list(addresses)
            self._next.pop(name.lower().rstrip("."), None)

    def set_then(self, name: str, first: list[str], then: list[str]) -> None:
        """The next lookup of ``name`` answers ``first``, every later one ``then``: a
        name that moves between a check and a second resolution."""
        self.set(name, *then)
        with self._lock:
            self._next[name.lower().rstrip(".")] = list(first)

    def count(self, name: str) -> int:
        """How many times ``name`` was looked up so far."""
        with self._lock:
            return self.lookups.count(name.lower().rstrip("."))

    def _getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                     flags: int = 0) -> list[Any]:
        key = host.lower().rstrip(".") if isinstance(host, str) else None
        with self._lock:
            addresses = self.names.get(key) if key is not None else None
            if addresses is not None:
                self.lookups.append(key)
                addresses = self._next.pop(key, addresses)
        if addresses is None:
            return self._real(host, port, family, type, proto, flags)
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out: list[Any] = []
        for address in addresses:
            try:
                out += self._real(address, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            except socket.gaierror:
                continue   # another family than asked for
        if not out:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return out


class Trap:
    """A plain TCP listener on ``host:port`` that records every connection and byte."""

    def __init__(self, port: int, host: str = "127.0.0.2"):
        self.address = (host, port)
        self.connections = 0
        self.received = b""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(self.address)
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._accept, name=f"trap-{port}", daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                with self._lock:
                    self.received += chunk

    @property
    def silent(self) -> bool:
        with self._lock:
            return self.connections == 0 and not self.received

    def __enter__(self) -> "Trap":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
