"""Command line: ``mfconsole [--config PATH] COMMAND``.

Exit codes: 0 fine, 1 the operation failed (peer refused, engine error), 2 the
configuration or the command line is wrong.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from mfconsole import __version__
from mfconsole.config import DEFAULT_CONFIG, Config, ConfigError, load

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"configuration file (default: ./{DEFAULT_CONFIG})")
    p = argparse.ArgumentParser(
        prog="mfconsole", parents=[common],
        description="The DICOM imaging lane of an interface engine.")
    p.add_argument("--version", action="version", version=f"mfconsole {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", parents=[common], help="run the engine headless in the foreground")
    sub.add_parser("check", parents=[common], help="validate the configuration (exit 0 or 2)")
    st = sub.add_parser("status", parents=[common], help="listeners, queues, dead letters")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path = Path(getattr(args, "config", DEFAULT_CONFIG))
    command = args.command or "serve"
    try:
        config = load(config_path)
    except ConfigError as exc:
        print(f"mfconsole: invalid configuration {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "check":
        print(f"{config.path}: OK ({len(config.listeners)} listener(s), "
              f"{len(config.destinations)} destination(s), {len(config.routes)} route(s))")
        return EXIT_OK
    if command == "status":
        return cmd_status(config, as_json=args.json)
    if command == "serve":
        return cmd_serve(config)
    return EXIT_CONFIG


def cmd_serve(config: Config) -> int:
    from mfconsole.engine.engine import Engine
    from mfconsole.engine.engine_lock import EngineError

    engine = Engine(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        engine.start()
    except EngineError as exc:
        print(f"mfconsole: {exc}", file=sys.stderr)
        return EXIT_FAIL
    for listener in engine.listeners:
        host, port = listener.address
        print(f"mfconsole: listener {listener.cfg.name} ({listener.cfg.ae_title}) on "
              f"{host}:{port}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(timeout=1.0):
            pass
    finally:
        engine.stop()
    return EXIT_OK


def cmd_status(config: Config, *, as_json: bool) -> int:
    from mfconsole.engine.status import collect

    status = collect(config)
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    eng = status["engine"]
    print(f"engine: {'running (pid %s)' % eng['pid'] if eng['running'] else 'not running'}"
          f" — data_dir {status['data_dir']}")
    print("listeners:")
    for item in status["listeners"]:
        print(f"  {item['name']:<16} {item['ae_title']:<16} {item['host']}:{item['port']:<6} "
              f"{'TLS' if item['tls'] else 'cleartext'}  {item['state']}")
    print("destinations:")
    for d in status["destinations"]:
        c = d["counts"]
        print(f"  {d['name']:<16} {d['kind']:<6} pending {c.get('pending', 0):>6}  "
              f"in flight {c.get('in_flight', 0):>4}  delivered {c.get('delivered', 0):>7}  "
              f"filtered {c.get('filtered', 0):>5}  dead {c.get('dead', 0):>5}")
    print(f"objects stored: {status['objects']}   dead letters: {status['dead_letters']}")
    if status["recent_errors"]:
        print("recent errors:")
        for e in status["recent_errors"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
            who = " ".join(x for x in (e.get("listener") or e.get("destination"),
                                       e.get("calling_ae"), e.get("peer")) if x)
            print(f"  {when} {e['event']} {e.get('status') or ''} {who}: {e.get('detail') or ''}")
    return EXIT_OK
