"""Operator commands over a configuration and its data directory: echo, test,
dead letters, pause/resume, keys. The CLI prints; the control socket (the console)
calls the same functions.

Queue changes go straight to the database and are audited with their ``actor``
(mfconsole.actor: who, and through what). Against a running engine the CLI does not
call them itself: it asks the engine over the control socket (one writer), and the
engine calls them with the actor it read from the socket's peer credentials.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mfconsole import egress as egress_mod
from mfconsole.config import Config, DestinationConfig, ae_title_problem
from mfconsole.dimse import sender
from mfconsole.engine import outbox
from mfconsole.actor import local as local_actor
from mfconsole.engine.store import ACTIVE_STATES, DEAD, connect, create_schema
from mfconsole.stow import client as stow


class OpsError(Exception):
    """The operation cannot be done as asked; the message says why (routing-safe)."""


_TARGET = re.compile(r"^(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:\[\]]+):(?P<port>\d{1,5})$")


def resolve_peer(config: Config, target: str) -> sender.Peer:
    """A destination name, or ``AET@host:port``."""
    for d in config.destinations:
        if d.name == target:
            if d.kind != "dimse":
                raise OpsError(f"destination {target} is a {d.kind} destination, not DIMSE")
            return sender.Peer.from_destination(d)
    m = _TARGET.match(target)
    if not m:
        names = ", ".join(d.name for d in config.destinations if d.kind == "dimse") or "none"
        raise OpsError(f"{target!r} is neither a DIMSE destination ({names}) nor AET@host:port")
    aet, host, port = m["aet"], m["host"].strip("[]"), int(m["port"])
    problem = ae_title_problem(aet)
    if problem:
        raise OpsError(f"AE title {aet!r} {problem}")
    if not 1 <= port <= 65535:
        raise OpsError(f"port {port} is not a TCP port")
    return sender.Peer(host, port, aet)


def egress(config: Config) -> egress_mod.TcpCheck:
    """[egress].allowed_tcp as the engine checks it: host, port → the address to dial
    (names pinned to what they resolved to when ``config`` was loaded), or a Refusal."""
    return lambda host, port, **kw: egress_mod.check_tcp(config.egress.allowed_tcp,
                                                         config.egress_pins, host, port, **kw)


def egress_http(config: Config) -> egress_mod.HttpCheck:
    """[egress].allowed_http, likewise: url → the address to dial, or a Refusal."""
    return lambda url, **kw: egress_mod.check_http(config.egress.allowed_http,
                                                   config.egress_pins, url, **kw)


def stow_destination(config: Config, target: str) -> DestinationConfig | None:
    return next((d for d in config.destinations if d.name == target and d.kind == "stow"), None)


def echo(config: Config, target: str) -> sender.EchoResult | stow.EchoResult:
    """A destination's echo, as its kind makes it (dimse: C-ECHO; stow: an empty STOW
    request, same endpoint, TLS and credentials as deliveries, nothing stored), or a
    C-ECHO to ``AET@host:port``."""
    from mfconsole.kinds import kind_of

    dest = next((d for d in config.destinations if d.name == target), None)
    if dest is not None and kind_of(dest).echo is not None:
        return kind_of(dest).echo(dest, egress_mod.Checks(egress(config), egress_http(config)))
    return sender.echo(resolve_peer(config, target), egress(config))


@dataclass(frozen=True)
class TestReport:
    peer: sender.Peer
    failure: str | None
    rows: list[tuple[str, str, bool]]     # SOP class, transfer syntax, accepted
    source: str                           # where the pairs came from


# Proposed when nothing was ever queued for the destination.
DEFAULT_PAIRS = [(c, t) for c in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4",
                                  "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.7")
                 for t in (sender.EXPLICIT_LE, sender.IMPLICIT_LE)]


def queued_pairs(config: Config, destination: str, days: float = 7.0) -> list[tuple[str, str]]:
    db = config.engine.data_dir / "mfconsole.db"
    if not db.exists():
        return []
    conn = connect(db, readonly=True)
    try:
        rows = conn.execute(
            "SELECT o.sop_class_uid, o.transfer_syntax, COUNT(*) AS n FROM deliveries d "
            "JOIN objects o ON o.id = d.object_id WHERE d.destination = ? AND "
            "(d.state IN (?, ?, ?) OR d.updated_at > ?) GROUP BY 1, 2 ORDER BY n DESC LIMIT ?",
            (destination, *ACTIVE_STATES, DEAD, time.time() - days * 86400, sender.MAX_CONTEXTS)).fetchall()
    finally:
        conn.close()
    return [(r[0], r[1]) for r in rows]


def test(config: Config, target: str) -> TestReport:
    peer = resolve_peer(config, target)
    pairs = queued_pairs(config, target)
    source = f"queued for or sent to {target} in the last 7 days"
    if not pairs:
        pairs, source = DEFAULT_PAIRS, "common SOP classes (nothing queued or sent recently)"
    failure, rows = sender.probe_contexts(peer, pairs, egress(config))
    return TestReport(peer, failure.reason if failure else None, rows, source)


# -- queue operations ------------------------------------------------------------

def open_db(config: Config) -> Any:
    db = config.engine.data_dir / "mfconsole.db"
    if not db.exists():
        raise OpsError(f"no database at {db}: the engine has never run with this data_dir")
    conn = connect(db)
    if "actor" not in {r[1] for r in conn.execute("PRAGMA table_info(audit)")}:
        create_schema(conn)        # a data dir no engine of this version has opened yet
    return conn


def _who(actor: str | None) -> str:
    """Callers name the actor; without one it is this process's user, writing directly."""
    return actor or local_actor(via="direct database write")


