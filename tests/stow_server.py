"""A scriptable STOW-RS server for what a real archive will not do on demand: mixed
per-instance results, 409, 413, 429 with Retry-After, 500, redirects, slow answers,
dropped connections, storing and then dropping the connection.

    server = StowServer().start()
    server.script(answer(429, retry_after="2"), stored())   # then the default
    url = server.url                                        # http://127.0.0.1:PORT/dicom-web
    ...
    server.requests    # every request: time, headers, SOP Instance UIDs, parts
    server.stored      # SOP Instance UID -> the Part 10 bytes it was sent as

Each POST to .../studies takes the next behaviour from the script (the default one
when the script is empty). A behaviour is a function (server, request record, handler)
that answers, or returns without answering to drop the connection. Runs in a thread of
the test process, bound to 127.0.0.1; stop() closes it. With ``tls`` (an SSL server
context, see make_pki) it speaks HTTPS.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

from pydicom import dcmread

from http_server import Handler, ScriptedServer
from tlsgen import make_pki, server_context  # noqa: F401  (make_pki re-exported for the tests)

FAILED, REFERENCED = "00081198", "00081199"


@dataclass
class Request:
    at: float                       # time.time() when the body was read
    path: str
    headers: dict[str, str]
    parts: list[bytes]
    uids: list[str]
    part_types: list[str]
    behaviour: str = ""
    answered_at: float | None = None


Behaviour = Callable[["StowServer", Request, "_Handler"], None]


def split_multipart(body: bytes, content_type: str) -> tuple[list[bytes], list[str]]:
    """The parts of a multipart body and their Content-Type headers (strict enough to
    catch a malformed body from the client under test)."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params["boundary"].strip('"').encode()
    assert body.endswith(b"--" + boundary + b"--\r\n"), "missing close delimiter"
    chunks = body.split(b"--" + boundary)
    assert chunks[0] == b"", "unexpected preamble"
    parts, types = [], []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n"), "part not framed by CRLF"
        head, _, content = chunk[2:-2].partition(b"\r\n\r\n")
        headers = dict(line.split(b":", 1) for line in head.split(b"\r\n"))
        types.append(headers.get(b"Content-Type", b"").strip().decode())
        parts.append(content)
    return parts, types


def dicom_json(request: Request, failed: dict[str, int] | None = None,
               warnings: dict[str, int] | None = None) -> bytes:
    failed, warnings = failed or {}, warnings or {}

    def item(uid: str, reason_tag: str | None, code: int | None) -> dict[str, Any]:
        out = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.11"]},
               "00081155": {"vr": "UI", "Value": [uid]}}
        if reason_tag and code is not None:
            out[reason_tag] = {"vr": "US", "Value": [code]}
        return out

    doc: dict[str, Any] = {
        REFERENCED: {"vr": "SQ", "Value": [item(u, "00081196", warnings.get(u))
                                           for u in request.uids if u not in failed]}}
    if failed:
        doc[FAILED] = {"vr": "SQ", "Value": [item(u, "00081197", c) for u, c in failed.items()]}
    return json.dumps(doc).encode()


def dicom_xml(request: Request, failed: dict[str, int] | None = None,
              warnings: dict[str, int] | None = None) -> bytes:
    failed, warnings = failed or {}, warnings or {}

    def item(n: int, uid: str, reason_tag: str | None, code: int | None) -> str:
        reason = (f'<DicomAttribute tag="{reason_tag}" vr="US"><Value number="1">{code}</Value>'
                  "</DicomAttribute>" if reason_tag and code is not None else "")
        return (f'<Item number="{n}"><DicomAttribute tag="00081155" vr="UI" '
                f'keyword="ReferencedSOPInstanceUID"><Value number="1">{uid}</Value>'
                f"</DicomAttribute>{reason}</Item>")

    stored = [u for u in request.uids if u not in failed]
    text = ('<?xml version="1.0" encoding="utf-8"?>'
            '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
            f'<DicomAttribute tag="{FAILED}" vr="SQ" keyword="FailedSOPSequence">'
            + "".join(item(i + 1, u, "00081197", c) for i, (u, c) in enumerate(failed.items()))
            + f'</DicomAttribute><DicomAttribute tag="{REFERENCED}" vr="SQ" keyword="ReferencedSOPSequence">'
            + "".join(item(i + 1, u, "00081196", warnings.get(u)) for i, u in enumerate(stored))
            + "</DicomAttribute></NativeDicomModel>")
    return text.encode()


# -- behaviours ---------------------------------------------------------------------------

