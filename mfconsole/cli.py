"""Command line: ``mfconsole [--config PATH] COMMAND``.

Exit codes: 0 fine, 1 the operation failed (peer refused, engine error), 2 the
configuration or the command line is wrong. ``reload --plan`` exits like diff(1): 0
nothing would change, 1 something would, 2 config.toml does not load (or no plan could
be made).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from mfconsole import __version__
from mfconsole.config import DEFAULT_CONFIG, Config, ConfigError, load

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"configuration file (default: ./{DEFAULT_CONFIG})")
    p = argparse.ArgumentParser(
        prog="mfconsole", parents=[common],
        description="The DICOM imaging lane of an interface engine. Without a command: the "
                    "operator console (attached to the engine serving the data directory, or "
                    "hosting one).")
    p.add_argument("--version", action="version", version=f"mfconsole {__version__}")
    p.add_argument("--read-only", action="store_true",
                   help="console: show everything routing-safe, change nothing (no replay, pause, reload, "
                        "edit, reveal); the engine enforces it (control-ro.sock)")
    p.add_argument("--no-mouse", action="store_true", help="console: leave the mouse to the terminal (tmux)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sv = sub.add_parser("serve", parents=[common], help="run the engine headless in the foreground")
    sv.add_argument("--accept-empty-store", action="store_true",
                    help="start although blobs/ holds objects the database does not know "
                         "(they are quarantined, never deleted); only after a deliberate reset")
    sub.add_parser("check", parents=[common], help="validate the configuration (exit 0 or 2)")
    st = sub.add_parser("status", parents=[common], help="listeners, queues, dead letters")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("health", parents=[common],
                   help="exit 0 ok, 1 degraded, 2 down; one line per problem (watchdogs, load balancers)")
    ec = sub.add_parser("echo", parents=[common],
                        help="C-ECHO a destination or AET@host:port (STOW-RS: an empty request)")
    ec.add_argument("target", help="destination name, or AET@host:port")
    te = sub.add_parser("test", parents=[common],
                        help="which SOP class/transfer syntax pairs a DIMSE destination accepts")
    te.add_argument("target", help="destination name, or AET@host:port")
    for name, text in (("pause", "stop delivering to a destination (items stay queued)"),
                       ("resume", "resume a paused or down destination now")):
        sub.add_parser(name, parents=[common], help=text).add_argument("destination")
    dl = sub.add_parser("dead-letters", parents=[common], help="list, show, replay, discard")
    dls = dl.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = dls.add_parser("list", parents=[common], help="dead letters (routing-safe fields)")
    ls.add_argument("--destination")
    ls.add_argument("--reason", help="only those whose reason contains TEXT")
    ls.add_argument("--json", action="store_true")
    sh = dls.add_parser("show", parents=[common], help="one dead letter and its history")
    sh.add_argument("id", type=int)
    sh.add_argument("--json", action="store_true")
    rp = dls.add_parser("replay", parents=[common], help="queue dead letters again")
    rp.add_argument("ids", type=int, nargs="*", metavar="ID")
    rp.add_argument("--all", action="store_true", help="every dead letter matching the filters")
    rp.add_argument("--destination", help="with --all: only this destination's")
    rp.add_argument("--reason", help="with --all: only those whose reason contains TEXT")
    rp.add_argument("--to", metavar="OTHER", help="deliver to this destination instead")
    rp.add_argument("--as-stored", action="store_true",
                    help="send a superseded version as it was stored (default: the current version)")
    dc = dls.add_parser("discard", parents=[common],
                        help="drop dead letters: explicit ids, or a --destination/--reason filter")
    dc.add_argument("ids", type=int, nargs="*", metavar="ID")
    dc.add_argument("--destination", help="every dead letter of this destination")
    dc.add_argument("--reason", help="every dead letter whose reason contains TEXT")
    ob = sub.add_parser("objects", parents=[common], help="browse stored objects and their timeline")
    obs = ob.add_subparsers(dest="action", metavar="ACTION", required=True)
    ol = obs.add_parser("list", parents=[common],
                        help="stored objects, newest first, with each destination's state")
    for flag, text in (("--since", "received at or after: 30m, 2h, 1d (ago), 2026-12-04, 2026-12-04T08:30"),
                       ("--until", "received before (same forms)"), ("--listener", None),
                       ("--calling-ae", None), ("--modality", None), ("--sop-class-uid", None),
                       ("--sop-instance-uid", None), ("--study-uid", None),
                       ("--destination", "has a delivery to this destination"),
                       ("--state", "... (or to any) in this state: held, pending, in_flight, delivered, "
                                   "filtered, dead, replayed, discarded"),
                       ("--accession", "find by accession number (keyed hash; the search is audited)"),
                       ("--patient-id", "find by patient ID (keyed hash; the search is audited)")):
        ol.add_argument(flag, help=text)
    ol.add_argument("--sort", default="id", help="column to sort by (default: id, i.e. arrival)")
    ol.add_argument("--ascending", action="store_true", help="oldest / smallest first")
    ol.add_argument("--limit", type=int, default=100)
    ol.add_argument("--offset", type=int, default=0)
    ol.add_argument("--json", action="store_true")
    os_ = obs.add_parser("show", parents=[common], help="one object: deliveries and timeline")
    os_.add_argument("id", type=int)
    os_.add_argument("--json", action="store_true")
    au = sub.add_parser("audit", parents=[common], help="the audit trail, newest first")
    for flag in ("--event", "--destination", "--listener", "--actor", "--since", "--until", "--text"):
        au.add_argument(flag)
    au.add_argument("--object-id", type=int)
    au.add_argument("--limit", type=int, default=100)
    au.add_argument("--json", action="store_true")
    rl = sub.add_parser("reload", parents=[common],
                        help="ask the running engine to reload config.toml and handlers (over its "
                             "control socket); --plan: what it would change, first",
                        description="Without --plan: the running engine reloads config.toml and the "
                                    "handlers. With --plan: nothing is reloaded or sent; the objects "
                                    "received in the last --hours are replayed through config.toml "
                                    "and its handlers as on disk, and what would change is printed "
                                    "per destination and rule. --plan exits 0 when nothing would "
                                    "change, 1 when something would, 2 when config.toml does not "
                                    "load or the plan cannot be made.")
    rl.add_argument("--plan", action="store_true",
                    help="print what a reload would change for recent objects; change nothing")
    rl.add_argument("--hours", type=float, default=None, metavar="N",
                    help="with --plan: objects received in the last N hours (default 24)")
    rl.add_argument("--json", action="store_true", help="with --plan: machine-readable output")
    ks = sub.add_parser("keys", parents=[common], help="store keys: which seal what, make a new one")
    kss = ks.add_subparsers(dest="action", required=True, metavar="ACTION")
    kss.add_parser("list", parents=[common], help="configured key files, their key ids and objects")
    kn = kss.add_parser("new", parents=[common],
                        help="create a key file (never over an existing one), e.g. for a rotation")
    kn.add_argument("path", type=Path, nargs="?",
                    help="where (default: [store].key_file, when it does not exist yet)")
    sub.add_parser("rekey", parents=[common],
                   help="re-seal every object still under a previous key with [store].key_file "
                        "(online, in batches, resumable)")
    ro = sub.add_parser("routes", parents=[common], help="where the rules send an object")
    ros = ro.add_subparsers(dest="action", required=True, metavar="ACTION")
    rx = ros.add_parser("explain", parents=[common],
                        help="which rule a DICOM file matches, the destinations it would get and "
                             "their coercion (reads config.toml; contacts no peer, and the engine "
                             "only to audit --reveal)")
    rx.add_argument("file", type=Path)
    rx.add_argument("--listener", metavar="NAME", help="the listener it arrives on (default: the first)")
    rx.add_argument("--calling", default="", metavar="AE", help="the calling AE title of the sender")
    rx.add_argument("--called", metavar="AE", help="the called AE title (default: the listener's)")
    rx.add_argument("--peer", default="", metavar="ADDR", help="the sender's IP address (no port)")
    rx.add_argument("--reveal", action="store_true",
                    help="also show the values coercion would change, before and after (patient "
                         "data: the reveal is audited)")
    hd = sub.add_parser("handlers", parents=[common], help="list handlers, preview one on a file")
    hds = hd.add_subparsers(dest="action", required=True, metavar="ACTION")
    hds.add_parser("list", parents=[common], help="handlers in handlers/, their version and routes")
    hr = hds.add_parser("run", parents=[common],
                        help="print what a handler would emit for a DICOM file (sends nothing)")
    hr.add_argument("name")
    hr.add_argument("file", type=Path)
    hr.add_argument("--destination", help="the destination to pretend to send to "
                    "(default: the first one a route with this handler goes to)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()        # here, where a closed pipe can still be caught
        return code
    except BrokenPipeError:
        # `mfconsole status | head`: the reader left; the rest of the output has no one
        # to go to. Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path = Path(getattr(args, "config", DEFAULT_CONFIG))
    command = args.command or "console"
    # Before anything holds PHI or a key (serve and the console, but also rekey, handlers
    # run, dead-letters show…): no core dumps, redacted uncaught exceptions.
    from mfconsole import hardening

    hardening.harden()
    try:
        config = load(config_path)
    except ConfigError as exc:
        if command == "reload" and args.plan:
            return plan_invalid(config_path, exc, as_json=args.json)
        print(f"mfconsole: invalid configuration {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "check":
        print(f"{config.path}: OK ({len(config.listeners)} listener(s), "
              f"{len(config.destinations)} destination(s), {len(config.routes)} route(s)"
              + (f", {len(config.rules)} rule(s)" if config.rules else "")
              + (f", alerts by {' and '.join(config.alerts.channels)}"
                 if config.alerts is not None and config.alerts.enabled else "") + ")")
        return EXIT_OK
    if command == "status":
        return cmd_status(config, as_json=args.json)
    if command == "health":
        return cmd_health(config)
    if command == "routes":
        return cmd_routes_explain(config, args)
    if command == "serve":
        return cmd_serve(config, accept_empty_store=args.accept_empty_store)
    if command == "console":
        return cmd_console(config, read_only=args.read_only, mouse=not args.no_mouse)
    from mfconsole import ops
    from mfconsole.control import ControlError
    from mfconsole.engine.engine_lock import EngineError

    try:
        return OPERATIONS[command](config, args)
    except ops.OpsError as exc:
        print(f"mfconsole {command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (ControlError, EngineError) as exc:      # the running engine refused or failed
        print(f"mfconsole {command}: {exc}", file=sys.stderr)
        return EXIT_FAIL


def cmd_echo(config: Config, args: Any) -> int:
    from mfconsole import ops

    from mfconsole.kinds import kind_of

    stow = ops.stow_destination(config, args.target)
    web = next((d for d in config.destinations if d.name == args.target and d.kind == "fhir"), None)
    if stow is not None:
        where, done = f"{stow.name} (STOW-RS {stow.url.rstrip('/')}/studies)", "OK"
    elif web is not None:
        where, done = f"{web.name} (FHIR {kind_of(web).target(web).rstrip('/')}/metadata)", "OK"
        stow = web     # the detail is printed as for STOW
    else:
        peer = ops.resolve_peer(config, args.target)
        where, done = f"{peer.called_ae}@{peer.address} (calling {peer.calling_ae})", "C-ECHO OK"
    result = ops.echo(config, args.target)
    if result.ok:
        print(f"{where}: {done} in {result.rtt_ms:.1f} ms" + (f": {result.detail}" if stow else ""))
        return EXIT_OK
    print(f"{where}: FAILED after {result.rtt_ms:.1f} ms: {result.detail}", file=sys.stderr)
    return EXIT_FAIL


def cmd_test(config: Config, args: Any) -> int:
    from mfconsole import ops
    from mfconsole.dicomvalues import sop_name, ts_name

    report = ops.test(config, args.target)
    where = f"{report.peer.called_ae}@{report.peer.address}"
    if report.failure:
        print(f"{where}: FAILED: {report.failure}", file=sys.stderr)
        return EXIT_FAIL
    print(f"{where}: proposed {len(report.rows)} pair(s), {report.source}")
    for sop_class, ts, ok in report.rows:
        print(f"  {'accepted' if ok else 'REFUSED ':<8}  {sop_name(sop_class)}  —  {ts_name(ts)}")
    refused = sum(1 for *_, ok in report.rows if not ok)
    if refused:
        print(f"{refused} pair(s) refused: objects of those would fail (uncompressed ones are "
              "sent in another uncompressed syntax the peer accepts, when it accepts one)")
    return EXIT_OK


# -- actions: through the running engine when there is one --------------------------

def _engine_socket(config: Config) -> Path | None:
    """The control socket of the engine serving this data directory, or None when no
    engine runs. With one running, actions go through it (a single writer, audited
    with the actor the engine reads from the socket's peer credentials)."""
    from mfconsole.client import engine_socket

    served = engine_socket(config)
    return served[1] if served is not None else None


def _ask(sock: Path, op: str, **args: Any) -> Any:
    from mfconsole.control import ControlError, request

    try:
        return request(sock, op, args, timeout=3600.0)      # bulk actions may take a while
    except (OSError, ValueError) as exc:
        raise ControlError(f"the engine's control socket ({sock}) did not answer "
                           f"({exc.__class__.__name__})") from None


def _me() -> str:
    """Who acts when no engine runs and the CLI writes the database itself."""
    from mfconsole.actor import local

    return local(via="CLI")


def cmd_pause(config: Config, args: Any) -> int:
    _pause_or_resume(config, args.destination, "pause")
    print(f"destination {args.destination}: paused (items stay queued; resume with "
          f"`mfconsole resume {args.destination}`)")
    return EXIT_OK


def cmd_resume(config: Config, args: Any) -> int:
    _pause_or_resume(config, args.destination, "resume")
    print(f"destination {args.destination}: resumed; queued items are due now")
    return EXIT_OK


def _pause_or_resume(config: Config, destination: str, verb: str) -> None:
    """Through the running engine's control socket when there is one (one writer),
    else on the database directly."""
    from mfconsole import ops

    ops.check_destination(config, destination)
    sock = _engine_socket(config)
    if sock is not None:
        _ask(sock, verb, destination=destination)
    else:
        getattr(ops, verb)(config, destination, actor=_me())


def cmd_dead_letters(config: Config, args: Any) -> int:
    from mfconsole import ops

    if args.action == "list":
        rows = ops.list_dead(config, args.destination, args.reason)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return EXIT_OK
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["updated_at"]))
            print(f"{r['id']:>8}  {when}  {r['destination']:<12} {r['last_status'] or '':<12} "
                  f"{r['sop_instance_uid']}  {r['last_reason'] or ''}")
        print(f"{len(rows)} dead letter(s)")
        return EXIT_OK
    if args.action == "show":
        row = ops.show_dead(config, args.id)
        if args.json:
            print(json.dumps(row, indent=2, default=str))
            return EXIT_OK
        for key in ("id", "destination", "sop_instance_uid", "sop_class_uid", "study_uid",
                    "transfer_syntax", "size", "calling_ae", "listener", "attempts",
                    "last_status", "last_class", "last_reason", "handler", "handler_version",
                    "rule", "coerced"):
            print(f"{key:>18}: {row.get(key) if row.get(key) is not None else ''}")
        for h in row["history"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["ts"]))
            print(f"  {when} {h['event']:<16} {h['status'] or '':<12} {h['detail'] or ''}")
        return EXIT_OK
    if args.action == "replay":
        ops.check_replay(config, args.ids, all_=args.all, destination=args.destination, to=args.to)
        sock = _engine_socket(config)
        notes: list[str] = []
        if sock is not None:
            reply = _ask(sock, "replay", ids=args.ids or None, all_=args.all,
                         destination=args.destination, reason=args.reason, to=args.to,
                         as_stored=args.as_stored)
            queued, notes = reply["queued"], reply.get("notes") or []
        else:
            queued = len(ops.replay(config, args.ids, all_=args.all, destination=args.destination,
                                    reason=args.reason, to=args.to, as_stored=args.as_stored,
                                    notes=notes, progress=_progress("replayed"), actor=_me()))
        for note in notes:
            print(note)
        print(f"{queued} dead letter(s) queued again"
              + (f" for {args.to}" if args.to else ""))
        return EXIT_OK if queued or not args.ids else EXIT_FAIL
    ops.check_discard(config, args.ids, destination=args.destination, reason=args.reason)
    sock = _engine_socket(config)
    if sock is not None:
        n = _ask(sock, "discard", ids=args.ids or None, destination=args.destination,
                 reason=args.reason)["discarded"]
    else:
        n = ops.discard(config, args.ids, destination=args.destination, reason=args.reason,
                        progress=_progress("discarded"), actor=_me())
    print(f"{n} dead letter(s) discarded")
    return EXIT_OK if n == len(set(args.ids)) or not args.ids else EXIT_FAIL