def _write(config: Config, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    conn = open_db(config)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args, **kwargs)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result
    finally:
        conn.close()


def _destination(config: Config, name: str) -> None:
    if name not in {d.name for d in config.destinations}:
        raise OpsError(f"no destination named {name!r}")


def list_dead(config: Config, destination: str | None = None, reason: str | None = None
              ) -> list[dict[str, Any]]:
    conn = open_db(config)
    try:
        return outbox.dead_letters(conn, destination, reason)
    finally:
        conn.close()


def show_dead(config: Config, delivery_id: int) -> dict[str, Any]:
    conn = open_db(config)
    try:
        rows = outbox.dead_letters(conn, ids=[delivery_id])
        if not rows:
            raise OpsError(f"no dead letter with id {delivery_id}")
        row = rows[0]
        row["history"] = [dict(r) for r in conn.execute(
            "SELECT ts, event, destination, status, detail FROM audit WHERE delivery_id = ? "
            "ORDER BY id", (delivery_id,))]
        return row
    finally:
        conn.close()


def replay(config: Config, ids: list[int] | None, *, all_: bool = False, destination: str | None = None,
           reason: str | None = None, to: str | None = None, as_stored: bool = False,
           notes: list[str] | None = None, progress: Callable[[int, int], None] | None = None,
           actor: str | None = None) -> list[int]:
    """Queue dead letters again, in transactions of outbox.BULK_BATCH (a filter that
    matches a million rows never holds the writer for long); ``progress(done, total)``
    after each."""
    check_replay(config, ids, all_=all_, destination=destination, to=to)
    actor = _who(actor)
    chosen = list(dict.fromkeys(ids)) if ids else [r["id"] for r in list_dead(config, destination, reason)]
    queued: list[int] = []
    for n, batch in enumerate(outbox.batches(chosen), 1):
        queued += _write(config, outbox.replay, batch, to=to, as_stored=as_stored, notes=notes,
                         actor=actor)
        if progress is not None:
            progress(min(len(chosen), n * outbox.BULK_BATCH), len(chosen))
    return queued


