"""FHIR sender: one httpx client per delivery worker, each Outbound one conditional
update (``PUT {url}/{resourceType}?identifier=urn:dicom:uid|urn:oid:{study_uid}``).

The HTTP plumbing is mfconsole/httpdest's, as for STOW: the url goes only where
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
import time
from dataclasses import dataclass
from typing import Any

from mfconsole import egress
from mfconsole.contract import DESTINATION, MESSAGE, PERMANENT, Outbound, Outcome
from mfconsole.fhir.status import fhir_http, issue_codes
from mfconsole.httpdest import target as http_target
from mfconsole.httpdest.session import EchoResult, Session
from mfconsole.httpdest.target import origin

FHIR_JSON = "application/fhir+json"
IDENTIFIER_SYSTEM = "urn:dicom:uid"
MAX_BODY_BYTES = 1024 * 1024           # an OperationOutcome; a larger answer is not read
# What a reason says of a resource whose answer was lost (status-classes: no response).
RESENT = "the resource may be stored: it is sent again (a conditional update is idempotent)"
RESENT_AFTER_DROP = "the resource is sent again (a conditional update is idempotent)"
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class Target(http_target.Target):
    """Where and how to PUT."""

    def endpoint(self, resource_type: str) -> str:
        return self.url.rstrip("/") + "/" + resource_type


def conditional_query(study_uid: str) -> dict[str, str]:
    """The search that picks the one resource a conditional update replaces."""
    return {"identifier": f"{IDENTIFIER_SYSTEM}|urn:oid:{study_uid}"}


def _not_fhir(why: str) -> Outcome:
    return Outcome(PERMANENT, MESSAGE, "not FHIR", f"the handler's output {why}; nothing was sent")


@dataclass(frozen=True)
class Reply:
    status: int
    retry_after_s: float | None
    issues: list[tuple[str, str]] | None
    location: str | None


class FhirSender:
    """Not thread-safe: one sender per delivery worker thread. The connection, its
    egress check and the credentials are the session's (mfconsole/httpdest)."""

    in_order = False             # studies are independent
    max_batch = (1, 0)           # one resource per request

    def __init__(self, target: Target, egress_dial: egress.HttpCheck):
        self.target = target
        self.session = Session(target, egress_dial, resent=RESENT, resent_after_drop=RESENT_AFTER_DROP)
        self._answered = 0

    def prepare(self, items: Any = ()) -> Outcome | None:
        """Whether a request may go at all: egress and credentials."""
        return self.session.prepare(self.target.endpoint("ImagingStudy"))

    def close(self) -> None:
        self.session.close()

    def close_if_idle(self, idle_s: float) -> None:
        self.session.close_if_idle(idle_s)

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
        headers = {"Accept": FHIR_JSON, "Prefer": "return=minimal"}
        if content is not None:
            headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
        answer = self.session.request(method, url, headers=headers, params=params,
                                      content=content, max_body=MAX_BODY_BYTES)
        if isinstance(answer, Outcome):
            return answer
        return Reply(answer.status, answer.retry_after_s, issue_codes(answer.body), answer.location)


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


# -- operator tools ---------------------------------------------------------------------

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
