"""One delivery worker's session with an HTTP destination: one httpx client per
address dialled, reused across requests.

Every request goes only where ``[egress].allowed_http`` allows, checked before it on
the address the url's host resolves to (the connection goes to exactly that address:
transport.py), never follows a redirect, never takes a proxy or certificates from the
environment, and carries the credentials read from their files at that moment. The
answer's body is read up to a bound; nothing of it, nor a credential, is logged or
put in a reason.
"""

from __future__ import annotations

import email.utils
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx

from mfconsole import __version__, contract, egress
from mfconsole.contract import Outcome
from mfconsole.httpdest.target import (ConfigurationProblem, Target, authorization,
                                       configuration_failure, tls_context)
from mfconsole.httpdest.transport import PinnedTransport

# httpx logs every request at INFO and httpcore traces at DEBUG; neither may ever
# carry a header of ours (Authorization) or a body into the log.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

# prepare()'s egress check serves the request that follows it (after the claim), if
# that comes this soon; later requests are checked anew (one resolution per request).
CHECK_REUSE_S = 2.0
RETRY_AFTER_MAX_S = 3600.0   # a server controls Retry-After: bound it


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as the protocols read it. ``body`` is empty when the server sent
    none or more than the request's bound (a cut document would not parse anyway)."""
    status: int
    content_type: str
    retry_after_s: float | None
    location: str | None
    body: bytes


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    rtt_ms: float
    detail: str


class Session:
    """Not thread-safe: one per delivery worker thread. ``resent`` says what happens
    to a request that got no answer (it is idempotent, so it is sent again), e.g.
    "the objects may be stored: they are sent again (STOW is idempotent)";
    ``resent_after_drop`` when a dropped connection is said otherwise."""

    def __init__(self, target: Target, egress_dial: egress.HttpCheck, *, resent: str,
                 resent_after_drop: str | None = None):
        self.target = target
        self.egress_dial = egress_dial   # url → the address to dial, or a Refusal
        self.resent = resent
        self.resent_after_drop = resent_after_drop if resent_after_drop is not None else resent
        self._client: httpx.Client | None = None
        self._dialled: str | None = None   # the address self._client connects to
        self._checked: tuple[egress.Dial, float] | None = None   # prepare()'s, for request()
        self.last_used = 0.0

    # -- connection -------------------------------------------------------------------

    def _http(self, dial: egress.Dial) -> httpx.Client:
        """The client for ``dial``: a kept-alive connection is reused only while the
        check keeps answering the same address; another address gets a new client."""
        if self._client is not None and self._dialled != dial.address:
            self.close()
        if self._client is None:
            t = self.target
            ctx = tls_context(t) if t.https else None
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

    def _dial(self, url: str) -> egress.Dial | Outcome:
        """The address the url's host resolves to now, if [egress].allowed_http allows it;
        else the refusal (permanent, nothing sent) or, when the host does not resolve,
        a transport failure."""
        try:
            verdict = self.egress_dial(url, loopback_only=self.target.loopback_only)
        except OSError as exc:   # the host name does not resolve now
            return contract.transport_failure(f"cannot connect to {self.target.origin}: {exc}")
        if isinstance(verdict, egress.Refusal):
            return contract.egress_refused(verdict.target, verdict.allowlist, verdict.resolved,
                                           verdict.why)
        return verdict

    def prepare(self, url: str) -> Outcome | None:
        """Whether a request to ``url`` may go at all: egress and credentials. HTTP
        connects per request, so there is nothing to open ahead of time."""
        dial = self._dial(url)
        if isinstance(dial, Outcome):
            self._checked = None
            return dial
        self._checked = (dial, time.monotonic())
        try:
            authorization(self.target)
        except ConfigurationProblem as exc:
            return configuration_failure(exc)
        return None

    def close(self) -> None:
        client, self._client, self._dialled = self._client, None, None
        if client is not None:
            client.close()

    def close_if_idle(self, idle_s: float) -> None:
        if self._client is not None and time.monotonic() - self.last_used > idle_s:
            self.close()

    # -- one request ------------------------------------------------------------------

    def request(self, method: str, url: str, *, headers: dict[str, str], max_body: int,
                params: dict[str, str] | None = None, content: Any = None) -> Answer | Outcome:
        """One request and its answer, or the Outcome of not getting one (egress refused,
        unusable credentials, no connection, no complete answer)."""
        # Before every request: a reload may have narrowed [egress].allowed_http, DNS may
        # have moved the host. The check prepare() just made counts for the first one.
        checked, self._checked = self._checked, None
        fresh = checked is not None and time.monotonic() - checked[1] < CHECK_REUSE_S
        dial = checked[0] if fresh and checked is not None else self._dial(url)
        if isinstance(dial, Outcome):
            self.close()
            return dial
        try:
            auth = authorization(self.target)
            client = self._http(dial)
        except ConfigurationProblem as exc:
            return configuration_failure(exc)
        if auth is not None:
            headers = {**headers, "Authorization": auth}
        self.last_used = time.monotonic()
        try:
            with client.stream(method, url, params=params, content=content, headers=headers,
                               extensions=self.target.extensions) as r:
                answer = Answer(r.status_code, r.headers.get("content-type", ""),
                                retry_after(r.headers.get("retry-after")),
                                r.headers.get("location"), read_bounded(r, max_body))
        except httpx.HTTPError as exc:
            self.close()   # never reuse a connection in an unknown state
            return network_failure(exc, self.target, self.resent, self.resent_after_drop)
        finally:
            self.last_used = time.monotonic()
        return answer


def read_bounded(r: httpx.Response, max_body: int) -> bytes:
    """The body up to ``max_body`` bytes; a larger one reads as empty."""
    out = bytearray()
    for chunk in r.iter_raw():
        out += chunk
        if len(out) > max_body:
            return b""
    return bytes(out)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After (RFC 9110 10.2.3) in seconds to wait: delay-seconds or an
    HTTP-date, capped at RETRY_AFTER_MAX_S."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:     # HTTP-dates are GMT
            return None
        seconds = when.timestamp() - (now if now is not None else time.time())
    return max(0.0, min(seconds, RETRY_AFTER_MAX_S))


# -- failures without an HTTP answer ---------------------------------------------------

def _cause(exc: BaseException | None, kind: type) -> BaseException | None:
    for _ in range(10):
        if exc is None or isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def network_failure(exc: httpx.HTTPError, target: Target, resent: str,
                    resent_after_drop: str | None = None) -> Outcome:
    """No HTTP answer (status-classes: transient; a TLS trust failure is permanent).
    ``resent`` ends the reason of an answer that may have been lost after the server
    acted on the request (see Session)."""
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
            + resent)
    if isinstance(exc, httpx.WriteTimeout):
        return contract.transport_failure(
            f"{where} stopped reading the request for network_timeout_s={target.network_timeout_s:g}")
    if isinstance(exc, httpx.RemoteProtocolError):
        return contract.no_response(f"{where} closed the connection without a complete answer; "
                                    + (resent_after_drop if resent_after_drop is not None else resent))
    return contract.transport_failure(f"connection to {where} lost ({exc.__class__.__name__})")
