"""Real receivers for alerts in tests: an SMTP server (aiosmtpd) that requires
STARTTLS (a tlsgen certificate for 127.0.0.1) and AUTH before it takes a mail, and a
webhook receiver (http.server) recording each JSON POST with its Authorization.

    smtp = SmtpSink(pki, "mf", "s3cret").start()    # smtp.port, smtp.mails
    hook = WebhookSink().start()                    # hook.url, hook.posts
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from peers import free_port


@dataclass
class SmtpSink:
    pki: dict[str, Path]
    username: str
    password: str
    port: int = 0
    mails: list[Any] = field(default_factory=list)          # email.message.EmailMessage
    logins: list[tuple[str, bool]] = field(default_factory=list)   # (user, accepted)
    _controller: Any = None

    def start(self) -> "SmtpSink":
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        from tlsgen import server_context

        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                sink.mails.append(email.message_from_bytes(envelope.content,
                                                           policy=email.policy.default))
                return "250 OK"

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == self.username
                  and auth_data.password.decode() == self.password)
            self.logins.append((auth_data.login.decode() if isinstance(auth_data, LoginPassword)
                                else "?", ok))
            return AuthResult(success=ok, handled=False)   # handled=False: it answers 535

        self.port = self.port or free_port()
        self._controller = Controller(
            Handler(), hostname="127.0.0.1", port=self.port,
            tls_context=server_context(self.pki), require_starttls=True,
            authenticator=authenticator, auth_required=True, auth_require_tls=True)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in list(self.mails)]


class WebhookSink:
    def __init__(self, status: int = 204, tls_context: Any = None):
        self.posts: list[dict[str, Any]] = []      # {"path", "authorization", "json"}
        self.status = status
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n)
                sink.posts.append({"path": self.path,
                                   "authorization": self.headers.get("Authorization"),
                                   "json": json.loads(data)})
                self.send_response(sink.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        scheme = "https" if tls_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/hooks/mfconsole"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "WebhookSink":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def subjects(self) -> list[str]:
        return [p["json"]["subject"] for p in list(self.posts)]
