"""A FHIR server for the tests, just enough of one: conditional update of any resource
type (``PUT /fhir/{type}?identifier=system|value``), every resource validated as FHIR
R4 with fhir.resources (tests/fhir_models.py), GET /fhir/metadata.

    server = FhirServer().start()
    server.url                        # http://127.0.0.1:PORT/fhir
    server.script(unavailable("2"))   # the next PUT answers 503 + Retry-After: 2
    server.duplicates = True          # every search matches twice: 412
    server.resources                  # (type, id) -> the stored resource
    server.requests                   # every request: method, path, query, headers, body

Answers like a FHIR server (http.html#cond-update): no match → 201 Created (new id,
Location), one match → 200 OK (same id: a resend keeps one resource), several → 412;
an invalid resource → 422 with an OperationOutcome (whose diagnostics quote the
validator, values included, as real servers do). Threaded, bound to 127.0.0.1; TLS
with an SSL server context (tlsgen.server_context).
"""

from __future__ import annotations

import json
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from fhir_models import validate
from http_server import Handler, ScriptedServer

FHIR_JSON = "application/fhir+json"


@dataclass
class Request:
    at: float
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0


Behaviour = Callable[["FhirServer", Request, "_Handler"], bool]   # True: answered


def answer(status: int, body: bytes = b"", content_type: str = "text/plain", **headers: str) -> Behaviour:
    def run(server: "FhirServer", req: Request, h: "_Handler") -> bool:
        h.reply(status, body, content_type, {k.replace("_", "-").title(): v for k, v in headers.items()})
        return True
    return run


def unavailable(retry_after: str) -> Behaviour:
    return answer(503, b"", "text/plain", retry_after=retry_after)


def drop() -> Behaviour:
    """Close the connection without an answer."""
    def run(server: "FhirServer", req: Request, h: "_Handler") -> bool:
        import socket
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True
    return run


def outcome(severity: str, code: str, diagnostics: str) -> bytes:
    return json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": severity, "code": code, "diagnostics": diagnostics}]}).encode()


class _Handler(Handler):
    server: Any   # http_server._HTTPServer, owner: FhirServer

    def reply(self, status: int, body: bytes = b"", content_type: str = FHIR_JSON,
              headers: dict[str, str] | None = None) -> None:
        self._req.status = status
        super().reply(status, body, content_type, headers)

    def _record(self) -> Request:
        parts = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
        self._req = Request(time.time(), self.command, parts.path, parse_qs(parts.query),
                            dict(self.headers.items()), body)
        with self.server.owner.lock:
            self.server.owner.requests.append(self._req)
        return self._req

    def do_GET(self) -> None:
        req = self._record()
        if req.path == "/fhir/metadata":
            self.reply(200, json.dumps({"resourceType": "CapabilityStatement", "status": "active",
                                        "kind": "instance", "fhirVersion": "4.0.1",
                                        "format": ["json"], "date": "2026-01-01"}).encode())
        else:
            self.reply(404, b"", "text/plain")

    def do_PUT(self) -> None:
        owner = self.server.owner
        req = self._record()
        behaviour = owner.next_behaviour()
        if behaviour is not None and behaviour(owner, req, self):
            return
        owner.conditional_update(req, self)


@dataclass
class FhirServer(ScriptedServer):
    tls: ssl.SSLContext | None = None
    duplicates: bool = False
    requests: list[Request] = field(default_factory=list)
    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    thread_name = "fhir-server"

    def __post_init__(self) -> None:
        self._serve(_Handler)

    @property
    def url(self) -> str:
        return f"{self.base}/fhir"

    def puts(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method == "PUT"]

    def conditional_update(self, req: Request, h: _Handler) -> None:
        parts = req.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "fhir":
            h.reply(404, b"", "text/plain")
            return
        kind = parts[1]
        if not req.headers.get("Content-Type", "").startswith(FHIR_JSON):
            h.reply(415, outcome("error", "not-supported", "Content-Type"))
            return
        try:
            resource = json.loads(req.body)
            assert resource.get("resourceType") == kind, "resourceType does not match the url"
            validate(resource)
        except Exception as exc:      # what a validator says, values and all
            h.reply(422, outcome("error", "invalid", f"{exc.__class__.__name__}: {exc}"))
            return
        (wanted,) = req.query.get("identifier", [""])[:1] or [""]
        system, _, value = wanted.partition("|")
        with self.lock:
            matches = [rid for (k, rid), r in self.resources.items() if k == kind and any(
                i.get("system") == system and i.get("value") == value for i in r.get("identifier", []))]
            if self.duplicates and matches:
                matches = matches * 2
            if len(matches) > 1:
                h.reply(412, outcome("error", "multiple-matches", f"{len(matches)} {kind} match {wanted}"))
                return
            rid = matches[0] if matches else uuid.uuid4().hex[:16]
            self.resources[(kind, rid)] = {**resource, "id": rid}
        h.reply(200 if matches else 201, b"", FHIR_JSON,
                {"Location": f"{self.url}/{kind}/{rid}/_history/1"})
