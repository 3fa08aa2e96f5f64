"""Connecting to the address [egress] checked: an httpx transport whose connections all
go to one address while the url, Host header, SNI and certificate check keep the name.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpcore
import httpx

from mfconsole import egress


class _PinnedBackend(httpcore.NetworkBackend):
    """httpcore's socket backend, connecting to the address egress checked instead of
    resolving the url's host again. Only the socket's destination changes: httpcore
    still starts TLS with the url's host (or tls.server_name) as SNI and as the name
    the certificate must carry, and httpx still sends it as Host."""

    def __init__(self, dial: egress.Dial):
        self.dial = dial
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None
                    ) -> httpcore.NetworkStream:
        if egress.normal_name(host) != egress.normal_name(self.dial.host) or port != self.dial.port:
            # Only the checked origin goes through this client (redirects are not followed).
            raise httpcore.ConnectError("this connection was not checked against [egress]")
        return self._backend.connect_tcp(self.dial.address, port, timeout=timeout,
                                         local_address=local_address, socket_options=socket_options)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not used")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport over an httpcore pool whose connections all go to one checked
    address (httpx has no network-backend option; its transport keeps everything in
    ``_pool``, which is replaced by a pool built the same way plus the backend)."""

    def __init__(self, dial: egress.Dial, ssl_context: ssl.SSLContext | None, limits: httpx.Limits):
        super().__init__(verify=ssl_context if ssl_context is not None else True,
                         trust_env=False, limits=limits)
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError("httpx.HTTPTransport changed: cannot pin the connection address")
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=_PinnedBackend(dial))