def check_replay(config: Config, ids: list[int] | None, *, all_: bool = False,
                 destination: str | None = None, to: str | None = None) -> None:
    """Refuse a replay asked wrongly, before anything is done (the CLI checks here
    before it asks a running engine)."""
    if to is not None:
        _destination(config, to)
    if destination is not None:
        _destination(config, destination)
    if not ids and not all_:
        raise OpsError("name dead letter ids, or --all (optionally with --destination/--reason)")


def check_discard(config: Config, ids: list[int] | None, *, destination: str | None = None,
                  reason: str | None = None) -> None:
    if destination is not None:
        _destination(config, destination)
    if not ids and destination is None and not reason:
        raise OpsError("discard needs dead letter ids, or --destination and/or --reason")
    if ids and (destination is not None or reason):
        raise OpsError("give dead letter ids or a filter, not both")


def discard(config: Config, ids: list[int], *, destination: str | None = None,
            reason: str | None = None, progress: Callable[[int, int], None] | None = None,
            actor: str | None = None) -> int:
    """Dead letters are dropped only when named: by id, or by a filter (never "all").
    In batches, like ``replay``."""
    check_discard(config, ids, destination=destination, reason=reason)
    actor = _who(actor)
    chosen = list(dict.fromkeys(ids)) if ids else [r["id"] for r in list_dead(config, destination, reason)]
    done = 0
    for n, batch in enumerate(outbox.batches(chosen), 1):
        done += _write(config, outbox.discard, batch, actor=actor)
        if progress is not None:
            progress(min(len(chosen), n * outbox.BULK_BATCH), len(chosen))
    return done


def check_destination(config: Config, name: str) -> None:
    _destination(config, name)


def pause(config: Config, destination: str, *, actor: str | None = None) -> None:
    _destination(config, destination)
    _write(config, outbox.pause, destination, "paused by operator", actor=_who(actor))


def resume(config: Config, destination: str, *, actor: str | None = None) -> None:
    _destination(config, destination)
    _write(config, outbox.resume, destination, actor=_who(actor))


# -- handlers ---------------------------------------------------------------------

def list_handlers(config: Config) -> list[dict[str, Any]]:
    """Every handler file, loaded in isolation (a broken one shows its error)."""
    from mfconsole.engine.handlers import HandlerError, load as load_handler

    out = []
    for path in sorted(config.handlers_dir.glob("*.py")) if config.handlers_dir.is_dir() else []:
        name = path.stem
        if name.startswith("_"):
            continue
        routes = [f"{r.from_listener} -> {', '.join(r.to)}" for r in config.routes if r.handler == name]
        try:
            h = load_handler(name, config.handlers_dir)
            out.append({"name": name, "version": h.version, "digest": h.digest, "routes": routes,
                        "error": ""})
        except HandlerError as exc:
            out.append({"name": name, "version": "", "digest": "", "routes": routes,
                        "error": str(exc)})
    return out


def run_handler(config: Config, name: str, file: Path, destination: str | None = None) -> str:
    """What handler ``name`` emits for a DICOM file, as text. Sends nothing."""
    from pydicom import config as pydicom_config, dcmread
    from pydicom.errors import InvalidDicomError

    from mfconsole.contract import Outbound
    from mfconsole.dicomfile import dataset_bytes
    from mfconsole.engine.handlers import HandlerError, load as load_handler

    # As in the engine: pydicom's value validation warnings would quote values (PHI).
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        handler = load_handler(name, config.handlers_dir)
    except HandlerError as exc:
        raise OpsError(str(exc)) from None
    try:
        meta = dcmread(file, stop_before_pixels=True, specific_tags=[(0x0008, 0x0016), (0x0008, 0x0018)])
        data, ts = dataset_bytes(file)
    except (OSError, InvalidDicomError, ValueError) as exc:
        raise OpsError(f"{file}: not a readable DICOM file ({exc.__class__.__name__})") from None
    obj = Outbound(str(meta.get("SOPClassUID", "")), str(meta.get("SOPInstanceUID", "")), ts, data,
                   "")
    return preview_handler(config, handler, obj, destination)