def stored(failed: dict[str, int] | None = None, warnings: dict[str, int] | None = None,
           status: int | None = None, xml: bool = False) -> Behaviour:
    """Store every instance not in ``failed`` and answer with per-instance results
    (200 when nothing failed or warned, else 202, unless ``status`` is given)."""
    def run(server: StowServer, req: Request, h: _Handler) -> None:
        for uid, part in zip(req.uids, req.parts):
            if uid not in (failed or {}):
                server.stored[uid] = part
        code = status or (202 if failed or warnings else 200)
        body = (dicom_xml if xml else dicom_json)(req, failed, warnings)
        h.reply(code, body, "application/dicom+xml" if xml else "application/dicom+json")
    run.__name__ = f"stored({status or ''})"
    return run


def answer(status: int, body: bytes = b"", content_type: str = "text/plain",
           **headers: str) -> Behaviour:
    """A bare answer; nothing is stored. Keyword headers: retry_after="2" → Retry-After."""
    def run(server: StowServer, req: Request, h: _Handler) -> None:
        h.reply(status, body, content_type,
                {k.replace("_", "-").title(): v for k, v in headers.items()})
    run.__name__ = f"answer({status})"
    return run


def too_large(max_parts: int) -> Behaviour:
    """413 for requests of more than ``max_parts`` instances; stored otherwise."""
    def run(server: StowServer, req: Request, h: _Handler) -> None:
        if len(req.parts) > max_parts:
            h.reply(413, b"", "text/plain")
        else:
            stored()(server, req, h)
    run.__name__ = f"too_large({max_parts})"
    return run


def slow(seconds: float, then: Behaviour | None = None) -> Behaviour:
    def run(server: StowServer, req: Request, h: _Handler) -> None:
        if not server.stopping.wait(seconds):
            (then or stored())(server, req, h)
    run.__name__ = f"slow({seconds})"
    return run


def drop(store_first: bool = False) -> Behaviour:
    """Close the connection without a word (after storing, with ``store_first``)."""
    def run(server: StowServer, req: Request, h: _Handler) -> None:
        if store_first:
            for uid, part in zip(req.uids, req.parts):
                server.stored[uid] = part
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    run.__name__ = "store_then_drop" if store_first else "drop"
    return run


# -- the server ------------------------------------------------------------------------------

class _Handler(Handler):
    server: Any   # http_server._HTTPServer, owner: StowServer

    def do_POST(self) -> None:
        owner = self.server.owner
        if isinstance(self.connection, ssl.SSLSocket):
            owner.client_certs.append(self.connection.getpeercert())
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        ctype = self.headers.get("Content-Type", "")
        parts, types = split_multipart(body, ctype) if ctype.startswith("multipart/related") else ([], [])
        uids = [str(dcmread(BytesIO(p), stop_before_pixels=True).SOPInstanceUID) for p in parts]
        req = Request(time.time(), self.path, dict(self.headers.items()), parts, uids, types)
        with owner.lock:   # one step: the requests' order is the behaviours' order
            owner.requests.append(req)
            behaviour = owner._script.pop(0) if owner._script else owner.default
        req.behaviour = behaviour.__name__
        if not self.path.rstrip("/").endswith("/studies"):
            self.reply(404, b"", "text/plain")
            return
        behaviour(owner, req, self)
        req.answered_at = time.time()

    def do_GET(self) -> None:
        with self.server.owner.lock:
            self.server.owner.requests.append(
                Request(time.time(), self.path, dict(self.headers.items()), [], [], []))
        self.reply(404, b"", "text/plain")


@dataclass
class StowServer(ScriptedServer):
    default: Behaviour = field(default_factory=stored)
    tls: ssl.SSLContext | None = None
    requests: list[Request] = field(default_factory=list)
    stored: dict[str, bytes] = field(default_factory=dict)
    client_certs: list[Any] = field(default_factory=list)

    thread_name = "stow-server"

    def __post_init__(self) -> None:
        self.stopping = threading.Event()
        self._serve(_Handler)

    @property
    def url(self) -> str:
        return f"{self.base}/dicom-web"

    def stop(self) -> None:
        self.stopping.set()   # a slow() behaviour stops waiting
        super().stop()

    def posts(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.parts or r.path.endswith("/studies")]


# -- TLS (certificates from tlsgen.make_pki) ------------------------------------------------

def server_tls(pki: dict[str, Path], require_client_cert: bool = False, stem: str = "server") -> ssl.SSLContext:
    return server_context(pki, stem, require_client_cert=require_client_cert)
