"""STOW-RS sender: one httpx client per delivery worker, reused across requests.

Each request carries one study's instances (the delivery framework cuts the groups),
goes only where ``[egress].allowed_http`` allows (checked before every request, on the
address the url's host resolves to: the connection goes to exactly that address while
the url, Host header, SNI and certificate check keep the name), never follows a
redirect, never takes a proxy or certificates from the environment, and reads the
credentials from their files at each request so a rotation needs no
restart. Credentials and response bodies are never logged or put in a reason.

A 413, or a refusal the body does not explain per instance, splits the batch in
halves until the instance at fault stands alone: one poison object must not
dead-letter the innocent objects sent with it.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from mfconsole import __version__, contract, egress, tls
from mfconsole.config import TLSConfig
from mfconsole.contract import DESTINATION, MESSAGE, PERMANENT, Outbound, Outcome
from mfconsole.stow import multipart, response
from mfconsole.stow.status import stow_http

# httpx logs every request at INFO and httpcore traces at DEBUG; neither may ever
# carry a header of ours (Authorization) or a body into the log.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

MIB = 1024 * 1024
ACCEPT = "application/dicom+json"
# prepare()'s egress check serves the request that follows it (after the claim), if
# that comes this soon; later requests are checked anew (one resolution per request).
CHECK_REUSE_S = 2.0


@dataclass(frozen=True)
class Target:
    """Where and how to POST. Built from a destination's config."""
    url: str
    tls: TLSConfig | None = None
    bearer_token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    connect_timeout_s: float = 10.0
    response_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0
    batch_max_objects: int = 10
    batch_max_mb: int = 16
    allow_cleartext: bool = False

    @classmethod
    def from_destination(cls, d: Any) -> "Target":
        return cls(url=d.url, tls=d.tls, bearer_token_file=d.bearer_token_file,
                   username=d.username, password_file=d.password_file,
                   connect_timeout_s=d.connect_timeout_s, response_timeout_s=d.response_timeout_s,
                   network_timeout_s=d.network_timeout_s, idle_timeout_s=d.idle_timeout_s,
                   batch_max_objects=d.batch_max_objects, batch_max_mb=d.batch_max_mb,
                   allow_cleartext=d.allow_cleartext)

    @property
    def loopback_only(self) -> bool:
        """http:// without allow_cleartext: only a loopback address will do."""
        return urlsplit(self.url).scheme.lower() == "http" and not self.allow_cleartext

    @property
    def extensions(self) -> dict[str, Any]:
        """httpx request extensions: tls.server_name is the name the archive's
        certificate must carry (and the SNI sent) instead of the url's host."""
        return {"sni_hostname": self.tls.server_name} if self.tls and self.tls.server_name else {}

    @property
    def studies_url(self) -> str:
        return self.url.rstrip("/") + "/studies"

    @property
    def origin(self) -> str:
        return origin(self.url)


