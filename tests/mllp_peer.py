#!/usr/bin/env python3
"""An HL7 v2 MLLP receiver for integration tests: hl7apy's MLLPServer (a peer from
another project), answering each message as scripted.

    python tests/mllp_peer.py --port 0 --record DIR [--acks AA,AR,AA …]

``--acks`` is the answer per received message, in order, the last one repeating:
an acknowledgment code (AA, AE, AR, CA, CE, CR) sends an ACK with that MSA-1 and
MSA-2 = the message's MSH-10; ``NONE`` answers nothing (holds the connection until
the sender gives up); ``WRONG`` acknowledges another control id; ``BIG`` sends a
framed reply of 1 MiB; ``GARBLED`` sends a framed reply that is not HL7.
Every message received is appended to ``DIR/received.jsonl`` (n, control_id,
message_type, answer, message) *before* the answer goes out.

hl7apy's server takes one message per connection and then closes it, as many real
interface engines do; the sender must cope. Prints ``mllp_peer: listening on
127.0.0.1:PORT`` when ready. Class :class:`MllpPeer` runs it from a test.

``--tls-cert/--tls-key`` make it speak MLLP over TLS; with ``--tls-ca`` too, a client
certificate signed by that CA is required, and its subject CN is recorded with each
message (``client_cn``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CODES = ("AA", "AE", "AR", "CA", "CE", "CR")
FAULTS = ("NONE", "WRONG", "BIG", "GARBLED")


def _fields(message: str) -> tuple[str, str]:
    msh = message.replace("\n", "\r").split("\r", 1)[0]
    sep = msh[3]
    parts = msh.split(sep)
    return (parts[9] if len(parts) > 9 else ""), (parts[8] if len(parts) > 8 else "")


def _ack(message: str, code: str, control_id: str) -> str:
    msh = message.replace("\n", "\r").split("\r", 1)[0].split("|")
    sending = msh[2:6] if len(msh) > 5 else ["", "", "", ""]
    header = ["MSH", "^~\\&", sending[2], sending[3], sending[0], sending[1],
              time.strftime("%Y%m%d%H%M%S"), "", "ACK^R01^ACK", f"ACK{control_id}", "P", "2.5.1"]
    return "\r".join(["|".join(header), f"MSA|{code}|{control_id}"]) + "\r"


def main(argv: list[str] | None = None) -> int:
    from hl7apy.mllp import AbstractHandler, MLLPRequestHandler, MLLPServer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--acks", default="AA")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-ca", type=Path, help="require client certificates signed by this CA")
    args = p.parse_args(argv)
    answers = [a.strip().upper() for a in args.acks.split(",") if a.strip()]
    bad = [a for a in answers if a not in CODES + FAULTS]
    if bad:
        p.error(f"unknown answers: {bad}")
    args.record.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    counter = [0]
    hold = threading.Event()
    connection = threading.local()   # the client certificate's CN, per handler thread

    class Connection(MLLPRequestHandler):
        def handle(self) -> None:
            cert = None
            if isinstance(self.request, ssl.SSLSocket):
                try:
                    self.request.do_handshake()
                except (OSError, ValueError) as exc:   # refused: nothing is recorded
                    print(f"mllp_peer: TLS handshake failed: {exc}", file=sys.stderr, flush=True)
                    return
                cert = self.request.getpeercert()
            connection.cn = next((v for rdn in (cert or {}).get("subject", ()) for k, v in rdn
                                  if k == "commonName"), None)
            super().handle()

    class Answer(AbstractHandler):
        def reply(self) -> str:
            message = self.incoming_message
            control_id, message_type = _fields(message)
            with lock:
                counter[0] += 1
                n = counter[0]
                answer = answers[min(n, len(answers)) - 1]
                with open(args.record / "received.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"n": n, "control_id": control_id, "message_type": message_type,
                                        "answer": answer, "message": message,
                                        "client_cn": getattr(connection, "cn", None)}) + "\n")
            if answer == "NONE":
                hold.wait(60)
                raise ConnectionAbortedError("scripted: no answer")
            if answer == "WRONG":
                return "\x0b" + _ack(message, "AA", control_id + "X") + "\x1c\x0d"
            if answer == "BIG":
                return "\x0b" + "X" * (1024 * 1024) + "\x1c\x0d"
            if answer == "GARBLED":
                return "\x0bthis is not an acknowledgment\x1c\x0d"
            return "\x0b" + _ack(message, answer, control_id) + "\x1c\x0d"

    handlers = {"ORU^R01^ORU_R01": (Answer,), "ORU^R01": (Answer,), "ADT^A08": (Answer,)}
    server = MLLPServer("127.0.0.1", args.port, handlers, timeout=30,
                        request_handler_class=Connection)
    server.daemon_threads = True
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(args.tls_ca)
        # The handshake happens at the handler's first read, on its own thread.
        server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
    print(f"mllp_peer: listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.05)
    hold.set()
    return 0


class MllpPeer:
    """Run this script as a child process; stopped by PID."""

    def __init__(self, record_dir: Path, acks: str = "AA", port: int = 0,
                 tls: dict[str, Path] | None = None):
        self.record_dir = Path(record_dir)
        self.acks = acks
        self.port = port
        self.tls = tls or {}     # {"cert": …, "key": …, "ca": … (client certificates required)}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "MllpPeer":
        self.record_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.record_dir / "mllp_peer.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", __file__, "--port", str(self.port), "--record",
             str(self.record_dir), "--acks", self.acks,
             *(arg for k, v in self.tls.items() for arg in (f"--tls-{k}", str(v)))],
            stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if "listening on" in line:
                self.port = int(line.rsplit(":", 1)[1])
                return self
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"mllp_peer did not start: {line!r}")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None

    def received(self) -> list[dict[str, Any]]:
        path = self.record_dir / "received.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    def __enter__(self) -> "MllpPeer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
