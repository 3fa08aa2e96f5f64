"""The engine's control surface: what the console asks of a running engine.

Part of the operations layer (with ops.py), above the engine: the engine is handed
``serve_control`` when it is made (``Engine(config, control=serve_control)``) and starts
and stops the server, without importing this module.

``ControlService`` answers operations by name with JSON-safe, routing-safe values;
patient fields leave it only through ``reveal`` and ``preview_handler``, both audited.
The console calls it directly when it hosts the engine, and through ``ControlServer``
when it attaches to one (``mfconsole serve``): Unix sockets in the data directory,
mode 0600 inside a 0700 directory, so file permissions are the access control and
there is no TCP control port. One request per connection, one JSON line each way.

Roles are fixed per connection by the socket it came in on, never by the request:
``control.sock`` is the operator's, ``control-ro.sock`` is read-only (observation
only: no change, and no patient data). Who asked (SO_PEERCRED → mfconsole.actor) is
written in every audit row of an action.

This module never imports Textual.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable

from mfconsole.engine import status
from mfconsole.repository import DeadLetterFilter, db_path, reading
from mfconsole.repository.states import DEAD

log = logging.getLogger("mfconsole.control")

SOCKET_NAME = "control.sock"            # operator: everything
RO_SOCKET_NAME = "control-ro.sock"      # read-only: observation, no patient data
OPERATOR, READ_ONLY = "operator", "read-only"
MAX_REQUEST = 1024 * 1024
REQUEST_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 16
IDLE_TAIL_S = 10.0          # keep the session counters caught up while nobody asks
HISTORY_S = 60              # seconds of per-second counts kept for sparklines
RATE_WINDOW_S = 10          # "objects/s" is the mean over this many whole seconds
DEAD_PAGE = 200
OUTCOMES_SCAN = 50_000      # audit rows searched back for a destination's last outcomes
LOG_TAIL_BYTES = 256 * 1024
LOG_READ_MAX = 1024 * 1024
PHI_FIELDS = (("PatientName", "patient name"), ("PatientID", "patient ID"),
              ("PatientBirthDate", "birth date"), ("PatientSex", "sex"),
              ("AccessionNumber", "accession number"), ("StudyDescription", "study description"))

# Operations that change something.
MUTATING = frozenset({"replay", "discard", "pause", "resume", "reload", "reload_handler",
                      "edit_config"})
# What a read-only connection may call: observation, routing-safe. An allow-list, so an
# operation added later is the operator's until it is listed here. Not: MUTATING, and
# reveal / preview_handler (they show patient data).
READ_ONLY_OPS = frozenset({"snapshot", "destination", "dead_letter_groups", "dead_letters",
                           "dead_letter_count", "dead_letter", "echo", "test", "handlers",
                           "log_tail", "config_fields", "objects", "object", "audit",
                           "audit_events", "rule_counts", "plan"})


class ControlError(Exception):
    """The operation cannot be done as asked; the message says why (routing-safe)."""


# -- session counters -----------------------------------------------------------

# audit event → (which column names the thing, which counter it feeds)
COUNTED = {"stored": ("listener", "received"), "duplicate": ("listener", "duplicates"),
           "refused": ("listener", "refused"), "association_rejected": ("listener", "rejected"),
           "delivered": ("destination", "sent"), "delivered_with_warning": ("destination", "sent"),
           "filtered": ("destination", "filtered"), "dead_lettered": ("destination", "errored"),
           "retry_scheduled": ("destination", "retries")}
RATED = ("received", "sent")
# A destination's health: its last HEALTH_OUTCOMES delivery outcomes within
# HEALTH_WINDOW_S; at least HEALTH_MINIMUM of them, at least this share failed: failing.
OUTCOME_EVENTS = frozenset({"delivered", "delivered_with_warning", "filtered", "dead_lettered",
                            "retry_scheduled"})
FAILED_EVENTS = frozenset({"dead_lettered", "retry_scheduled"})
HEALTH_OUTCOMES = 50
HEALTH_WINDOW_S = 900
HEALTH_MINIMUM = 5
HEALTH_FAILING_SHARE = 0.5


class SessionCounters:
    """What happened since the engine started (and in the data directory's whole life),
    per listener and destination, from the audit rows the engine writes anyway. Tailed
    by id: each update reads only the rows added since the previous one, so a long
    uptime costs nothing extra. Lifetime totals are counted once at start.

    Also each destination's recent outcomes, for its health: a destination whose
    deliveries mostly fail is flagged even while its transport is fine (a PACS that
    refuses every CT answers every association)."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self._lock = threading.Lock()
        self.totals: dict[tuple[str, str], int] = defaultdict(int)       # (name, counter)
        self.lifetime: dict[tuple[str, str], int] = defaultdict(int)
        self.per_second: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
        # destination -> recent outcomes, oldest first: (second, failed, status, count)
        self.recent: dict[str, deque[tuple[int, bool, str, int]]] = defaultdict(
            lambda: deque(maxlen=HEALTH_OUTCOMES))
        self.last_failure: dict[str, str] = {}      # destination -> its newest failure, in words
        with reading(db_path) as reads:
            self.last_id = reads.last_audit_id()
            for row in reads.audit_totals(self.last_id):
                what = COUNTED.get(row["event"])
                if what is not None:
                    self.lifetime[(row[what[0]] or "", what[1])] += row["n"]
            for row in reversed(reads.recent_outcomes(self.last_id, OUTCOMES_SCAN, 20 * HEALTH_OUTCOMES)):
                self._outcome(row["destination"] or "", row["event"], row["status"], row["sec"], 1)
                if row["event"] in FAILED_EVENTS:
                    self.last_failure[row["destination"] or ""] = row["detail"] or ""
        self.updated = time.monotonic()

    def _outcome(self, destination: str, event: str, status: str | None, sec: int, n: int) -> None:
        if event in OUTCOME_EVENTS:
            self.recent[destination].append((sec, event in FAILED_EVENTS, status or "", n))

    def update(self) -> None:
        with self._lock:
            with reading(self.db_path) as reads:
                rows = reads.audit_counts_since(self.last_id)
                failing = {r["destination"] for r in rows if r["event"] in FAILED_EVENTS}
                for name in failing:
                    row = reads.latest_failure(name, self.last_id)
                    if row is not None:
                        self.last_failure[name] = row["detail"] or ""
            horizon = int(time.time()) - HISTORY_S - 1
            for row in sorted(rows, key=lambda r: r["last"]):
                self.last_id = max(self.last_id, row["last"])
                what = COUNTED.get(row["event"])
                if what is None:
                    continue
                key = (row[what[0]] or "", what[1])
                self.totals[key] += row["n"]
                self.lifetime[key] += row["n"]
                self._outcome(row["destination"] or "", row["event"], row["status"], row["sec"], row["n"])
                if what[1] in RATED and row["sec"] > horizon:
                    seconds = self.per_second[key]
                    seconds[row["sec"]] = seconds.get(row["sec"], 0) + row["n"]
            for seconds in self.per_second.values():
                for sec in [s for s in seconds if s <= horizon]:
                    del seconds[sec]
            self.updated = time.monotonic()

    def view(self, name: str, counters: tuple[str, ...], rated: str) -> dict[str, Any]:
        """Counters of one listener/destination (this run and lifetime), its rate, its
        sparkline and, for a destination, its health."""
        with self._lock:
            now = int(time.time())
            seconds = self.per_second.get((name, rated), {})
            # Whole seconds only: the current one is still filling.
            series = [seconds.get(s, 0) for s in range(now - HISTORY_S, now)]
            return {"session": {c: self.totals.get((name, c), 0) for c in counters},
                    "lifetime": {c: self.lifetime.get((name, c), 0) for c in counters},
                    "rate": sum(series[-RATE_WINDOW_S:]) / RATE_WINDOW_S,
                    "history": series, "health": self._health(name, now)}

    def health(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._health(name, int(time.time()))

    def _health(self, name: str, now: int) -> dict[str, Any] | None:
        """How the destination's recent outcomes went: None with too few to judge."""
        recent = [o for o in self.recent.get(name, ()) if o[0] > now - HEALTH_WINDOW_S]
        total = sum(n for *_, n in recent)
        if total < HEALTH_MINIMUM:
            return None
        failed: dict[str, int] = defaultdict(int)
        for _, bad, code, n in recent:
            if bad:
                failed[code] += n
        share = sum(failed.values()) / total
        return {"outcomes": total, "failed_share": round(share, 3),
                "failing": share >= HEALTH_FAILING_SHARE,
                "status": max(failed, key=failed.get) if failed else None,
                "last_failure": self.last_failure.get(name) if failed else None}


# -- the service ------------------------------------------------------------------

class ControlService:
    """Operations over a running engine (its current config, store and workers)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.counters = SessionCounters(db_path(engine.data_dir))
        self._planning = threading.Lock()       # one routing plan at a time

    @property
    def config(self) -> Any:
        return self.engine.config      # follows reloads

    def call(self, op: str, args: dict[str, Any] | None = None, *, actor: str | None = None,
             read_only: bool = False) -> Any:
        """``actor`` and ``read_only`` come from whoever holds the connection (the socket
        the request came in on, or the in-process console), never from the request."""
        from mfconsole.actor import local
        from mfconsole.ops import OpsError

        method: Callable[..., Any] | None = getattr(self, f"op_{op}", None)
        if method is None:
            raise ControlError(f"unknown operation {op!r}")
        if read_only and op not in READ_ONLY_OPS:
            raise ControlError(f"{op} is not available on a read-only connection")
        actor = actor or local(via="in-process console")
        try:
            return method(actor=actor, **(args or {}))
        except (ControlError, OpsError) as exc:
            raise ControlError(str(exc)) from None
        except TypeError as exc:
            raise ControlError(f"{op}: wrong arguments") from exc

    def _reading(self) -> Any:
        return reading(db_path(self.engine.data_dir))

    def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Operator actions go through the engine's one writer, like everything else."""
        return self.engine.store.call(fn, *args)

    def _wake(self, destination: str | None = None) -> None:
        """Workers poll about once a second; an operator's action should not wait."""
        for name, workers in self.engine.deliveries.items():
            if destination is None or name == destination:
                workers.wake.set()

    # -- observation ------------------------------------------------------------

    def op_snapshot(self, actor: str) -> dict[str, Any]:
        self.counters.update()
        snap = status.collect(self.config, self.engine)
        snap["engine"].update({"pid": os.getpid(), "running": True, "config": str(self.config.path),
                               "version": _version()})
        snap["handlers"] = sorted(self.engine.handlers.active()) if self.engine.handlers else []
        for item in snap["listeners"]:
            item.update(self.counters.view(item["name"], ("received", "duplicates", "refused",
                                                          "rejected"), "received"))
        for item in snap["destinations"]:
            item.update(self.counters.view(item["name"], ("sent", "filtered", "errored", "retries"),
                                           "sent"))
        return snap

    def tick(self) -> None:
        """Called by the server while idle, so a console attaching after a busy day
        does not make the first snapshot read a day of audit rows."""
        if time.monotonic() - self.counters.updated > IDLE_TAIL_S:
            self.counters.update()

    def op_destination(self, actor: str, name: str) -> dict[str, Any]:
        """One destination's queue by state, backoff and last outcomes."""
        dest = self._destination(name)
        with self._reading() as reads:
            counts = reads.delivery_counts(name).get(name, {})
            row = reads.destination_state(name)
            outcomes = reads.last_outcomes(name, 10, OUTCOMES_SCAN)
            paced = status.pacing(dest, reads, time.time())
            held = status.held(dest, reads, time.time())
        out = {"name": name, "kind": dest.kind, "target": status.target(dest), "counts": counts,
               "outcomes": outcomes, "max_associations": dest.max_associations,
               "retry_initial_s": dest.retry_initial_s, "retry_max_s": dest.retry_max_s,
               "down_after": dest.down_after}
        out.update(status.destination_state(row, paced))
        out.update(held)
        out["health"] = self.counters.health(name)
        return out

    # -- dead letters -------------------------------------------------------------

    @staticmethod
    def _dead_filter(text: str | None, group: dict[str, Any] | None) -> DeadLetterFilter:
        return DeadLetterFilter(text=text or None, group=group or None)

    def op_dead_letter_groups(self, actor: str, text: str | None = None) -> list[dict[str, Any]]:
        """Dead letters grouped by cause: destination, status and reason."""
        with self._reading() as reads:
            return reads.dead_letter_groups(self._dead_filter(text, None))

    def op_dead_letters(self, actor: str, text: str | None = None, group: dict[str, Any] | None = None,
                        before_id: int | None = None, limit: int = DEAD_PAGE) -> list[dict[str, Any]]:
        """One page, newest first; the next page starts before the last id of this one."""
        with self._reading() as reads:
            return reads.dead_letter_page(self._dead_filter(text, group), before_id,
                                          max(1, min(int(limit), 1000)))

    def op_dead_letter_count(self, actor: str, text: str | None = None,
                             group: dict[str, Any] | None = None) -> int:
        with self._reading() as reads:
            return reads.dead_letter_count(self._dead_filter(text, group))

    def op_dead_letter(self, actor: str, id: int) -> dict[str, Any]:
        from mfconsole import ops

        return ops.show_dead(self.config, int(id))

    def _ids(self, ids: list[int] | None, group: dict[str, Any] | None, text: str | None) -> list[int]:
        if ids:
            return [int(i) for i in ids]
        if not group and not text:
            raise ControlError("name dead letters: ids, a group or a filter")
        with self._reading() as reads:
            return reads.dead_letter_ids(self._dead_filter(text, group))

    def op_replay(self, actor: str, ids: list[int] | None = None, group: dict[str, Any] | None = None,
                  text: str | None = None, to: str | None = None, all_: bool = False,
                  destination: str | None = None, reason: str | None = None,
                  as_stored: bool = False) -> dict[str, Any]:
        """The console names ids, a group or a filter text; the CLI names ids or
        ``all_`` with its ``destination``/``reason`` filter (as `dead-letters replay`)."""
        from mfconsole import ops

        notes: list[str] = []
        if all_ or destination is not None or reason:
            queued = ops.replay(self.config, ids, all_=bool(all_), destination=destination,
                                reason=reason, to=to, as_stored=bool(as_stored), notes=notes,
                                actor=actor, write=self._write)
            asked = len(ids) if ids else len(queued)
        else:
            chosen = self._ids(ids, group, text)
            queued = ops.replay(self.config, chosen, to=to, as_stored=bool(as_stored), notes=notes,
                                actor=actor, write=self._write) if chosen else []
            asked = len(chosen)
        self._wake(to)
        return {"queued": len(queued), "asked": asked, "notes": notes}

    def op_discard(self, actor: str, ids: list[int] | None = None, group: dict[str, Any] | None = None,
                   text: str | None = None, destination: str | None = None,
                   reason: str | None = None) -> dict[str, Any]:
        """Ids, a group or a filter text (the console); or the CLI's destination/reason."""
        from mfconsole import ops

        if destination is not None or reason:
            done = ops.discard(self.config, ids or [], destination=destination, reason=reason,
                               actor=actor, write=self._write)
            return {"discarded": done, "asked": len(ids) if ids else done}
        chosen = self._ids(ids, group, text)
        done = ops.discard(self.config, chosen, actor=actor, write=self._write) if chosen else 0
        return {"discarded": done, "asked": len(chosen)}

    def op_reveal(self, actor: str, id: int) -> dict[str, Any]:
        """Patient fields of one dead letter's object, for an operator who asked for
        them explicitly. Audited (who and which delivery, never the values). Only dead
        letters: what is queued or delivered has no reason to be looked into."""
        with self._reading() as reads:
            row = reads.delivery(int(id))
        if row is None:
            raise ControlError(f"no delivery with id {id}")
        if row["state"] != DEAD:
            raise ControlError(f"delivery {row['id']} is {row['state']}, not a dead letter: "
                               "only a dead letter's patient fields can be revealed")
        dataset = self._dataset(row)
        self.engine.audit("phi_revealed", destination=row["destination"], object_id=row["object_id"],
                          delivery_id=row["id"], sop_instance_uid=row["sop_instance_uid"],
                          detail=f"patient fields shown to {actor}", actor=actor)
        fields = []
        for keyword, label in PHI_FIELDS:
            value = dataset.get(keyword)
            fields.append([label, "" if value is None else str(value)])
        return {"id": row["id"], "fields": fields}

    def _dataset(self, row: Any) -> Any:
        from mfconsole.engine.vault import VaultError
        from mfconsole.handlers.api import DicomObject

        try:
            data = self.engine.store.read_object(row["object_id"])
            return DicomObject.from_bytes(data, row["transfer_syntax"]).dataset
        except (KeyError, VaultError, OSError, ValueError) as exc:
            raise ControlError(f"object {row['object_id']} cannot be read "
                               f"({exc.__class__.__name__})") from None

    def op_note_reveal(self, actor: str, command: str, destinations: list[str]) -> None:
        """Audit values an operator's command showed (`routes explain --reveal`, run
        beside this engine): the engine writes the row, as the one writer."""
        from mfconsole import ops

        ops.note_reveal(self.config, command, list(destinations), actor=actor, write=self._write)

    # -- destinations ---------------------------------------------------------------

    def _destination(self, name: str) -> Any:
        for d in self.config.destinations:
            if d.name == name:
                return d
        raise ControlError(f"no destination named {name!r}")

    def op_echo(self, actor: str, destination: str) -> dict[str, Any]:
        from mfconsole import ops

        result = ops.echo(self.config, destination)
        return {"ok": result.ok, "rtt_ms": round(result.rtt_ms, 1), "detail": result.detail}

    def op_test(self, actor: str, destination: str) -> dict[str, Any]:
        from mfconsole import ops
        from mfconsole.dicomvalues import sop_name, ts_name

        report = ops.test(self.config, destination)
        return {"failure": report.failure, "source": report.source,
                "rows": [[sop_name(c), ts_name(t), ok] for c, t, ok in report.rows]}

    def op_pause(self, actor: str, destination: str) -> None:
        from mfconsole import ops

        ops.pause(self.config, destination, actor=actor, write=self._write)

    def op_resume(self, actor: str, destination: str) -> None:
        from mfconsole import ops

        ops.resume(self.config, destination, actor=actor, write=self._write)
        self._wake(destination)

    # -- reload and handlers ------------------------------------------------------------

    def op_reload(self, actor: str) -> dict[str, Any]:
        return _reload_result(self.engine.reload(actor=actor))

    def op_plan(self, actor: str, hours: float | None = None) -> dict[str, Any]:
        """What a reload of config.toml would change for the objects received in the last
        ``hours`` (engine/plan.py): the file on disk replayed against the running
        configuration and handler versions. Sends nothing, reloads nothing, writes one
        `routing_plan` audit row (counts, never a value). Read-only: it changes nothing
        and shows routing-safe fields only."""
        from mfconsole.engine import plan

        try:
            hours = plan.DEFAULT_HOURS if hours is None else plan.check_hours(hours)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        if not self._planning.acquire(blocking=False):
            raise ControlError("a routing plan is already being made; try again when it is done")
        try:
            engine = self.engine
            config = engine.config          # the running one, whatever a reload does meanwhile
            running = engine.handlers.active() if engine.handlers else {}
            with self._reading() as reads:
                result = plan.compute(config.path, plan.RunningBaseline(config, running), reads,
                                      plan.Objects(reads, engine.store.vault, engine.store.blob_root),
                                      hours=hours)
        finally:
            self._planning.release()
        status_word, detail = plan.audit_detail(result, actor)
        engine.audit("routing_plan", status=status_word, actor=actor, detail=detail)
        result["lines"] = plan.render(result)
        return result

    def op_rule_counts(self, actor: str) -> dict[str, Any]:
        """What the rules decided since the engine started (`mfconsole status`)."""
        return self.engine.rule_counts.view()

    def op_handlers(self, actor: str) -> list[dict[str, Any]]:
        """Each handler: the running version, the file on disk (loaded in isolation, so
        a broken edit shows before a reload) and its last reload result."""
        from mfconsole import ops

        active = self.engine.handlers.active() if self.engine.handlers else {}
        last = {r.name: r for r in (self.engine.handlers.last_reload if self.engine.handlers else [])}
        on_disk = {h["name"]: h for h in ops.list_handlers(self.config)}
        out = []
        for name in sorted(set(active) | set(on_disk)):
            running, disk, result = active.get(name), on_disk.get(name, {}), last.get(name)
            if running is None:
                state = "error" if disk.get("error") else "not routed"
            elif disk.get("error"):
                state = "file broken"
            elif disk and disk.get("digest") != running.digest:
                state = "changed on disk"
            else:
                state = "active"
            out.append({"name": name, "state": state,
                        "version": running.version if running else disk.get("version", ""),
                        "digest": (running.digest if running else disk.get("digest", ""))[:12],
                        "file_version": disk.get("version", ""), "error": disk.get("error", ""),
                        "routes": disk.get("routes", []),
                        "last_reload": str(result) if result else "",
                        "last_error": result.error if result else ""})
        return out

    def op_reload_handler(self, actor: str, name: str) -> dict[str, Any]:
        """Reload one handler; the others keep their running version."""
        from mfconsole.engine.engine import handler_names

        engine = self.engine
        if name not in handler_names(self.config):
            raise ControlError(f"no route uses a handler named {name!r}")
        mine = engine.reload_handler(name)
        report = [str(r) for r in mine]
        refused = any(r.outcome == "kept" for r in mine)
        engine.audit("handler_reloaded", status="errors" if refused else "ok",
                     detail=f"by {actor}: " + ("; ".join(report) or "no change"), actor=actor)
        return {"report": report, "refused": False, "errors": refused}

    def op_preview_handler(self, actor: str, name: str, delivery_id: int | None = None,
                           object_id: int | None = None, reveal: bool = False) -> dict[str, Any]:
        """What the running version of a handler would do to a stored object (a given
        delivery, the latest delivery of a given object through it, or the most recent
        object routed through it). Sends nothing. Without ``reveal``: the structure only
        (attributes changed, HL7 segments), no value. With it: the output itself, which
        may quote patient data: an audited reveal."""
        from mfconsole import ops
        from mfconsole.contract import Outbound
        from mfconsole.engine.handlers import HandlerError
        from mfconsole.engine.transform import Origin

        try:
            handler = self.engine.handlers.get(name)
        except HandlerError as exc:
            raise ControlError(str(exc)) from None
        with self._reading() as reads:
            if delivery_id is not None:
                row = reads.delivery(int(delivery_id))
                row = row if row is not None and row["purged_at"] is None else None
            elif object_id is not None:
                row = next((d for d in reversed(reads.rows("deliveries", object_id=int(object_id)))
                            if d["handler"] == name), None)
                row = reads.delivery(row["id"]) if row is not None else None
                row = row if row is not None and row["purged_at"] is None else None
            else:
                row = next(iter(reads.recent_for_handler(name, 1)), None)
        if row is None:
            which = (f" with delivery {delivery_id}" if delivery_id is not None else
                     f" routed with object {object_id}" if object_id is not None else "")
            raise ControlError(f"no stored object for handler {name}{which}")
        self._dataset(row)       # readable at all? (a clear error instead of a handler one)
        obj = Outbound(row["sop_class_uid"], row["sop_instance_uid"], row["transfer_syntax"],
                       self.engine.store.read_object(row["object_id"]), row["study_uid"] or "")
        origin = Origin.of(row)
        if not reveal:
            return {"delivery_id": row["id"], "object_id": row["object_id"],
                    **ops.preview_structure(self.config, handler, obj, row["destination"], origin)}
        text = ops.preview_handler(self.config, handler, obj, row["destination"], origin)
        self.engine.audit("phi_revealed", destination=row["destination"], object_id=row["object_id"],
                          delivery_id=row["id"], sop_instance_uid=row["sop_instance_uid"],
                          detail=f"handler {handler.label} preview shown to {actor}", actor=actor)
        return {"delivery_id": row["id"], "object_id": row["object_id"], "text": text}

    # -- logs ----------------------------------------------------------------------------

    # -- objects and the audit trail ----------------------------------------------------

    def op_objects(self, actor: str, filters: dict[str, Any] | None = None, sort: str = "id",
                   descending: bool = True, offset: int = 0, limit: int = 200) -> dict[str, Any]:
        """One page of stored objects, each with its destinations' states."""
        from mfconsole import ops

        return ops.list_objects(self.config, filters, sort=sort, descending=descending,
                                offset=offset, limit=limit)

    def op_object(self, actor: str, id: int) -> dict[str, Any]:
        """One object's timeline: received, stored, each delivery's attempts and outcomes,
        replays and discards with their actor."""
        from mfconsole import ops

        return ops.show_object(self.config, int(id))

    def op_find_objects(self, actor: str, accession: str | None = None, patient_id: str | None = None,
                        filters: dict[str, Any] | None = None, sort: str = "id", descending: bool = True,
                        offset: int = 0, limit: int = 200) -> dict[str, Any]:
        """Objects by accession number or patient ID (keyed hashes; audited with the
        actor, never the value). An operator's: it answers a patient-data question."""
        from mfconsole import ops

        return ops.find_objects(self.config, self.engine.store.vault, accession=accession,
                                patient_id=patient_id, filters=filters, actor=actor, write=self._write,
                                sort=sort, descending=descending, offset=offset, limit=limit)

    def op_audit(self, actor: str, filters: dict[str, Any] | None = None, before_id: int | None = None,
                 limit: int = 200) -> list[dict[str, Any]]:
        from mfconsole import ops

        return ops.list_audit(self.config, filters, before_id, limit)

    def op_audit_events(self, actor: str) -> list[str]:
        with self._reading() as reads:
            return reads.audit_events()

    def op_log_tail(self, actor: str, cursor: dict[str, int] | None = None) -> dict[str, Any]:
        """New lines of the redacted log since ``cursor`` (the last ones when None).
        Follows rotation: another inode, or a shorter file, starts from its beginning."""
        path = self.engine.data_dir / "logs" / "mfconsole.log"
        try:
            st = path.stat()
        except FileNotFoundError:
            return {"lines": [], "cursor": None}
        if cursor and cursor.get("ino") == st.st_ino and cursor.get("pos", 0) <= st.st_size:
            pos, skip_partial = cursor["pos"], False
        elif cursor:
            pos, skip_partial = 0, False
        else:
            pos = max(0, st.st_size - LOG_TAIL_BYTES)
            skip_partial = pos > 0
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read(LOG_READ_MAX)
        if skip_partial and b"\n" in data:
            cut = data.index(b"\n") + 1
            data, pos = data[cut:], pos + cut
        end = data.rfind(b"\n") + 1        # only whole lines; the rest comes next time
        lines = data[:end].decode("utf-8", errors="replace").splitlines()
        return {"lines": lines, "cursor": {"ino": st.st_ino, "pos": pos + end}}

    # -- configuration ---------------------------------------------------------------------

    def op_config_fields(self, actor: str) -> list[dict[str, Any]]:
        from mfconsole.engine import config_edit

        return config_edit.fields(self.config)

    def op_edit_config(self, actor: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Validate as `mfconsole check` does, write atomically, reload. An invalid edit
        changes nothing and names every problem with its key."""
        from mfconsole.engine import config_edit

        with self.engine._reload_lock:      # one writer of config.toml at a time
            problems = config_edit.apply(self.config, changes)
        if problems:
            return {"ok": False, "problems": problems, "report": []}
        self.engine.audit("config_edited", status="ok", actor=actor, detail=f"by {actor}: " + "; ".join(
            f"{key} = {_plain(value)}" for key, value in changes.items()))
        result = _reload_result(self.engine.reload(actor=actor))
        return {"ok": not result["refused"], "problems": [], **result}


def _reload_result(report: list[str]) -> dict[str, Any]:
    refused = bool(report) and report[0].startswith("refused")
    return {"report": report, "refused": refused,
            "errors": refused or any("new version refused" in line for line in report)}


def _plain(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _version() -> str:
    from mfconsole import __version__

    return __version__


# -- the socket --------------------------------------------------------------------

class ControlServer:
    """``data_dir/control.sock`` (operator) and ``data_dir/control-ro.sock`` (read-only):
    one thread accepts on each, one short-lived thread per request. A connection's role
    is the socket it came in on; nothing in a request can raise it. The engine holds
    the data directory lock, so socket files left by a crashed engine are stale and
    replaced."""

    def __init__(self, service: ControlService, path: Path, ro_path: Path | None = None):
        self.service = service
        self.path = path
        self.ro_path = ro_path if ro_path is not None else path.with_name(RO_SOCKET_NAME)
        self._socks: dict[str, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def _paths(self) -> dict[str, Path]:
        return {OPERATOR: self.path, READ_ONLY: self.ro_path}

    def start(self) -> None:
        try:
            for role, path in self._paths().items():
                self._socks[role] = _listen(path)
        except BaseException:
            self._close()
            raise
        for role, sock in self._socks.items():
            thread = threading.Thread(target=self._accept_loop, args=(sock, role),
                                      name=f"control-{role}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for role in self._socks:
            try:     # wake accept() now rather than at its next timeout
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
                    wake.settimeout(1.0)
                    wake.connect(str(self._paths()[role]))
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        self._close()

    def _close(self) -> None:
        for role, sock in self._socks.items():
            sock.close()
            self._paths()[role].unlink(missing_ok=True)
        self._socks = {}

    def _accept_loop(self, sock: socket.socket, role: str) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                if role == OPERATOR:
                    self._tick()
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            if self._stop.is_set():
                conn.close()
                return
            if not self._slots.acquire(blocking=False):
                conn.close()          # a runaway client must not pile up threads
                continue
            threading.Thread(target=self._serve, args=(conn, role), name="control-request",
                             daemon=True).start()

    def _tick(self) -> None:
        try:
            self.service.tick()
        except Exception as exc:
            log.warning("control: counters update failed (%s)", exc.__class__.__name__)

    def _serve(self, conn: socket.socket, role: str) -> None:
        try:
            conn.settimeout(REQUEST_TIMEOUT_S)
            actor = _peer_actor(conn)
            line = _read_line(conn)
            reply = self._answer(line, actor, role)
            conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
        except (OSError, ValueError):
            pass                      # the client went away or sent garbage: nothing to say
        finally:
            conn.close()
            self._slots.release()

    def _answer(self, line: bytes, actor: str, role: str) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op, args = request["op"], request.get("args") or {}
            if not isinstance(op, str) or not isinstance(args, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed request"}
        # Anything else in the request (a "read_only" or "actor" a client sends) is ignored.
        try:
            result = self.service.call(op, args, actor=actor, read_only=role != OPERATOR)
            return {"ok": True, "result": result}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:      # never the exception's text: it may quote data
            log.error("control: %s failed with %s", op, exc.__class__.__name__)
            return {"ok": False, "error": f"{op} failed ({exc.__class__.__name__}); see the log"}


def _listen(path: Path) -> socket.socket:
    if len(os.fsencode(path)) >= 104:     # sun_path is 108 bytes on Linux, less elsewhere
        raise OSError(f"control socket path too long ({path})")
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        sock.listen(MAX_CONNECTIONS)
        sock.settimeout(1.0)
    except BaseException:
        sock.close()
        raise
    return sock


def _read_line(conn: socket.socket) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    return bytes(buf.split(b"\n", 1)[0])


def _peer_actor(conn: socket.socket) -> str:
    """Who is asking, for the audit trail (the socket's mode already decided whether
    they may): the peer's uid from the kernel, its login uid and SUDO_USER when
    readable."""
    from mfconsole.actor import of_process

    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
    except (AttributeError, OSError):
        return "unknown peer via control socket"
    try:
        return of_process(pid, uid, via="control socket")
    except Exception:            # best effort beyond the uid, never a refusal
        return f"uid {uid} via control socket"


def request(path: Path, op: str, args: dict[str, Any] | None = None, *,
            timeout: float | None = 120.0) -> Any:
    """One request to an engine's control socket (the attached console, the CLI). The
    role is the socket's: ``control-ro.sock`` for a read-only console."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        line = _read_line(sock)
    if not line:
        raise ControlError(f"the engine closed the control connection during {op}")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(reply.get("error") or f"{op} failed")
    return reply.get("result")


def serve_control(engine: Any) -> ControlServer:
    """The control sockets of an engine: what ``Engine(control=...)`` takes."""
    return ControlServer(ControlService(engine), engine.data_dir / SOCKET_NAME)