def preview_handler(config: Config, handler: Any, obj: Any, destination: str | None = None) -> str:
    """What a loaded handler version emits for one object, as text. Sends nothing."""
    from mfconsole.contract import Outcome
    from mfconsole.engine.handlers import Handlers
    from mfconsole.engine.transform import Transformer
    from mfconsole.kinds import kind_of

    name = handler.name
    if destination is None:
        targets = [d for r in config.routes if r.handler == name for d in r.to]
        destination = targets[0] if targets else None
    dest = next((d for d in config.destinations if d.name == destination), None)
    if dest is None:
        raise OpsError(f"name a destination with --destination (no route uses {name})"
                       if destination is None else f"no destination named {destination!r}")
    out, _ = Transformer(Handlers.single(handler), dest)(name, f"preview->{dest.name}", 0, obj)
    label = f"# {handler.label} for {dest.name} ({dest.kind})\n"
    if isinstance(out, Outcome):
        if out.status == "filtered":
            return label + "filtered: the handler returned None (nothing would be sent)\n"
        raise OpsError(out.reason)
    if kind_of(dest).produces == "hl7":
        return label + out.data.decode("utf-8").replace("\r", "\n")
    return label + f"a DICOM data set of {len(out.data)} bytes would be sent\n"


# -- store keys ------------------------------------------------------------------

def new_key(path: Path) -> str:
    from mfconsole.engine.keys import KeyCustodyError, new_key as make

    try:
        return make(path)
    except KeyCustodyError as exc:
        raise OpsError(str(exc)) from None


def key_report(config: Config) -> list[dict[str, Any]]:
    """Each configured key file (current, previous) with its key id and how many stored
    objects it sealed; key ids the store uses that no configured file provides."""
    from mfconsole.engine.store import DB_NAME, sealed_key_ids
    from mfconsole.engine.vault import VaultError, key_id_of, load_key

    counts = sealed_key_ids(config.engine.data_dir / DB_NAME)
    rows: list[dict[str, Any]] = []
    files = [("current", config.store.key_file)] + [("previous", p) for p in config.store.previous_key_files]
    for role, path in files:
        try:
            key_id = key_id_of(load_key(path)).hex()
        except (OSError, VaultError):
            key_id = None
        rows.append({"role": role, "key_id": key_id, "file": str(path),
                     "objects": counts.pop(key_id, 0) if key_id else 0})
    rows += [{"role": "unknown", "key_id": k, "file": None, "objects": n} for k, n in counts.items()]
    return rows


def rekey(config: Config, progress: Callable[[int, int], None] | None = None) -> tuple[int, int, int]:
    """Re-seal objects under previous keys with the current one; (done, failed, left).
    Refused while the running engine seals with another key (it could not open what
    this writes): restart it on the new configuration first."""
    from mfconsole.engine import rekey as rekeying
    from mfconsole.engine.engine_lock import holder_pid
    from mfconsole.engine.keys import KeyCustodyError, open_vault
    from mfconsole.engine.store import DB_NAME

    data_dir = config.engine.data_dir
    try:
        vault = open_vault(config.store, data_dir)
    except KeyCustodyError as exc:
        raise OpsError(str(exc)) from None
    conn = open_db(config)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'sealing_key_id'").fetchone()
    finally:
        conn.close()
    if holder_pid(data_dir) is not None and row is not None and row[0] != vault.key_id:
        raise OpsError(f"the running engine seals with key {row[0]}, not [store].key_file's "
                       f"{vault.key_id}: restart it on this configuration first, then run rekey")
    done, failed = rekeying.rekey(data_dir / DB_NAME, data_dir / "blobs", vault, progress=progress)
    conn = open_db(config)
    try:
        left = rekeying.remaining(conn, vault.key_id)
    finally:
        conn.close()
    return done, failed, left