def origin(url: str) -> str:
    """scheme://host:port of a URL: what a reason may name (never a path or query)."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
        host = parts.hostname or "?"
    except ValueError:
        return "(unparsable URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme.lower()}://{host}:{port}"


# -- credentials and TLS -------------------------------------------------------------

class ConfigurationProblem(Exception):
    """A credential or certificate file cannot be used; the message names the key."""


def _secret(path: Path, key: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationProblem(f"cannot read {key}: {getattr(exc, 'strerror', None) or exc.__class__.__name__}") from None
    if not value:
        raise ConfigurationProblem(f"{key} is empty")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ConfigurationProblem(f"{key} holds control characters (one line expected)")
    return value


def authorization(target: Target) -> str | None:
    """The Authorization header value, read from the files now (rotation-safe)."""
    if target.bearer_token_file is not None:
        return "Bearer " + _secret(target.bearer_token_file, "bearer_token_file")
    if target.username is not None and target.password_file is not None:
        password = _secret(target.password_file, "password_file")
        pair = f"{target.username}:{password}".encode("utf-8")
        return "Basic " + base64.b64encode(pair).decode("ascii")
    return None


def tls_context(target: Target) -> ssl.SSLContext:
    """mfconsole's client policy (tls.py): verification always on; tls.ca_file
    replaces the system trust store when set."""
    try:
        return tls.client_context(target.tls)
    except tls.TLSSetupError as exc:
        raise ConfigurationProblem(str(exc)) from None


def _configuration(problem: ConfigurationProblem) -> Outcome:
    return Outcome(PERMANENT, DESTINATION, "configuration", str(problem))


# -- connecting to the checked address ------------------------------------------------

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


# -- failures without an HTTP answer ---------------------------------------------------

def _cause(exc: BaseException, kind: type) -> BaseException | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__   # type: ignore[assignment]
        seen += 1
    return None


def network_failure(exc: httpx.HTTPError, target: Target) -> Outcome:
    """No HTTP answer (status-classes: transient; a TLS trust failure is permanent)."""
    where = target.origin
    bad_cert = _cause(exc, ssl.SSLCertVerificationError)
    if bad_cert is not None:
        return contract.tls_failure(bad_cert, where)
    if isinstance(exc, httpx.ConnectTimeout):
        return contract.transport_failure(
            f"no connection to {where} within connect_timeout_s={target.connect_timeout_s:g}")
    if isinstance(exc, httpx.ConnectError):
        handshake = _cause(exc, ssl.SSLError)
        if handshake is not None:
            return contract.tls_failure(handshake, where)
        return contract.transport_failure(f"cannot connect to {where}: refused, unreachable or "
                                          "unknown host")
    if isinstance(exc, httpx.ReadTimeout):
        return contract.no_response(
            f"no answer from {where} within response_timeout_s={target.response_timeout_s:g}; "
            "the objects may be stored: they are sent again (STOW is idempotent)")
    if isinstance(exc, httpx.WriteTimeout):
        return contract.transport_failure(
            f"{where} stopped reading the request for network_timeout_s={target.network_timeout_s:g}")
    if isinstance(exc, httpx.RemoteProtocolError):
        return contract.no_response(f"{where} closed the connection without a complete answer; "
                                    "the objects may be stored: they are sent again (STOW is idempotent)")
    return contract.transport_failure(f"connection to {where} lost ({exc.__class__.__name__})")


# -- the sender ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    status: int
    answer: response.Answer | None
    retry_after_s: float | None
    location: str | None


class StowSender:
    """Not thread-safe: one sender per delivery worker thread."""

    in_order = False     # instances are independent: a failed one holds up nothing

    def __init__(self, target: Target, egress_dial: egress.HttpCheck):
        self.target = target
        self.egress_dial = egress_dial   # url → the address to dial, or a Refusal
        self.max_batch = (target.batch_max_objects, target.batch_max_mb * MIB)
        self._client: httpx.Client | None = None
        self._dialled: str | None = None   # the address self._client connects to
        self._checked: tuple[egress.Dial, float] | None = None   # prepare()'s, for _post
        self.last_used = 0.0
        self._answered = 0   # requests of this worker that stored something

    # -- connection -------------------------------------------------------------------

    def _http(self, dial: egress.Dial) -> httpx.Client:
        """The client for ``dial``: a kept-alive connection is reused only while the
        check keeps answering the same address; another address gets a new client."""
        if self._client is not None and self._dialled != dial.address:
            self.close()
        if self._client is None:
            t = self.target
            ctx = tls_context(t) if urlsplit(t.url).scheme.lower() == "https" else None
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                  keepalive_expiry=t.idle_timeout_s)
            self._client = httpx.Client(
                transport=PinnedTransport(dial, ctx, limits), trust_env=False,
                follow_redirects=False,
                timeout=httpx.Timeout(connect=t.connect_timeout_s, read=t.response_timeout_s,
                                      write=t.network_timeout_s, pool=t.connect_timeout_s),
                headers={"User-Agent": f"mfconsole/{__version__}", "Accept-Encoding": "identity"})
            self._dialled = dial.address
        return self._client

    def _dial(self) -> egress.Dial | Outcome:
        """The address the url's host resolves to now, if [egress].allowed_http allows it;
        else the refusal (permanent, nothing sent) or, when the host does not resolve,
        a transport failure."""
        try:
            verdict = self.egress_dial(self.target.studies_url, loopback_only=self.target.loopback_only)
        except OSError as exc:   # the host name does not resolve now
            return contract.transport_failure(f"cannot connect to {self.target.origin}: {exc}")
        if isinstance(verdict, egress.Refusal):
            return contract.egress_refused(verdict.target, verdict.allowlist, verdict.resolved,
                                           verdict.why)
        return verdict

    def prepare(self, items: Any = ()) -> Outcome | None:
        """Whether a request may go at all: egress and credentials. HTTP connects per
        request, so there is nothing to open ahead of time."""
        dial = self._dial()
        refused = dial if isinstance(dial, Outcome) else None
        self._checked = (dial, time.monotonic()) if isinstance(dial, egress.Dial) else None
        if refused is None:
            try:
                authorization(self.target)
            except ConfigurationProblem as exc:
                refused = _configuration(exc)
        return refused

    def close(self) -> None:
        client, self._client, self._dialled = self._client, None, None
        if client is not None:
            client.close()

    def close_if_idle(self, idle_s: float) -> None:
        if self._client is not None and time.monotonic() - self.last_used > idle_s:
            self.close()

    # -- STOW-RS ----------------------------------------------------------------------

    def send_many(self, objs: list[Outbound]) -> list[Outcome]:
        if not objs:
            return []
        reply = self._post(objs)
        if isinstance(reply, Outcome):       # no answer: nothing is known per instance
            if reply.ambiguous and len(objs) > 1:
                # Dropped with several objects: one of them may be what the archive
                # chokes on. Halve until it travels alone (the engine then attributes
                # the drop to it or to the archive); an archive that is down stops the
                # halving at the first refused connection.
                return self._split(objs)
            if reply.ambiguous:
                reply = dataclasses.replace(reply, others_delivered=self._answered > 0)
            return [reply]
        uids = [o.sop_instance_uid for o in objs]
        results = response.per_instance(reply.status, reply.answer, uids, reply.retry_after_s)
        if any(o.is_success for o in results):
            self._answered += 1
        whole = stow_http(reply.status, reply.retry_after_s)
        if len(objs) > 1 and not whole.is_success and whole.scope == MESSAGE \
                and not response.explains(reply.answer, uids):
            # 413, or a refusal that names no instance: halve until it does, or until
            # the instance at fault travels alone.
            return self._split(objs)
        if not whole.is_success and whole.scope == DESTINATION and not response.explains(reply.answer, uids):
            if reply.location:
                whole = dataclasses.replace(whole, reason=f"{whole.reason} (Location: {origin(reply.location)})")
            return [whole]                   # the batch stops; the rest stays queued
        return results

    def _split(self, objs: list[Outbound]) -> list[Outcome]:
        half = len(objs) // 2
        first = self.send_many(objs[:half])
        if len(first) < half or any(not o.is_success and o.scope == DESTINATION for o in first):
            return first
        return first + self.send_many(objs[half:])

    def _post(self, objs: list[Outbound]) -> Reply | Outcome:
        # Before every request: a reload may have narrowed [egress].allowed_http, DNS may
        # have moved the host. The check prepare() just made counts for the first one.
        checked, self._checked = self._checked, None
        fresh = checked is not None and time.monotonic() - checked[1] < CHECK_REUSE_S
        dial = checked[0] if fresh and checked is not None else self._dial()
        if isinstance(dial, Outcome):
            self.close()
            return dial
        try:
            auth = authorization(self.target)
            client = self._http(dial)
        except ConfigurationProblem as exc:
            return _configuration(exc)
        body = multipart.build(objs)
        headers = {"Content-Type": body.content_type, "Content-Length": str(body.length),
                   "Accept": ACCEPT}
        if auth is not None:
            headers["Authorization"] = auth
        self.last_used = time.monotonic()
        try:
            with client.stream("POST", self.target.studies_url, content=body.chunks,
                               headers=headers, extensions=self.target.extensions) as r:
                raw = _read_bounded(r)
                reply = Reply(r.status_code,
                              response.parse(r.headers.get("content-type", ""), raw) if raw else None,
                              response.retry_after(r.headers.get("retry-after")),
                              r.headers.get("location"))
        except httpx.HTTPError as exc:
            self.close()   # never reuse a connection in an unknown state
            return network_failure(exc, self.target)
        finally:
            self.last_used = time.monotonic()
        return reply


def _read_bounded(r: httpx.Response) -> bytes:
    """The body up to MAX_BODY_BYTES; a larger one is cut (it is only parsed for
    per-instance results, and a truncated document simply does not parse)."""
    out = bytearray()
    for chunk in r.iter_raw():
        out += chunk
        if len(out) > response.MAX_BODY_BYTES:
            return b""
    return bytes(out)


# -- operator tools ---------------------------------------------------------------------

@dataclass(frozen=True)
class EchoResult:
    ok: bool
    rtt_ms: float
    detail: str


def echo(target: Target, egress_dial: egress.HttpCheck) -> EchoResult:
    """An empty STOW-RS request (a multipart body without parts): it reaches the very
    endpoint deliveries use, with the same TLS and credentials, and stores nothing."""
    sender = StowSender(target, egress_dial)
    t0 = time.perf_counter()
    try:
        reply = sender._post([])
    finally:
        sender.close()
    rtt = (time.perf_counter() - t0) * 1000
    if isinstance(reply, Outcome):
        return EchoResult(False, rtt, reply.reason)
    verdict = stow_http(reply.status)
    if verdict.is_success or (verdict.scope == MESSAGE and 400 <= reply.status < 500):
        # A 4xx about the (empty) content still proves the endpoint and our credentials.
        return EchoResult(True, rtt, f"HTTP {reply.status} to an empty STOW-RS request (nothing stored)")
    where = f" (Location: {origin(reply.location)})" if reply.location else ""
    return EchoResult(False, rtt, verdict.reason + where)
