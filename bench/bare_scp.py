"""A bare, stock pynetdicom C-STORE SCP that stores nothing — the floor for bench/ingest.py.

    .venv/bin/python bench/bare_scp.py PORT [--ae-title BARE]

Stock pynetdicom on purpose: default PDU size, default socket options (Nagle and
delayed ACKs left as pynetdicom leaves them), all storage presentation contexts.
The C-STORE handler answers 0x0000 without touching the data set (no decode, no
copy). Only pynetdicom's per-event logging is switched off (LOG_HANDLER_LEVEL =
"none"), so the numbers measure the protocol stack, not a logger.

Runs in the foreground as its own process so the benchmark can read its CPU time and
peak RSS from /proc. Prints "listening on 127.0.0.1:PORT" to stderr once bound.
SIGTERM/SIGINT shut it down.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

_config.LOG_HANDLER_LEVEL = "none"


def handle_store(event: evt.Event) -> int:
    return 0x0000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ae-title", default="BARE")
    args = p.parse_args(argv)

    ae = AE(ae_title=args.ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    server = ae.start_server((args.host, args.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    print(f"bare_scp: listening on {args.host}:{args.port}", file=sys.stderr, flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
