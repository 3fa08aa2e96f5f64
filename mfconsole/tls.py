"""TLS for every connection, one policy: DICOM PS3.15's BCP 195 profile (RFC 9325).

TLS 1.2 or later (1.3 whenever both sides offer it: OpenSSL picks the highest common
version), AEAD suites with forward secrecy only (every TLS 1.3 suite is AEAD), no
compression, no renegotiation. Clients always verify the peer's chain and its name
(``server_name``, else the host they dial); a listener asks for a client certificate
only with ``require_client_cert`` (mTLS), verified against ``ca_file``.

Listeners, DIMSE, STOW-RS and MLLP destinations all build their contexts here, from
the same ``tls`` table (config.TLSConfig). A file that cannot be used raises
TLSSetupError naming its key. Long-lived users hold a Reloading context, so a renewed
certificate is taken at the next connection, without a restart.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from typing import Any, Callable

log = logging.getLogger("mfconsole.tls")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!DSS"


class TLSSetupError(OSError):
    """A certificate, key or CA file cannot be used; ``key`` is its name in the tls table."""

    def __init__(self, key: str, why: str):
        super().__init__(f"tls.{key}: {why}")
        self.key, self.why = key, why


def _policy(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return getattr(exc, "reason", None) or exc.__class__.__name__
    return getattr(exc, "strerror", None) or exc.__class__.__name__


def _load_chain(ctx: ssl.SSLContext, cfg: Any) -> None:
    try:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
    except (OSError, ssl.SSLError) as exc:
        holder = "cert_file and key_file" if cfg.key_file else "cert_file (no key_file)"
        raise TLSSetupError("cert_file", f"{holder} do not give a usable PEM certificate and "
                            f"matching private key ({_why(exc)})") from None


def _load_ca(ctx: ssl.SSLContext, ca_file: Any) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError("ca_file", f"is not a usable PEM CA bundle ({_why(exc)})") from None


def server_context(cfg: Any) -> ssl.SSLContext:
    """A listener's context: its certificate; client certificates only with
    require_client_cert, then required and verified against ca_file."""
    ctx = _policy(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(ctx, cfg)
    if cfg.require_client_cert:
        _load_ca(ctx, cfg.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cfg: Any = None) -> ssl.SSLContext:
    """A destination's context: chain and name always verified, against ca_file (only
    that bundle) or else the system trust store; cert_file for mTLS."""
    ctx = _policy(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))   # CERT_REQUIRED, check_hostname
    if cfg is not None and cfg.ca_file is not None:
        _load_ca(ctx, cfg.ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cfg is not None and cfg.cert_file is not None:
        _load_chain(ctx, cfg)
    return ctx


class Reloading:
    """The context ``build`` makes from ``cfg``'s files, made again when one of them
    changes (size, mtime or inode). While a change cannot be loaded (a key renewed
    before its certificate), the previous context stays in use, with a warning."""

    def __init__(self, build: Callable[[Any], ssl.SSLContext], cfg: Any):
        self._build, self._cfg = build, cfg
        self._files = [f for f in (cfg.cert_file, cfg.key_file, cfg.ca_file) if f is not None]
        self._current: tuple[Any, ssl.SSLContext] | None = None

    def _stamp(self) -> tuple[Any, ...]:
        def one(path: Any) -> Any:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return st.st_size, st.st_mtime_ns, st.st_ino
        return tuple(one(f) for f in self._files)

    def get(self) -> ssl.SSLContext:
        """The context for a new connection (TLSSetupError if none could ever be made)."""
        stamp, current = self._stamp(), self._current
        if current is not None and current[0] == stamp:
            return current[1]
        try:
            ctx = self._build(self._cfg)
        except TLSSetupError as exc:
            if current is None:
                raise
            log.warning("%s; the previous certificate files stay in use", exc)
            return current[1]
        self._current = (stamp, ctx)
        return ctx


def server_hostname(cfg: Any, host: str) -> str:
    """The name a destination's certificate must carry (and the SNI we send)."""
    return (cfg.server_name if cfg is not None and cfg.server_name else host).strip("[]")


def accept(ctx: ssl.SSLContext, sock: socket.socket, timeout_s: float) -> ssl.SSLSocket:
    """The server side of a handshake on an accepted socket, within ``timeout_s`` in
    all: CPython applies a socket's timeout to the whole handshake, not to each read,
    so a client dripping half a ClientHello gets no longer than a silent one. Runs on
    the connection's own thread; the socket is closed when it fails."""
    sock.settimeout(timeout_s)
    conn = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        conn.do_handshake()
    except BaseException:
        conn.close()
        raise
    return conn


def failure_reason(exc: BaseException) -> str:
    """Why a handshake failed, in words safe for logs and audit rows (OpenSSL's reason
    codes and verification messages name no data)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return getattr(exc, "verify_message", None) or "certificate verification failed"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
        return "connection closed during the handshake"
    if isinstance(exc, TimeoutError):
        return "handshake not completed in time"
    return _why(exc)


def identities(cert: dict[str, Any] | None) -> set[str]:
    """The names a verified peer certificate is bound by in client_cert_aets,
    lower-cased: its subjectAltName DNS, IP and URI entries when it has a
    subjectAltName; the subject CN only when it has none (RFC 6125 6.4.4: a CN is not
    an identity beside a SAN, so a certificate issued for "other.example" whose CN says
    "ct1" is not ct1)."""
    if not cert:
        return set()
    san = cert.get("subjectAltName") or ()
    if san:
        names = {value for kind, value in san if kind in ("DNS", "IP Address", "URI")}
    else:
        names = {value for rdn in cert.get("subject", ()) for key, value in rdn
                 if key == "commonName"}
    return {n.strip().lower() for n in names if n.strip()}


def describe(conn: ssl.SSLSocket) -> str:
    """Protocol and suite of an established connection, e.g. 'TLSv1.3 TLS_AES_256_GCM_SHA384'."""
    cipher = conn.cipher()
    return f"{conn.version()} {cipher[0] if cipher else ''}".strip()
