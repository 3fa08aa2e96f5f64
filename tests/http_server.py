"""What the scripted HTTP test servers (stow_server.py, fhir_server.py) share: a
threaded server bound to 127.0.0.1 (HTTPS with an SSL server context, see tlsgen), a
quiet handler that answers with a body, a script of behaviours taken one per request,
start and stop.

A server is a dataclass subclass of ScriptedServer with a ``tls`` field; its
__post_init__ calls ``_serve(handler class)``.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def log_message(self, *args: Any) -> None:   # quiet
        pass

    def reply(self, status: int, body: bytes = b"", content_type: str = "text/plain",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: Any   # the ScriptedServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass   # a client that gave up (timeout) leaves a broken pipe behind: expected here


class ScriptedServer:
    thread_name = "http-server"

    def _serve(self, handler: type[Handler]) -> None:
        self.lock = threading.Lock()
        self._script: list[Any] = []
        self._httpd = _HTTPServer(("127.0.0.1", 0), handler)
        self._httpd.owner = self
        tls = getattr(self, "tls", None)
        if tls is not None:
            # The handshake happens in the handler thread (at the first read), so a
            # client that fails it never stalls the accept loop.
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base(self) -> str:
        return f"{'https' if getattr(self, 'tls', None) else 'http'}://127.0.0.1:{self.port}"

    def script(self, *behaviours: Any) -> Any:
        """The next requests' behaviours, in order (then the server's default)."""
        with self.lock:
            self._script.extend(behaviours)
        return self

    def next_behaviour(self, default: Any = None) -> Any:
        with self.lock:
            return self._script.pop(0) if self._script else default

    def start(self) -> Any:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{self.thread_name}-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
