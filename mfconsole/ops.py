"""Operator commands over a configuration and its data directory: echo, test,
dead letters, pause/resume, keys. The CLI prints; the control socket (the console)
calls the same functions.

Queue changes are audited with their ``actor`` (mfconsole.actor: who, and through
what) and written by one writer: the running engine's (its control service passes
``write=store.call``), or, only while no engine runs, one transaction of the CLI's own
(``repository.writing``). Against a running engine the CLI does not call them itself:
it asks the engine over the control socket, and the engine calls them with the actor
it read from the socket's peer credentials.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from mfconsole import egress as egress_mod
from mfconsole import when
from mfconsole.config import Config, DestinationConfig, ae_title_problem
from mfconsole.dimse import kind as dimse_kind
from mfconsole.dimse import sender
from mfconsole.engine import outbox
from mfconsole.actor import local as local_actor
from mfconsole.repository import AuditFilter, DeadLetterFilter, ObjectFilter, Tx, db_path, reading, writing
from mfconsole.repository.reads import OBJECT_SORTS
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
    return dimse_kind.echo(resolve_peer(config, target), egress(config))


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
    db = db_path(config.engine.data_dir)
    if not db.exists():
        return []
    with reading(db) as reads:
        return reads.queued_pairs(destination, time.time() - days * 86400, sender.MAX_CONTEXTS)


def test(config: Config, target: str) -> TestReport:
    peer = resolve_peer(config, target)
    pairs = queued_pairs(config, target)
    source = f"queued for or sent to {target} in the last 7 days"
    if not pairs:
        pairs, source = DEFAULT_PAIRS, "common SOP classes (nothing queued or sent recently)"
    failure, rows = dimse_kind.probe_contexts(peer, pairs, egress(config))
    return TestReport(peer, failure.reason if failure else None, rows, source)


# -- queue operations ------------------------------------------------------------

# How an operation writes: ``write(fn, *args)`` runs ``fn(tx, *args)`` in one
# transaction of the one writer (the engine's Store.call); None: no engine runs, and
# the operation opens the database for its own transaction.
Write = Callable[..., Any]


def _db(config: Config) -> Path:
    db = db_path(config.engine.data_dir)
    if not db.exists():
        raise OpsError(f"no database at {db}: the engine has never run with this data_dir")
    return db


def _who(actor: str | None) -> str:
    """Callers name the actor; without one it is this process's user, writing directly."""
    return actor or local_actor(via="direct database write")


def _write(config: Config, write: Write | None, fn: Callable[..., Any], *args: Any) -> Any:
    if write is not None:
        return write(fn, *args)
    with writing(_db(config)) as run:
        return run(fn, *args)


def _destination(config: Config, name: str) -> None:
    if name not in {d.name for d in config.destinations}:
        raise OpsError(f"no destination named {name!r}")


def list_dead(config: Config, destination: str | None = None, reason: str | None = None
              ) -> list[dict[str, Any]]:
    with reading(_db(config)) as reads:
        return outbox.dead_letters(reads, destination, reason)


def show_dead(config: Config, delivery_id: int) -> dict[str, Any]:
    with reading(_db(config)) as reads:
        rows = reads.dead_letters(DeadLetterFilter(ids=(int(delivery_id),)))
        if not rows:
            raise OpsError(f"no dead letter with id {delivery_id}")
        row = rows[0]
        row["history"] = reads.delivery_history(delivery_id)
        return row