def _progress(verb: str) -> Callable[[int, int], None]:
    """Progress of a bulk action on stderr, for runs of more than one batch."""
    def show(done: int, total: int) -> None:
        if total > 500:
            print(f"  {verb} {done} of {total}", file=sys.stderr, flush=True)
    return show


def cmd_handlers(config: Config, args: Any) -> int:
    from mfconsole import ops

    if args.action == "list":
        rows = ops.list_handlers(config)
        if not rows:
            print(f"no handlers in {config.handlers_dir}")
        for row in rows:
            state = row["error"] or f"version {row['version']}  sha256 {row['digest'][:12]}"
            routes = ", ".join(row["routes"]) or "no route"
            print(f"  {row['name']:<20} {state}   ({routes})")
        return EXIT_OK if all(not r["error"] for r in rows) else EXIT_FAIL
    preview = ops.run_handler(config, args.name, args.file, args.destination)
    print(preview, end="" if preview.endswith("\n") else "\n")
    return EXIT_OK


def cmd_routes_explain(config: Config, args: Any) -> int:
    """Where the rules would send a file, and why: each rule's `when` keys that match and
    those that do not. Never a value of the object (only rule and key names)."""
    from pydicom import config as pydicom_config

    from mfconsole.dicomfile import dataset_bytes
    from mfconsole.dimse.dataset_scan import DatasetRejected, scan_dataset
    from mfconsole.engine.router import explain
    from mfconsole.rules import header_tags, peer_address

    # As in the engine: pydicom's value validation warnings would quote values (PHI).
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

    names = [lc.name for lc in config.listeners]
    listener = args.listener or names[0]
    if listener not in names:
        print(f"mfconsole routes explain: no listener named {listener!r} ({', '.join(names)})",
              file=sys.stderr)
        return EXIT_CONFIG
    if args.peer and peer_address(args.peer) is None:
        print(f"mfconsole routes explain: --peer {args.peer!r} is not an IP address",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        data, ts = dataset_bytes(args.file)
        summary = scan_dataset(data, ts, allow_deflate=True, wanted=header_tags(config.rules))
    except OSError as exc:
        print(f"mfconsole routes explain: {args.file}: cannot be read ({exc.strerror or exc})",
              file=sys.stderr)
        return EXIT_CONFIG
    except DatasetRejected as exc:       # its reason names tags and offsets, never values
        print(f"mfconsole routes explain: {args.file}: a listener would refuse it "
              f"(0x{exc.status:04X}: {exc.reason})", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:             # whatever pydicom makes of a file that is no DICOM
        print(f"mfconsole routes explain: {args.file}: not a readable DICOM Part 10 file "
              f"({exc.__class__.__name__})", file=sys.stderr)
        return EXIT_CONFIG
    called = args.called if args.called is not None else config.listener(listener).ae_title
    result = explain(config, summary, listener=listener, calling=args.calling, called=called,
                     peer=args.peer)
    given = [f"calling AE {args.calling}" if args.calling else "no calling AE (--calling)",
             f"called AE {called}", f"peer {args.peer}" if args.peer else "no peer (--peer)"]
    print(f"{args.file} on listener {listener}: {', '.join(given)}")
    if config.rules:
        print(f"rules (match = {result.match}):")
    for rule, checks in result.rules:
        said = "matches" if all(ok for _, ok in checks) else "no match"
        keys = "  ".join(f"{key} {'yes' if ok else 'no'}" for key, ok in checks) or "(no when: every object)"
        print(f"  {rule.name:<24} {said:<9} {keys}")
    skipped = [r.name for r in config.rules if not r.applies_to(listener)]
    if skipped:
        print(f"  not for this listener: {', '.join(skipped)}")
    d = result.decision
    where = ", ".join(r.destination + "".join(f" ({w})" for w in (
        f"handler {r.handler}" if r.handler else "", "urgent" if r.priority else "") if w)
        for r in d.routes) or "nowhere (stored, audited)"
    if d.discarded:
        print(f"decision: discarded by rule {d.rules[0]} -> {where}")
    elif d.rules:
        print(f"decision: {'rule' if len(d.rules) == 1 else 'rules'} {', '.join(d.rules)} -> {where}")
    elif d.ruled:
        print(f"decision: fallback -> {where}")
    else:
        print(f"decision: [[routes]] of {listener} -> {where.replace(' (stored, audited)', '')}")
    return _explain_coercion(config, d.routes, data, ts, reveal=args.reveal)


def _explain_coercion(config: Config, routes: Any, data: bytes, ts: str, *, reveal: bool) -> int:
    """The coercion each delivery of the decision would get, and what it would change
    in this file: operations and attributes; values only with ``reveal``, audited
    first (nothing is shown when the audit row cannot be written)."""
    from mfconsole import coerce
    from mfconsole.contract import Outcome
    from mfconsole.engine.coercion import Coercer

    rules = {rule.name: rule for rule in config.rules}
    shown: list[tuple[str, list[str]]] = []
    for route in routes:
        coercer = Coercer(config.destination(route.destination), lambda: rules)
        ops = coercer.operations(route.rule) if coercer.dicom else ()
        if isinstance(ops, Outcome) or not ops:
            continue
        print(f"coercion for {route.destination}: {coerce.describe(ops)}"
              + (f" (on what handler {route.handler} returns; shown on the file as it is)"
                 if route.handler else ""))
        try:
            result = coerce.apply(ops, data, ts, keep_values=reveal)
        except coerce.CoercionError as exc:
            print(f"  would fail (dead letter): {exc}")
            continue
        print(f"  would change: {result.words or 'nothing in this file'}")
        if reveal and result.values:
            shown.append((route.destination, [f"    {name}: {_shown(before)} -> {_shown(after)}"
                                              for name, before, after in result.values]))
    if shown:
        try:
            _audit_reveal(config, [name for name, _ in shown])
        except Exception as exc:
            print(f"mfconsole routes explain: values not shown: the reveal could not be audited "
                  f"({exc})", file=sys.stderr)
            return EXIT_FAIL
        for name, lines in shown:
            print(f"  values for {name} (revealed, audited):")
            print("\n".join(lines))
    return EXIT_OK


def _shown(value: str | None) -> str:
    return "(absent)" if value is None else repr(value)


def _audit_reveal(config: Config, destinations: list[str]) -> None:
    """An audit row for values a command shows: through the running engine (its one
    writer), else written here (the data directory's database must exist)."""
    from mfconsole import ops

    sock = _engine_socket(config)
    if sock is not None:
        _ask(sock, "note_reveal", command="routes explain", destinations=destinations)
    else:
        ops.note_reveal(config, "routes explain", destinations, actor=_me())


def cmd_keys(config: Config, args: Any) -> int:
    from mfconsole import ops

    if args.action == "new":
        path = args.path or config.store.key_file
        key_id = ops.new_key(path)
        print(f"{path}: new key {key_id} (mode 0600). Back it up apart from the data.")
        if args.path is not None and path != config.store.key_file:
            print("To rotate: set [store].key_file to it, list the current key file in "
                  "[store].previous_key_files, restart the engine, then run `mfconsole rekey`.")
        return EXIT_OK
    for row in ops.key_report(config):
        print(f"{row['role']:<9} {row['key_id'] or '-':<16}  {row['objects']:>8} object(s)  "
              f"{row['file'] or '(no configured key file holds it)'}")
    return EXIT_OK


def cmd_rekey(config: Config, args: Any) -> int:
    from mfconsole import ops

    done, failed, left = ops.rekey(config, progress=_progress("re-sealed"))
    print(f"{done} object(s) re-sealed under the current key"
          + (f"; {failed} could not be opened (left as they are; see the log)" if failed else ""))
    if left:
        print(f"{left} object(s) still under previous keys", file=sys.stderr)
        return EXIT_FAIL
    print("no object is sealed with a previous key any more: previous_key_files can be removed "
          "from the configuration (keep a backup of those keys until your backups age out)")
    return EXIT_OK


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


OBJECT_FILTER_FLAGS = ("since", "until", "listener", "calling_ae", "modality", "sop_class_uid",
                       "sop_instance_uid", "study_uid", "destination", "state")


def cmd_objects(config: Config, args: Any) -> int:
    from mfconsole import ops

    if args.action == "show":
        t = ops.show_object(config, args.id)
        if args.json:
            print(json.dumps(t, indent=2, default=str))
            return EXIT_OK
        o = t["object"]
        for key in ("id", "sop_instance_uid", "sop_class_uid", "study_uid", "series_uid", "modality",
                    "transfer_syntax", "size", "version", "listener", "calling_ae", "called_ae", "peer"):
            print(f"{key:>18}: {o.get(key) if o.get(key) is not None else ''}")
        print(f"{'received':>18}: {_when(o['received_at'])}"
              + ("  (superseded by a later version)" if o["superseded"] else "")
              + (f"  (blob purged {_when(o['purged_at'])})" if o["purged_at"] else ""))
        for d in t["deliveries"]:
            print(f"  delivery {d['id']} to {d['destination']}: {d['state']} after {d['attempts']} "
                  f"attempt(s)" + (f", last {d['last_status']}: {d['last_reason']}" if d["last_status"] else ""))
            if d.get("rule") or d.get("coerced") is not None:
                print("    " + "; ".join(x for x in (
                    f"rule {d['rule']}" if d.get("rule") else "",
                    f"coerced: {d['coerced'] or 'nothing changed'}" if d.get("coerced") is not None
                    else "") if x))
        for e in t["events"]:
            print(f"  {_when(e['ts'])} {e['event']:<22} {e['destination'] or e['listener'] or '':<12} "
                  f"{e['status'] or '':<10} {e['detail'] or ''}")
        return EXIT_OK
    filters = {k: getattr(args, k) for k in OBJECT_FILTER_FLAGS}
    page = {"sort": args.sort, "descending": not args.ascending, "offset": args.offset, "limit": args.limit}
    if args.accession or args.patient_id:
        sock = _engine_socket(config)
        if sock is not None:
            result = _ask(sock, "find_objects", accession=args.accession, patient_id=args.patient_id,
                          filters=filters, **page)
        else:
            from mfconsole.engine.keys import KeyCustodyError, open_vault

            try:
                vault = open_vault(config.store, config.engine.data_dir)
            except KeyCustodyError as exc:
                raise ops.OpsError(str(exc)) from None
            result = ops.find_objects(config, vault, accession=args.accession, patient_id=args.patient_id,
                                      filters=filters, actor=_me(), **page)
    else:
        result = ops.list_objects(config, filters, **page)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return EXIT_OK
    for r in result["rows"]:
        print(f"{r['id']:>8}  {_when(r['received_at'])}  {r['calling_ae'] or '':<16} {r['modality'] or '':<6} "
              f"{r['sop_instance_uid']}  {r['deliveries'] or '(not routed)'}")
    shown = len(result["rows"])
    print(f"{shown} of {result['total']} object(s)" + (f" (from {args.offset + 1})" if args.offset else ""))
    return EXIT_OK


def cmd_audit(config: Config, args: Any) -> int:
    from mfconsole import ops

    filters = {"event": args.event, "destination": args.destination, "listener": args.listener,
               "actor": args.actor, "since": args.since, "until": args.until, "text": args.text,
               "object_id": args.object_id}
    rows = ops.list_audit(config, filters, None, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    for r in rows:
        print(f"{r['id']:>8}  {_when(r['ts'])}  {r['event']:<22} {r['destination'] or r['listener'] or '':<12} "
              f"{r['status'] or '':<10} {r['detail'] or ''}")
    print(f"{len(rows)} audit row(s)")
    return EXIT_OK


OPERATIONS = {"echo": cmd_echo, "test": cmd_test, "pause": cmd_pause, "resume": cmd_resume,
              "dead-letters": cmd_dead_letters, "keys": cmd_keys, "rekey": cmd_rekey,
              "reload": lambda config, args: cmd_plan(config, args) if args.plan else cmd_reload(config),
              "handlers": cmd_handlers,
              "objects": cmd_objects, "audit": cmd_audit}


def cmd_serve(config: Config, *, accept_empty_store: bool = False) -> int:
    from mfconsole.control import serve_control
    from mfconsole.engine.engine import Engine
    from mfconsole.engine.engine_lock import EngineError
    from mfconsole.metrics_export import serve_metrics

    engine = Engine(config, accept_empty_store=accept_empty_store, control=serve_control,
                    metrics=serve_metrics)
    stop = threading.Event()
    reload = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Reload off the signal handler, in the main loop below.
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
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
        while not stop.wait(timeout=0.2):
            if reload.is_set():
                reload.clear()
                engine.reload()
    finally:
        engine.stop()
    return EXIT_OK


def cmd_console(config: Config, *, read_only: bool, mouse: bool) -> int:
    """The console: attached to the engine serving this data directory, or hosting one
    in this process (then quitting, or a hang-up, stops it cleanly)."""
    from mfconsole.client import open_client
    from mfconsole.engine.engine_lock import EngineError

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("mfconsole: the console needs a terminal; run the engine headless with "
              "`mfconsole serve`", file=sys.stderr)
        return EXIT_CONFIG
    try:
        client = open_client(config, read_only=read_only)
    except EngineError as exc:
        print(f"mfconsole: {exc}", file=sys.stderr)
        return EXIT_FAIL
    from mfconsole.console.app import run

    hung_up = False
    try:
        hung_up = run(client, mouse=mouse)
    finally:
        # A second hang-up or TERM must not cut the engine's stop short.
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        client.close()
    if client.hosts_engine and not hung_up:     # after a hang-up there is no terminal to tell
        print("mfconsole: engine stopped", file=sys.stderr)
    return EXIT_OK


def cmd_reload(config: Config) -> int:
    """Ask the engine serving this data_dir to reload, over its control socket, and
    print the report it returns. (SIGHUP still reloads too: systemd's ExecReload.)"""
    from mfconsole.client import engine_socket

    served = engine_socket(config)
    if served is None:
        print(f"mfconsole: no engine is serving {config.engine.data_dir}", file=sys.stderr)
        return EXIT_FAIL
    pid, sock = served
    result = _ask(sock, "reload")
    ok = not result.get("errors")
    word = "REFUSED" if result.get("refused") else "done" if ok else "done with errors"
    said = "; ".join(result.get("report") or []) or "no change"
    print(f"reload {word} (pid {pid}): {said}", file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_FAIL


def cmd_plan(config: Config, args: Any) -> int:
    """`mfconsole reload --plan`: what a reload of config.toml would change for the
    objects received in the last --hours, computed by the running engine (against its
    running configuration) or, when none runs, here (against what each object got when
    it was received). Sends nothing, reloads nothing. Exits like diff(1): 0 no change,
    1 changes, 2 the configuration does not load or the plan could not be made."""
    from mfconsole import ops
    from mfconsole.client import engine_socket
    from mfconsole.control import ControlError
    from mfconsole.engine import plan
    from mfconsole.engine.engine_lock import EngineError

    try:
        hours = plan.DEFAULT_HOURS if args.hours is None else plan.check_hours(args.hours)
    except ValueError as exc:
        print(f"mfconsole reload --plan: --hours: {exc}", file=sys.stderr)
        return plan.EXIT_TROUBLE
    try:
        served = engine_socket(config)
        if served is not None:
            result = _ask(served[1], "plan", hours=hours)
        else:
            result = ops.routing_plan(config, hours, actor=_me())
    except (ControlError, EngineError, ops.OpsError) as exc:
        print(f"mfconsole reload --plan: {exc}", file=sys.stderr)
        return plan.EXIT_TROUBLE
    lines = result.pop("lines", None) or plan.render(result)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print("\n".join(lines))
    return plan.exit_code(result)


def plan_invalid(path: Path, exc: ConfigError, *, as_json: bool) -> int:
    """`reload --plan` on a config.toml that does not load: every problem with its key
    path (a reload would be refused: the running engine keeps its configuration)."""
    from mfconsole.engine import plan

    if as_json:
        print(json.dumps({"config": str(path), "error": {"problems": [list(p) for p in exc.problems]},
                          "changed": None}, indent=2, sort_keys=True))
    else:
        print(f"routing plan: {path} does not load ({len(exc.problems)} problem(s)): a reload would "
              "be refused and the running engine keeps its configuration")
        for key, why in exc.problems:
            print(f"  {key}: {why}")
    return plan.EXIT_TROUBLE


def _rule_counts(config: Config) -> dict[str, Any] | None:
    """What the rules decided since the running engine started (None: not answered)."""
    from mfconsole.client import engine_socket
    from mfconsole.control import request

    try:
        served = engine_socket(config, read_only=True)     # observation only
        return request(served[1], "rule_counts", timeout=5) if served is not None else None
    except Exception:     # an engine starting or stopping: status goes on without them
        return None


def _print_routing(config: Config, routing: dict[str, Any]) -> None:
    if not config.rules and routing["fallback"] is None:
        return        # [[routes]] alone, as before rules
    counted = "unrouted" in routing
    print(f"rules (match = {routing['match']}" + (", counts since the engine started):" if counted else "):"))
    for rule in routing["rules"]:
        to = "discard" if rule["action"] == "discard" else "-> " + ", ".join(rule["to"])
        if rule.get("priority") == "urgent":
            to += " (urgent)"
        counts = (f"  sent {rule['sent']:>7}  discarded {rule['discarded']:>7}" if counted else "")
        print(f"  {rule['name']:<24} {to:<28}{counts}".rstrip())
    fallback = ("the listeners' [[routes]]" if routing["fallback"] is None
                else ", ".join(routing["fallback"]) or "nowhere")
    print((f"  {'(fallback)':<24} {'-> ' + fallback:<28}"
           + (f"  sent {routing['fallback_sent']:>7}  unrouted  {routing['unrouted']:>7}" if counted else "")).rstrip())


def _pacing_lines(d: dict[str, Any]) -> list[str]:
    """Under a destination's line: urgent deliveries queued, its window and rate caps
    (nothing when it has none of them)."""
    lines = []
    if d.get("urgent_pending"):
        lines.append(f"urgent pending {d['urgent_pending']} (sent before the rest)")
    window = d.get("window")
    if window:
        ranges = ", ".join(window["windows"]) or "always"
        if window["blackout"]:
            ranges += "; blackout " + ", ".join(window["blackout"])
        when = window["next_change"]
        if window["open"]:
            said = "inside window" + (f", closes at {when}" if when else "")
        else:
            said = "outside window, " + (f"next opens at {when}" if when else "no opening within a week")
            if window["urgent_ignores_window"]:
                said += " (urgent deliveries still go)"
        lines.append(f"{said} (windows {ranges})")
    caps = [f"{d['max_objects_per_s']:g} objects/s" if d.get("max_objects_per_s") else "",
            f"{d['max_mb_per_s']:g} MiB/s" if d.get("max_mb_per_s") else ""]
    if any(caps):
        lines.append("rate cap " + ", ".join(c for c in caps if c))
    return lines


def _held_lines(d: dict[str, Any]) -> list[str]:
    """A study-stable destination's held studies: how many, and each shown with its
    countdown (the next release first)."""
    if d.get("trigger") != "study_stable" and not d.get("held_studies"):
        return []
    n = d.get("held_study_count") or 0
    lines = [f"study_stable after {d['stable_after_s']:g} s quiet: {n} stud{'y' if n == 1 else 'ies'} held"
             if d.get("trigger") == "study_stable" else f"{n} stud{'y' if n == 1 else 'ies'} held "
             "(no longer study_stable: released at the worker's next round)"]
    for h in d.get("held_studies") or []:
        left = h["seconds_to_release"]
        lines.append(f"  study {h['study_uid']}: {h['objects']} object(s), "
                     + (f"release in {left:.0f} s" if left >= 1 else "releasing now")
                     + (" (late group: update)" if h.get("update") else ""))
    return lines


def cmd_health(config: Config) -> int:
    """One line per problem, most severe first; the exit code is the worst severity."""
    from mfconsole import health, ops

    problems = ops.health(config)
    for p in problems:
        print(f"{p.word}: {p.text}")
    if not problems:
        print("ok")
    return health.severity(problems)


def cmd_status(config: Config, *, as_json: bool) -> int:
    from mfconsole.engine.status import collect, routing

    from mfconsole import health, ops

    status = collect(config)
    if status["engine"]["running"]:
        counts = _rule_counts(config)
        if counts is not None:
            status["routing"] = routing(config, counts)
    # Which key sealed how many objects (the console's snapshot leaves this out: it
    # counts the whole objects table).
    status["keys"] = ops.key_report(config)
    # What `mfconsole health` says, first: at 3 a.m. the answer to "is anything wrong?".
    problems = ops.health(config, status=status)
    status["health"] = {"severity": health.severity(problems),
                        "problems": [{"severity": p.word, "key": p.key, "text": p.text}
                                     for p in problems]}
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    eng = status["engine"]
    print(f"engine: {'running (pid %s)' % eng['pid'] if eng['running'] else 'not running'}"
          f" — data_dir {status['data_dir']}")
    print("health: ok" if not problems else f"health: {problems[0].word} ({len(problems)} problem(s))")
    for p in problems:
        print(f"  {p.word}: {p.text}")
    print("listeners:")
    for item in status["listeners"]:
        print(f"  {item['name']:<16} {item['ae_title']:<16} {item['host']}:{item['port']:<6} "
              f"{'TLS' if item['tls'] else 'cleartext'}  {item['state']}")
    print("destinations:")
    for d in status["destinations"]:
        c = d["counts"]
        print(f"  {d['name']:<16} {d['kind']:<6} {d.get('state', ''):<8} pending {c.get('pending', 0):>6}  "
              f"in flight {c.get('in_flight', 0):>4}  delivered {c.get('delivered', 0):>7}  "
              f"filtered {c.get('filtered', 0):>5}  dead {c.get('dead', 0):>5}"
              + (f"  held {c.get('held', 0):>5}" if c.get("held") or d.get("trigger") == "study_stable" else ""))
        for line in _held_lines(d) + _pacing_lines(d):
            print(f"  {'':<16} {line}")
    _print_routing(config, status["routing"])
    print(f"objects stored: {status['objects']}   dead letters: {status['dead_letters']}")
    print("keys:")
    for k in status["keys"]:
        print(f"  {k['role']:<9} {k['key_id'] or '(unreadable)':<16} sealed {k['objects']:>8} object(s)"
              + ("  — none left: it can be retired" if k["role"] == "previous" and not k["objects"] else ""))
    if status["recent_errors"]:
        print("recent errors:")
        for e in status["recent_errors"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
            who = " ".join(x for x in (e.get("listener") or e.get("destination"),
                                       e.get("calling_ae"), e.get("peer")) if x)
            print(f"  {when} {e['event']} {e.get('status') or ''} {who}: {e.get('detail') or ''}")
    return EXIT_OK
