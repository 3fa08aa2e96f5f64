"""FHIR sender: one httpx client per delivery worker, each Outbound one conditional
update (``PUT {url}/{resourceType}?identifier=urn:dicom:uid|urn:oid:{study_uid}``).

The HTTP plumbing is STOW's (mfconsole/stow/client.py): the url goes only where
``[egress].allowed_http`` allows, checked before every request on the address the
host resolves to (the connection goes to exactly that address), never follows a
redirect, takes no proxy or certificate from the environment, and reads credentials
from their files at each request. Credentials, resources and response bodies are
never logged or put in a reason (status.py reads an OperationOutcome's codes only).

A conditional update is idempotent: a resend after a lost answer updates the same
resource, so a cut-short request is simply sent again.
"""

from __future__ import annotations

import dataclasses
import json
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from mfconsole import __version__, contract, egress
from mfconsole.config import TLSConfig
from mfconsole.contract import DESTINATION, MESSAGE, PERMANENT, Outbound, Outcome
from mfconsole.fhir.status import fhir_http, issue_codes
from mfconsole.stow.client import (ConfigurationProblem, PinnedTransport, authorization, origin,
                                   tls_context)
from mfconsole.stow.response import retry_after

FHIR_JSON = "application/fhir+json"
IDENTIFIER_SYSTEM = "urn:dicom:uid"
MAX_BODY_BYTES = 1024 * 1024           # an OperationOutcome; a larger answer is not read
CHECK_REUSE_S = 2.0                    # as STOW: prepare()'s check serves the next request
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class Target:
    """Where and how to PUT. Built from a destination's config."""
    url: str
    tls: TLSConfig | None = None
    bearer_token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    connect_timeout_s: float = 10.0
    response_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0
    allow_cleartext: bool = False

    @classmethod
    def from_destination(cls, d: Any) -> "Target":
        return cls(url=d.url, tls=d.tls, bearer_token_file=d.bearer_token_file,
                   username=d.username, password_file=d.password_file,
                   connect_timeout_s=d.connect_timeout_s, response_timeout_s=d.response_timeout_s,
                   network_timeout_s=d.network_timeout_s, idle_timeout_s=d.idle_timeout_s,
                   allow_cleartext=d.allow_cleartext)

    @property
    def loopback_only(self) -> bool:
        return urlsplit(self.url).scheme.lower() == "http" and not self.allow_cleartext

    @property
    def extensions(self) -> dict[str, Any]:
        return {"sni_hostname": self.tls.server_name} if self.tls and self.tls.server_name else {}

    @property
    def origin(self) -> str:
        return origin(self.url)

    def endpoint(self, resource_type: str) -> str:
        return self.url.rstrip("/") + "/" + resource_type


def conditional_query(study_uid: str) -> dict[str, str]:
    """The search that picks the one resource a conditional update replaces."""
    return {"identifier": f"{IDENTIFIER_SYSTEM}|urn:oid:{study_uid}"}


def _cause(exc: BaseException | None, kind: type) -> BaseException | None:
    for _ in range(10):
        if exc is None or isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def network_failure(exc: httpx.HTTPError, target: Target) -> Outcome:
    """No HTTP answer: as STOW (contract.py's shared answers)."""
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
            "the resource may be stored: it is sent again (a conditional update is idempotent)")
    if isinstance(exc, httpx.WriteTimeout):
        return contract.transport_failure(
            f"{where} stopped reading the request for network_timeout_s={target.network_timeout_s:g}")
    if isinstance(exc, httpx.RemoteProtocolError):
        return contract.no_response(f"{where} closed the connection without a complete answer; "
                                    "the resource is sent again (a conditional update is idempotent)")
    return contract.transport_failure(f"connection to {where} lost ({exc.__class__.__name__})")


def _configuration(problem: ConfigurationProblem) -> Outcome:
    return Outcome(PERMANENT, DESTINATION, "configuration", str(problem))


def _not_fhir(why: str) -> Outcome:
    return Outcome(PERMANENT, MESSAGE, "not FHIR", f"the handler's output {why}; nothing was sent")


@dataclass(frozen=True)
class Reply:
    status: int
    retry_after_s: float | None
    issues: list[tuple[str, str]] | None
    location: str | None