def replay(config: Config, ids: list[int] | None, *, all_: bool = False, destination: str | None = None,
           reason: str | None = None, to: str | None = None, as_stored: bool = False,
           notes: list[str] | None = None, progress: Callable[[int, int], None] | None = None,
           actor: str | None = None, write: Write | None = None) -> list[int]:
    """Queue dead letters again, in transactions of outbox.BULK_BATCH (a filter that
    matches a million rows never holds the writer for long); ``progress(done, total)``
    after each."""
    check_replay(config, ids, all_=all_, destination=destination, to=to)
    actor = _who(actor)
    chosen = list(dict.fromkeys(ids)) if ids else [r["id"] for r in list_dead(config, destination, reason)]
    queued: list[int] = []
    for n, batch in enumerate(outbox.batches(chosen), 1):
        queued += _write(config, write, partial(outbox.replay, to=to, as_stored=as_stored,
                                                notes=notes, actor=actor), batch)
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
            actor: str | None = None, write: Write | None = None) -> int:
    """Dead letters are dropped only when named: by id, or by a filter (never "all").
    In batches, like ``replay``."""
    check_discard(config, ids, destination=destination, reason=reason)
    actor = _who(actor)
    chosen = list(dict.fromkeys(ids)) if ids else [r["id"] for r in list_dead(config, destination, reason)]
    done = 0
    for n, batch in enumerate(outbox.batches(chosen), 1):
        done += _write(config, write, partial(outbox.discard, actor=actor), batch)
        if progress is not None:
            progress(min(len(chosen), n * outbox.BULK_BATCH), len(chosen))
    return done


def check_destination(config: Config, name: str) -> None:
    _destination(config, name)


def pause(config: Config, destination: str, *, actor: str | None = None,
          write: Write | None = None) -> None:
    _destination(config, destination)
    _write(config, write, partial(outbox.pause, actor=_who(actor)), destination, "paused by operator")


def resume(config: Config, destination: str, *, actor: str | None = None,
           write: Write | None = None) -> None:
    _destination(config, destination)
    _write(config, write, partial(outbox.resume, actor=_who(actor)), destination)


# -- the object browser and the audit trail ------------------------------------------

OBJECT_PAGE_MAX = 1000
def parse_time(text: str | float | None, now: float | None = None) -> float | None:
    """A point in time as an operator writes it (mfconsole.when)."""
    try:
        return when.parse_time(text, now)
    except ValueError as exc:
        raise OpsError(str(exc)) from None


_OBJECT_FILTERS = {f for f in ObjectFilter.__dataclass_fields__ if f not in ("tokens",)}
_AUDIT_FILTERS = set(AuditFilter.__dataclass_fields__)


