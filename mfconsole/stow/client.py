"""STOW-RS sender: one httpx client per delivery worker, reused across requests.

Each request carries one study's instances (the delivery framework cuts the groups),
goes only where ``[egress].allowed_http`` allows (checked before every request), never
follows a redirect, never takes a proxy or certificates from the environment, and
reads the credentials from their files at each request so a rotation needs no
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
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx

from mfconsole import __version__, tls
from mfconsole.config import TLSConfig
from mfconsole.engine import outcomes
from mfconsole.engine.delivery import Outbound
from mfconsole.engine.outcomes import DESTINATION, MESSAGE, PERMANENT, Outcome
from mfconsole.stow import multipart, response

# httpx logs every request at INFO and httpcore traces at DEBUG; neither may ever
# carry a header of ours (Authorization) or a body into the log.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

MIB = 1024 * 1024
ACCEPT = "application/dicom+json"


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

    @classmethod
    def from_destination(cls, d: Any) -> "Target":
        return cls(url=d.url, tls=d.tls, bearer_token_file=d.bearer_token_file,
                   username=d.username, password_file=d.password_file,
                   connect_timeout_s=d.connect_timeout_s, response_timeout_s=d.response_timeout_s,
                   network_timeout_s=d.network_timeout_s, idle_timeout_s=d.idle_timeout_s,
                   batch_max_objects=d.batch_max_objects, batch_max_mb=d.batch_max_mb)

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
        return outcomes.tls_failure(bad_cert, where)
    if isinstance(exc, httpx.ConnectTimeout):
        return outcomes.transport_failure(
            f"no connection to {where} within connect_timeout_s={target.connect_timeout_s:g}")
    if isinstance(exc, httpx.ConnectError):
        handshake = _cause(exc, ssl.SSLError)
        if handshake is not None:
            return outcomes.tls_failure(handshake, where)
        return outcomes.transport_failure(f"cannot connect to {where}: refused, unreachable or "
                                          "unknown host")
    if isinstance(exc, httpx.ReadTimeout):
        return outcomes.no_response(
            f"no answer from {where} within response_timeout_s={target.response_timeout_s:g}; "
            "the objects may be stored: they are sent again (STOW is idempotent)")
    if isinstance(exc, httpx.WriteTimeout):
        return outcomes.transport_failure(
            f"{where} stopped reading the request for network_timeout_s={target.network_timeout_s:g}")
    if isinstance(exc, httpx.RemoteProtocolError):
        return outcomes.no_response(f"{where} closed the connection without a complete answer; "
                                    "the objects may be stored: they are sent again (STOW is idempotent)")
    return outcomes.transport_failure(f"connection to {where} lost ({exc.__class__.__name__})")


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

    def __init__(self, target: Target, egress_allows: Callable[[str], bool]):
        self.target = target
        self.egress_allows = egress_allows
        self.max_batch = (target.batch_max_objects, target.batch_max_mb * MIB)
        self._client: httpx.Client | None = None
        self.last_used = 0.0
        self._answered = 0   # requests of this worker that stored something

    # -- connection -------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        if self._client is None:
            t = self.target
            verify: Any = tls_context(t) if urlsplit(t.url).scheme.lower() == "https" else True
            self._client = httpx.Client(
                verify=verify, trust_env=False, follow_redirects=False,
                timeout=httpx.Timeout(connect=t.connect_timeout_s, read=t.response_timeout_s,
                                      write=t.network_timeout_s, pool=t.connect_timeout_s),
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                    keepalive_expiry=t.idle_timeout_s),
                headers={"User-Agent": f"mfconsole/{__version__}", "Accept-Encoding": "identity"})
        return self._client

    def _egress_refused(self) -> Outcome | None:
        if self.egress_allows(self.target.studies_url):
            return None
        return outcomes.egress_refused(self.target.origin + urlsplit(self.target.url).path,
                                       "allowed_http")

    def prepare(self, items: Any = ()) -> Outcome | None:
        """Whether a request may go at all: egress and credentials. HTTP connects per
        request, so there is nothing to open ahead of time."""
        refused = self._egress_refused()
        if refused is None:
            try:
                authorization(self.target)
            except ConfigurationProblem as exc:
                refused = _configuration(exc)
        return refused

    def close(self) -> None:
        client, self._client = self._client, None
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
        whole = outcomes.stow_http(reply.status, reply.retry_after_s)
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
        refused = self._egress_refused()      # before every request: a reload may have
        if refused is not None:               # narrowed [egress].allowed_http
            return refused
        try:
            auth = authorization(self.target)
            client = self._http()
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


def echo(target: Target, egress_allows: Callable[[str], bool]) -> EchoResult:
    """An empty STOW-RS request (a multipart body without parts): it reaches the very
    endpoint deliveries use, with the same TLS and credentials, and stores nothing."""
    sender = StowSender(target, egress_allows)
    t0 = time.perf_counter()
    try:
        reply = sender._post([])
    finally:
        sender.close()
    rtt = (time.perf_counter() - t0) * 1000
    if isinstance(reply, Outcome):
        return EchoResult(False, rtt, reply.reason)
    verdict = outcomes.stow_http(reply.status)
    if verdict.is_success or (verdict.scope == MESSAGE and 400 <= reply.status < 500):
        # A 4xx about the (empty) content still proves the endpoint and our credentials.
        return EchoResult(True, rtt, f"HTTP {reply.status} to an empty STOW-RS request (nothing stored)")
    where = f" (Location: {origin(reply.location)})" if reply.location else ""
    return EchoResult(False, rtt, verdict.reason + where)