class FhirSender:
    """Not thread-safe: one sender per delivery worker thread."""

    in_order = False             # studies are independent
    max_batch = (1, 0)           # one resource per request

    def __init__(self, target: Target, egress_dial: egress.HttpCheck):
        self.target = target
        self.egress_dial = egress_dial
        self._client: httpx.Client | None = None
        self._dialled: str | None = None
        self._checked: tuple[egress.Dial, float] | None = None
        self.last_used = 0.0
        self._answered = 0

    def _http(self, dial: egress.Dial) -> httpx.Client:
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

    def _dial(self, url: str) -> egress.Dial | Outcome:
        try:
            verdict = self.egress_dial(url, loopback_only=self.target.loopback_only)
        except OSError as exc:
            return contract.transport_failure(f"cannot connect to {self.target.origin}: {exc}")
        if isinstance(verdict, egress.Refusal):
            return contract.egress_refused(verdict.target, verdict.allowlist, verdict.resolved,
                                           verdict.why)
        return verdict

    def prepare(self, items: Any = ()) -> Outcome | None:
        """Whether a request may go at all: egress and credentials."""
        dial = self._dial(self.target.endpoint("ImagingStudy"))
        if isinstance(dial, Outcome):
            self._checked = None
            return dial
        self._checked = (dial, time.monotonic())
        try:
            authorization(self.target)
        except ConfigurationProblem as exc:
            return _configuration(exc)
        return None

    def close(self) -> None:
        client, self._client, self._dialled = self._client, None, None
        if client is not None:
            client.close()

    def close_if_idle(self, idle_s: float) -> None:
        if self._client is not None and time.monotonic() - self.last_used > idle_s:
            self.close()

    def send_many(self, objs: list[Outbound]) -> list[Outcome]:
        out: list[Outcome] = []
        for obj in objs:
            outcome = self.send_one(obj)
            out.append(outcome)
            if not outcome.is_success and outcome.scope == DESTINATION:
                break
        return out

    def send_one(self, obj: Outbound) -> Outcome:
        resource_type = _resource_type(obj.data)
        if isinstance(resource_type, Outcome):
            return resource_type
        if not _UID.fullmatch(obj.study_uid or "") or len(obj.study_uid) > 64:
            return _not_fhir("has no valid Study Instance UID to identify it by")
        reply = self._request("PUT", self.target.endpoint(resource_type),
                              params=conditional_query(obj.study_uid), content=obj.data)
        if isinstance(reply, Outcome):
            if reply.ambiguous:
                reply = dataclasses.replace(reply, others_delivered=self._answered > 0)
            return reply
        outcome = fhir_http(reply.status, reply.retry_after_s, reply.issues)
        if outcome.is_success:
            self._answered += 1
        elif reply.location and 300 <= reply.status < 400:
            outcome = dataclasses.replace(outcome, reason=f"{outcome.reason} (Location: "
                                          f"{origin(reply.location)})")
        return outcome

    def _request(self, method: str, url: str, *, params: dict[str, str] | None = None,
                 content: bytes | None = None) -> Reply | Outcome:
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
            return _configuration(exc)
        headers = {"Accept": FHIR_JSON, "Prefer": "return=minimal"}
        if content is not None:
            headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
        if auth is not None:
            headers["Authorization"] = auth
        self.last_used = time.monotonic()
        try:
            with client.stream(method, url, params=params, content=content, headers=headers,
                               extensions=self.target.extensions) as r:
                raw = _read_bounded(r)
                reply = Reply(r.status_code, retry_after(r.headers.get("retry-after")),
                              issue_codes(raw), r.headers.get("location"))
        except httpx.HTTPError as exc:
            self.close()
            return network_failure(exc, self.target)
        finally:
            self.last_used = time.monotonic()
        return reply


def _resource_type(data: bytes) -> str | Outcome:
    """The resourceType of the JSON a handler made (the engine serialised its dict)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return _not_fhir("is not JSON")
    kind = doc.get("resourceType") if isinstance(doc, dict) else None
    if not isinstance(kind, str) or not _RESOURCE_TYPE.fullmatch(kind):
        return _not_fhir("has no valid resourceType")
    return kind


def _read_bounded(r: httpx.Response) -> bytes:
    out = bytearray()
    for chunk in r.iter_raw():
        out += chunk
        if len(out) > MAX_BODY_BYTES:
            return b""
    return bytes(out)


# -- operator tools ---------------------------------------------------------------------

@dataclass(frozen=True)
class EchoResult:
    ok: bool
    rtt_ms: float
    detail: str


def echo(target: Target, egress_dial: egress.HttpCheck) -> EchoResult:
    """GET {url}/metadata: the server's CapabilityStatement, over the same egress check,
    TLS and credentials as deliveries; writes nothing."""
    sender = FhirSender(target, egress_dial)
    t0 = time.perf_counter()
    try:
        reply = sender._request("GET", target.url.rstrip("/") + "/metadata")
    finally:
        sender.close()
    rtt = (time.perf_counter() - t0) * 1000
    if isinstance(reply, Outcome):
        return EchoResult(False, rtt, reply.reason)
    if reply.status == 200:
        return EchoResult(True, rtt, "HTTP 200 to GET metadata (CapabilityStatement)")
    verdict = fhir_http(reply.status)
    where = f" (Location: {origin(reply.location)})" if reply.location and 300 <= reply.status < 400 else ""
    return EchoResult(False, rtt, f"{verdict.reason} to GET metadata{where}")
