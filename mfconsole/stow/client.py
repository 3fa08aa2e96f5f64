"""STOW-RS sender: each request carries one study's instances (the delivery framework
cuts the groups) as one POST to ``{url}/studies``.

The HTTP plumbing is mfconsole/httpdest's (one session per delivery worker): the
request goes only where ``[egress].allowed_http`` allows, checked before every request
on the address the url's host resolves to, never follows a redirect, takes no proxy or
certificate from the environment, and carries credentials read from their files at
each request. Credentials and response bodies are never logged or put in a reason.

A 413, or a refusal the body does not explain per instance, splits the batch in
halves until the instance at fault stands alone: one poison object must not
dead-letter the innocent objects sent with it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from mfconsole import egress
from mfconsole.contract import DESTINATION, MESSAGE, Outbound, Outcome
from mfconsole.httpdest import target as http_target
from mfconsole.httpdest.session import EchoResult, Session
from mfconsole.httpdest.target import origin
from mfconsole.stow import multipart, response
from mfconsole.stow.status import stow_http

MIB = 1024 * 1024
ACCEPT = "application/dicom+json"
# What a reason says of a batch whose answer was lost (status-classes: no response).
RESENT = "the objects may be stored: they are sent again (STOW is idempotent)"


@dataclass(frozen=True)
class Target(http_target.Target):
    """Where and how to POST, and how many instances a request carries."""
    batch_max_objects: int = 10
    batch_max_mb: int = 16

    @property
    def studies_url(self) -> str:
        return self.url.rstrip("/") + "/studies"


# -- the sender ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    status: int
    answer: response.Answer | None
    retry_after_s: float | None
    location: str | None


class StowSender:
    """Not thread-safe: one sender per delivery worker thread. The connection, its
    egress check and the credentials are the session's (mfconsole/httpdest)."""

    in_order = False     # instances are independent: a failed one holds up nothing

    def __init__(self, target: Target, egress_dial: egress.HttpCheck):
        self.target = target
        self.session = Session(target, egress_dial, resent=RESENT)
        self.max_batch = (target.batch_max_objects, target.batch_max_mb * MIB)
        self._answered = 0   # requests of this worker that stored something

    def prepare(self, items: Any = ()) -> Outcome | None:
        """Whether a request may go at all: egress and credentials."""
        return self.session.prepare(self.target.studies_url)

    def close(self) -> None:
        self.session.close()

    def close_if_idle(self, idle_s: float) -> None:
        self.session.close_if_idle(idle_s)

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
        body = multipart.build(objs)
        headers = {"Content-Type": body.content_type, "Content-Length": str(body.length),
                   "Accept": ACCEPT}
        # The body is only parsed for per-instance results: a larger one reads as none.
        answer = self.session.request("POST", self.target.studies_url, headers=headers,
                                      content=body.chunks, max_body=response.MAX_BODY_BYTES)
        if isinstance(answer, Outcome):
            return answer
        return Reply(answer.status,
                     response.parse(answer.content_type, answer.body) if answer.body else None,
                     answer.retry_after_s, answer.location)


# -- operator tools ---------------------------------------------------------------------

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