def _filters(filters: dict[str, Any] | None, known: set[str], what: str) -> dict[str, Any]:
    """A filter as a request or the CLI names it: empty values dropped, unknown names
    refused (naming the known ones), times as an operator writes them parsed."""
    filters = {k: v for k, v in (filters or {}).items() if v not in (None, "")}
    unknown = sorted(set(filters) - known)
    if unknown:
        raise OpsError(f"unknown {what} filter {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    for key in ("since", "until"):
        if key in filters:
            filters[key] = parse_time(filters[key])
    return filters


def object_filter(filters: dict[str, Any] | None, tokens: tuple[str, ...] | None = None) -> ObjectFilter:
    """The browser's filter from names a request or the CLI gives."""
    return ObjectFilter(**_filters(filters, _OBJECT_FILTERS, "object"), tokens=tokens)


def list_objects(config: Config, filters: dict[str, Any] | None = None, *, sort: str = "id",
                 descending: bool = True, offset: int = 0, limit: int = 200,
                 tokens: tuple[str, ...] | None = None) -> dict[str, Any]:
    """One page of stored objects (routing-safe fields, each destination's state) and
    how many match in all."""
    if sort not in OBJECT_SORTS:
        raise OpsError(f"objects sort by one of {', '.join(OBJECT_SORTS)}, not {sort!r}")
    which = object_filter(filters, tokens)
    with reading(_db(config)) as reads:
        rows = reads.objects_page(which, sort=sort, descending=bool(descending), offset=max(0, int(offset)),
                                  limit=max(1, min(int(limit), OBJECT_PAGE_MAX)))
        return {"rows": rows, "total": reads.object_count(which)}


def show_object(config: Config, object_id: int) -> dict[str, Any]:
    """An object, its deliveries and its timeline (every audit row about them)."""
    with reading(_db(config)) as reads:
        timeline = reads.object_timeline(int(object_id))
    if timeline is None:
        raise OpsError(f"no object with id {object_id}")
    return timeline


def find_objects(config: Config, vault: Any, *, accession: str | None = None,
                 patient_id: str | None = None, filters: dict[str, Any] | None = None,
                 actor: str | None = None, write: Write | None = None, **page: Any) -> dict[str, Any]:
    """Objects by accession number or patient ID, matched on keyed hashes (the values
    are never stored in clear). The search is audited with the actor, never the value."""
    if not accession and not patient_id:
        raise OpsError("name an accession number or a patient ID")
    tokens: list[str] = []
    if accession:
        tokens += vault.search_tokens("accession", accession)
    if patient_id:
        tokens += vault.search_tokens("patient_id", patient_id)
    result = list_objects(config, filters, tokens=tuple(tokens), **page)
    what = " and ".join(w for w, v in (("accession number", accession), ("patient ID", patient_id)) if v)
    who = _who(actor)
    _write(config, write, partial(Tx.audit, actor=who,
                                  detail=f"by {who}: objects searched by {what}: {result['total']} found"),
           "identifier_search")
    return result


# Commands whose shown values an operator may ask for (the audit row names it).
REVEALING_COMMANDS = ("routes explain",)


def note_reveal(config: Config, command: str, destinations: list[str], *,
                actor: str | None = None, write: Write | None = None) -> None:
    """Audit that ``command`` showed an operator patient values (coercion's before and
    after, for ``destinations``): who and what, never a value nor a file name."""
    if command not in REVEALING_COMMANDS:
        raise OpsError(f"{command!r} is not a command that reveals values")
    names = [d.name for d in config.destinations]
    unknown = [d for d in destinations if d not in names]
    if unknown or not destinations:
        raise OpsError(f"no destination named {', '.join(map(repr, unknown))}" if unknown
                       else "name the destinations whose values were shown")
    who = _who(actor)
    _write(config, write, partial(Tx.audit, actor=who,
                                  detail=f"{command}: coercion values of a file for "
                                         f"{', '.join(destinations)} shown to {who}"),
           "phi_revealed")


def list_audit(config: Config, filters: dict[str, Any] | None = None, before_id: int | None = None,
               limit: int = 200) -> list[dict[str, Any]]:
    """The audit trail, newest first, filtered (event, destination, listener, actor,
    object_id, since, until, text)."""
    which = AuditFilter(**_filters(filters, _AUDIT_FILTERS, "audit"))
    with reading(_db(config)) as reads:
        return reads.audit_page(which, before_id, max(1, min(int(limit), OBJECT_PAGE_MAX)))


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
        routes += [f"rule {r.name} -> {', '.join(r.to)}" for r in config.rules if r.handler == name]
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


def _run_handler(config: Config, handler: Any, obj: Any, destination: str | None,
                 origin: Any = None) -> tuple[str, Any, Any]:
    """(label, what the handler made or None when it filtered, the destination);
    ``origin`` (transform.Origin): where a stored object came from."""
    from mfconsole.contract import Outcome
    from mfconsole.engine.handlers import Handlers
    from mfconsole.engine.transform import Transformer

    name = handler.name
    if destination is None:
        targets = [d for r in (*config.routes, *config.rules) if r.handler == name for d in r.to]
        destination = targets[0] if targets else None
    dest = next((d for d in config.destinations if d.name == destination), None)
    if dest is None:
        raise OpsError(f"name a destination with --destination (no route uses {name})"
                       if destination is None else f"no destination named {destination!r}")
    out, _ = Transformer(Handlers.single(handler), dest)(name, f"preview->{dest.name}", 0, obj,
                                                         origin)
    label = f"{handler.label} for {dest.name} ({dest.kind})"
    if isinstance(out, Outcome):
        if out.status == "filtered":
            return label, None, dest
        raise OpsError(out.reason)
    return label, out, dest


def preview_handler(config: Config, handler: Any, obj: Any, destination: str | None = None,
                    origin: Any = None) -> str:
    """What a loaded handler version emits for one object, as text, values included
    (the caller decides whether that is a reveal). Sends nothing."""
    from mfconsole.kinds import kind_of

    label, out, dest = _run_handler(config, handler, obj, destination, origin)
    if out is None:
        return f"# {label}\nfiltered: the handler returned None (nothing would be sent)\n"
    if kind_of(dest).produces == "hl7":
        return f"# {label}\n" + out.data.decode("utf-8").replace("\r", "\n")
    if kind_of(dest).produces == "fhir":
        import json

        resource = json.loads(out.data)
        return (f"# {label}\nFHIR {resource.get('resourceType', 'resource')} of {len(out.data)} bytes "
                "would be sent (a conditional update on its Study Instance UID)\n"
                + json.dumps(resource, indent=2, ensure_ascii=False) + "\n")
    changes = dicom_changes(obj, out)
    lines = [f"# {label}", f"a DICOM data set of {len(out.data)} bytes would be sent; "
             f"{len(changes)} attribute(s) changed"]
    for c in changes:
        lines.append(f"  {c['change']:<8} {c['tag']} {c['keyword']}: {c.get('before', '')!s} → {c.get('after', '')!s}"
                     if c["change"] == "changed" else
                     f"  {c['change']:<8} {c['tag']} {c['keyword']}: {c.get('after', c.get('before', ''))!s}")
    return "\n".join(lines) + "\n"


def preview_structure(config: Config, handler: Any, obj: Any, destination: str | None = None,
                      origin: Any = None) -> dict[str, Any]:
    """What a handler version would do to one object, without any value: for a DICOM
    output the attributes it adds, removes or changes (tag and name); for HL7 the
    segments and how many fields each carries. Routing-safe: no reveal needed."""
    from mfconsole.kinds import kind_of

    label, out, dest = _run_handler(config, handler, obj, destination, origin)
    if out is None:
        return {"label": label, "kind": "filtered"}
    if kind_of(dest).produces == "hl7":
        segments = [seg for seg in out.data.decode("utf-8", "replace").split("\r") if seg]
        return {"label": label, "kind": "hl7", "bytes": len(out.data),
                "segments": [{"segment": seg[:3], "fields": seg.count("|")} for seg in segments]}
    if kind_of(dest).produces == "fhir":
        import json

        resource = json.loads(out.data)
        return {"label": label, "kind": "fhir", "bytes": len(out.data),
                "resource_type": resource.get("resourceType"), "elements": sorted(resource),
                "series": len(resource.get("series") or []),
                "instances": sum(len(s.get("instance") or []) for s in resource.get("series") or [])}
    changes = [{k: v for k, v in c.items() if k not in ("before", "after")} for c in dicom_changes(obj, out)]
    return {"label": label, "kind": "dicom", "bytes": len(out.data), "changes": changes}


def dicom_changes(before: Any, after: Any) -> list[dict[str, Any]]:
    """The top-level attributes that differ between two encoded data sets (objects with
    ``data`` and ``transfer_syntax``): tag, keyword, added / removed / changed, and the
    values as text (``before``/``after``: patient data — callers decide who sees them)."""
    from pydicom.datadict import keyword_for_tag

    from mfconsole.handlers.api import DicomObject

    a = DicomObject.from_bytes(before.data, before.transfer_syntax).dataset
    b = DicomObject.from_bytes(after.data, after.transfer_syntax).dataset
    out = []
    for tag in sorted(set(a.keys()) | set(b.keys())):
        old, new = a.get(tag), b.get(tag)
        if old is not None and new is not None and old.VR == new.VR and old.value == new.value:
            continue
        change = "added" if old is None else "removed" if new is None else "changed"
        row: dict[str, Any] = {"tag": f"({tag.group:04X},{tag.element:04X})", "change": change,
                               "keyword": keyword_for_tag(tag) or ("private" if tag.is_private else "unknown")}
        if old is not None:
            row["before"] = _shown(old)
        if new is not None:
            row["after"] = _shown(new)
        out.append(row)
    return out


def _shown(element: Any) -> str:
    if element.VR == "SQ":
        return f"({len(element.value)} item(s))"
    if element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return f"({len(element.value or b'')} bytes)"
    return str(element.value)[:200]


# -- the routing plan -------------------------------------------------------------

def routing_plan(config: Config, hours: float, *, actor: str | None = None) -> dict[str, Any]:
    """`reload --plan` while no engine runs: the configuration on disk (``config``'s
    file, read again) replayed over the objects received in the last ``hours``, against
    what each object got when it was received (engine/plan.py). Opens stored objects
    with the key file; sends nothing; audits one `routing_plan` row."""
    from mfconsole.engine import plan
    from mfconsole.engine.keys import KeyCustodyError, open_vault

    db = _db(config)
    key_file = config.store.key_file
    if not key_file.exists():      # open_vault would make a key for an empty store: not here
        raise OpsError(f"store.key_file {key_file} is missing: the plan cannot open stored objects")
    try:
        vault = open_vault(config.store, config.engine.data_dir)
    except KeyCustodyError as exc:
        raise OpsError(str(exc)) from None
    with reading(db) as reads:
        result = plan.compute(config.path, plan.ReceivedBaseline(reads), reads,
                              plan.Objects(reads, vault, config.engine.data_dir / "blobs"), hours=hours)
    who = _who(actor)
    status, detail = plan.audit_detail(result, who)
    _write(config, None, partial(Tx.audit, actor=who, status=status, detail=detail), "routing_plan")
    result["lines"] = plan.render(result)
    return result


# -- store keys ------------------------------------------------------------------

def health(config: Config, engine: Any = None, status: dict[str, Any] | None = None) -> list[Any]:
    """mfconsole/health.py's problems, from the store as it is now (``status``: what
    engine/status.collect returned, when the caller has it already)."""
    from mfconsole import health as health_mod
    from mfconsole.engine.status import collect

    status = collect(config, engine) if status is None else status
    path = db_path(config.engine.data_dir)
    if not path.exists():
        return health_mod.problems(config, status)
    with reading(path) as reads:
        return health_mod.problems(config, status, reads)


def new_key(path: Path) -> str:
    from mfconsole.engine.keys import KeyCustodyError, new_key as make

    try:
        return make(path)
    except KeyCustodyError as exc:
        raise OpsError(str(exc)) from None


def key_report(config: Config) -> list[dict[str, Any]]:
    """Each configured key file (current, previous) with its key id and how many stored
    objects it sealed; key ids the store uses that no configured file provides."""
    from mfconsole.engine.store import sealed_key_ids
    from mfconsole.engine.vault import VaultError, key_id_of, load_key

    counts = sealed_key_ids(db_path(config.engine.data_dir))
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

    data_dir = config.engine.data_dir
    try:
        vault = open_vault(config.store, data_dir)
    except KeyCustodyError as exc:
        raise OpsError(str(exc)) from None
    db = _db(config)
    with reading(db) as reads:
        sealing = reads.meta("sealing_key_id")
    if holder_pid(data_dir) is not None and sealing is not None and sealing != vault.key_id:
        raise OpsError(f"the running engine seals with key {sealing}, not [store].key_file's "
                       f"{vault.key_id}: restart it on this configuration first, then run rekey")
    done, failed = rekeying.rekey(db, data_dir / "blobs", vault, progress=progress)
    with reading(db) as reads:
        left = rekeying.remaining(reads, vault.key_id)
    return done, failed, left
