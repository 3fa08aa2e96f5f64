"""A routing plan before a change (`mfconsole reload --plan`, the console's configuration
screen): the objects received in the last N hours replayed through the configuration on
disk — its rules, fallback and handlers — beside what they get now. Per destination the
objects that would newly go there and those that would not any more (``+312 / -40``),
handler and coercion changes and what the new handlers would filter, per rule how many
objects it decides, discards and unrouted objects, with a few routing-safe samples of
each change.

Nothing is sent, reloaded or written here: the caller audits one ``routing_plan`` row.
What each object gets now is a ``Baseline``:

* ``RunningBaseline``: the running engine's configuration and handler versions (the
  engine's control service, `reload --plan` against a running engine);
* ``ReceivedBaseline``: what each object got when it was received, read back from its
  ingest deliveries and routing audit rows (no engine runs: nothing else is "now").

Each object is decided as at ingest: its association fields come from its row, and
when a rule of either configuration matches on header attributes its blob is opened
and scanned for those (``scan_dataset``, streamed for objects held in files). Handlers
are loaded from the files on disk in isolation (as `handlers list` does), never
installed in the running engine, and run on at most HANDLER_RUNS objects per
destination. Values of the objects never leave this module: samples are routing-safe
fields (id, modality, SOP class, calling AE, listener, time, SOP Instance UID).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mfconsole.config import Config, ConfigError, load
from mfconsole.contract import Outbound, Outcome
from mfconsole.dicomvalues import sop_name
from mfconsole.dimse.dataset_scan import DatasetRejected, DatasetStream, HeaderSummary, can_stream, scan_dataset
from mfconsole.engine.handlers import HandlerError, Handlers, LoadedHandler, load as load_handler
from mfconsole.engine.router import Decision, Router
from mfconsole.engine.store import Route
from mfconsole.engine.transform import Origin, Transformer
from mfconsole.engine.vault import Vault, VaultError
from mfconsole.kinds import kind_of
from mfconsole.repository import Reads
from mfconsole.repository.states import INLINE

DEFAULT_HOURS = 24.0
MAX_HOURS = 24.0 * 366
MAX_OBJECTS = 100_000        # newest first; the plan says when there were more
HANDLER_RUNS = 1_000         # per destination: a handler may be slow, the plan must not be
SAMPLES = 3                  # per change line
PAGE = 1_000                 # rows read at a time (each page its own short read)
# `reload --plan` exits like diff(1): 0 nothing would change, 1 something would, 2 the
# configuration on disk does not load (or the plan could not be made).
EXIT_SAME, EXIT_CHANGED, EXIT_TROUBLE = 0, 1, 2

SENT, FILTERED = "sent", "filtered"      # what a handler step makes of an object (or an error)


# -- what objects get now ------------------------------------------------------------

class Baseline:
    """What each object gets now (see the module docstring)."""
    label = ""
    header_tags: frozenset[int] = frozenset()
    handlers: dict[str, LoadedHandler] = {}       # versions running now (empty: unknown)
    config: Config | None = None                  # the configuration deciding now, if any

    def prepare(self, rows: list[dict[str, Any]]) -> None:
        """Called with each page of rows before they are decided."""

    def decide(self, row: dict[str, Any], summary: HeaderSummary, meta: dict[str, Any]) -> Decision:
        raise NotImplementedError


class RunningBaseline(Baseline):
    label = "the running configuration"

    def __init__(self, config: Config, handlers: dict[str, LoadedHandler]):
        self.config = config
        self.router = Router(config)
        self.header_tags = self.router.header_tags
        self.handlers = dict(handlers)

    def decide(self, row: dict[str, Any], summary: HeaderSummary, meta: dict[str, Any]) -> Decision:
        return self.router.decide(summary, meta)


# "version=1 size=123 routes=1 (rule ct)": the words the engine wrote in the `stored`
# audit row of an object routed by rules (engine/router.py Decision.words).
_WORDS = re.compile(r" \((.*)\)$")


class ReceivedBaseline(Baseline):
    label = "what each object got when it was received (no engine runs)"

    def __init__(self, reads: Reads):
        self.reads = reads
        self._got: dict[int, dict[str, Any]] = {}

    def prepare(self, rows: list[dict[str, Any]]) -> None:
        self._got = self.reads.routing_received(r["id"] for r in rows)

    def decide(self, row: dict[str, Any], summary: HeaderSummary, meta: dict[str, Any]) -> Decision:
        return received_decision(self._got.get(row["id"]) or {"routes": [], "stored": None,
                                                               "discarded": None, "unrouted": False})


def received_decision(got: dict[str, Any]) -> Decision:
    """The Decision an object was routed by, from Reads.routing_received."""
    if got["discarded"]:
        return Decision((), rules=(got["discarded"],), discarded=True, ruled=True)
    routes = tuple(Route(*route) for route in got["routes"])
    words = _WORDS.search(got["stored"] or "")
    # "rule stroke; urgent": the priority is not a rule's name.
    said = (words.group(1) if words else "").removesuffix("; urgent")
    rules: tuple[str, ...] = ()
    if said.startswith("rule "):
        rules = (said[len("rule "):],)
    elif said.startswith("rules "):
        rules = tuple(said[len("rules "):].split(", "))
    return Decision(routes, rules=rules, ruled=bool(said) or got["unrouted"])


# -- the stored objects ------------------------------------------------------------------

class Objects:
    """Stored objects opened with the store's keys: the header values rules match on,
    or the whole data set for a handler. Objects held in files are scanned as they are
    decrypted, chunk by chunk (bounded memory whatever their size)."""

    def __init__(self, reads: Reads, vault: Vault, blob_root: Path):
        self.reads, self.vault, self.blob_root = reads, vault, blob_root

    def _where(self, object_id: int) -> tuple[str, bytes | None]:
        where = self.reads.object_blob(object_id)
        if where is None:
            raise KeyError(object_id)            # purged since its row was read
        return where

    def data(self, row: dict[str, Any]) -> bytes:
        for attempt in (0, 1):                   # `mfconsole rekey` may move a blob under us
            blob, sealed = self._where(row["id"])
            try:
                if blob == INLINE:
                    return self.vault.open_sealed(sealed or b"", f"of object {row['id']}")
                return self.vault.open_bytes(self.blob_root / blob)
            except FileNotFoundError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def header(self, row: dict[str, Any], wanted: frozenset[int]) -> tuple[dict[int, bytes], bytes | None]:
        """(the raw values of ``wanted``, the whole data set when it had to be read whole)."""
        ts = row["transfer_syntax"] or ""
        blob, _ = self._where(row["id"])
        if blob == INLINE or not can_stream(ts):
            data = self.data(row)
            return scan_dataset(data, ts, allow_deflate=True, wanted=wanted).wanted, data
        for attempt in (0, 1):
            blob, _ = self._where(row["id"])
            try:
                stream = DatasetStream(ts, wanted=wanted)
                for chunk in self.vault.open_chunks(self.blob_root / blob):
                    stream.feed(chunk)
                return stream.finish().wanted, None
            except FileNotFoundError:
                if attempt:
                    raise
        raise AssertionError("unreachable")


UNREADABLE = (KeyError, VaultError, OSError, DatasetRejected, ValueError)


# -- the plan ------------------------------------------------------------------------------

def sample(row: dict[str, Any]) -> dict[str, Any]:
    """Routing-safe fields of one object: never a value from inside it."""
    return {"id": row["id"], "received_at": row["received_at"], "listener": row["listener"] or "",
            "calling_ae": row["calling_ae"] or "", "modality": row["modality"] or "",
            "sop_class": sop_name(row["sop_class_uid"]) if row["sop_class_uid"] else "",
            "sop_instance_uid": row["sop_instance_uid"]}


@dataclass
class Tally:
    """Objects that newly get something (added) or no longer do (removed), with samples."""
    before: int = 0
    after: int = 0
    added: int = 0
    removed: int = 0
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def note(self, what: str, row: dict[str, Any]) -> None:
        found = self.samples.setdefault(what, [])
        if len(found) < SAMPLES:
            found.append(sample(row))

    def count(self, row: dict[str, Any], before: bool, after: bool) -> None:
        self.before += before
        self.after += after
        if after and not before:
            self.added += 1
            self.note("added", row)
        elif before and not after:
            self.removed += 1
            self.note("removed", row)


@dataclass
class DestinationPlan(Tally):
    unchanged: int = 0
    handler_changed: int = 0                 # same destination, another handler
    handler_changes: Counter = field(default_factory=Counter)    # "none -> x": n
    # Objects going there before and after whose copy would be coerced otherwise (rules'
    # and destinations' `coerce`, mfconsole/coerce.py): coercion_changed().
    coercion_changed: int = 0
    runs: int = 0                            # handler steps evaluated (new configuration)
    not_run: int = 0                         # beyond HANDLER_RUNS
    filtered: int = 0
    errors: int = 0
    outcome_changed: int = 0                 # sent / filtered / error differs from now
    reasons: list[str] = field(default_factory=list)


def coercion_of(config: Config | None, route: Route) -> tuple[Any, ...] | None:
    """The coercion operations a delivery by ``route`` gets under ``config``, as the
    engine's Coercer applies them at send time (engine/coercion.py): the rule's that
    made the route, then the destination's; none for a destination taking HL7. None:
    not known (no configuration: what ran when each object was received)."""
    if config is None:
        return None
    dest = next((d for d in config.destinations if d.name == route.destination), None)
    if dest is None or kind_of(dest).produces != "dicom":
        return ()
    rule = next((r for r in config.rules if r.name == route.rule), None) if route.rule else None
    return tuple(getattr(rule, "coerce", ()) or ()) + tuple(getattr(dest, "coerce", ()) or ())


def coercion_changed(old: Config | None, new: Config, before: Route, after: Route) -> bool:
    """Whether the copy sent by ``after`` would be coerced otherwise than by ``before``
    (the same destination): other operations, or the same in another order. Operations
    are compared, not their effect on each object (an operation on an attribute an
    object lacks counts too). Unknown (no engine runs): no change said."""
    was = coercion_of(old, before)
    return was is not None and was != coercion_of(new, after)


class _Handlers:
    """The handler step of the new configuration (files on disk, loaded in isolation)
    and of the running one (the engine's versions), each run at most once per object
    and destination."""

    def __init__(self, new: Config, baseline: Baseline):
        self.new, self.baseline = new, baseline
        self.on_disk: dict[str, LoadedHandler | str] = {}     # name -> version, or why not
        self._transformers: dict[tuple[str, str, str], Transformer] = {}

    def disk(self, name: str) -> LoadedHandler | str:
        if name not in self.on_disk:
            try:
                self.on_disk[name] = load_handler(name, self.new.handlers_dir)
            except HandlerError as exc:
                self.on_disk[name] = str(exc)
        return self.on_disk[name]

    def run(self, handler: LoadedHandler | str, dest: Any, obj: Outbound, row: dict[str, Any]) -> str:
        """SENT, FILTERED or a routing-safe error (the handler's Context carries the
        object's origin, as at send time)."""
        if isinstance(handler, str):
            return handler
        key = (handler.name, handler.digest, dest.name)
        step = self._transformers.get(key)
        if step is None:
            step = self._transformers[key] = Transformer(Handlers.single(handler), dest)
        out, _ = step(handler.name, f"plan->{dest.name}", 0, obj, Origin.of(row))
        if isinstance(out, Outcome):
            return FILTERED if out.status == FILTERED else (out.reason or out.status or "handler error")
        return SENT


def _kind(outcome: str) -> str:
    return outcome if outcome in (SENT, FILTERED) else "error"


@dataclass
class _Run:
    """One plan being computed."""
    new: Config
    baseline: Baseline
    objects: Objects
    handler_cap: int
    destinations: dict[str, DestinationPlan] = field(default_factory=dict)
    rules: dict[str, list[int]] = field(default_factory=dict)
    discarded: Tally = field(default_factory=Tally)
    unrouted: Tally = field(default_factory=Tally)
    changed_objects: int = 0
    unreadable: Tally = field(default_factory=Tally)
    unreadable_n: int = 0

    def __post_init__(self) -> None:
        self.router = Router(self.new)
        self.wanted = self.router.header_tags | self.baseline.header_tags
        self.handlers = _Handlers(self.new, self.baseline)
        for d in self.new.destinations:
            self.destinations[d.name] = DestinationPlan()
        for r in self.new.rules:
            self.rules[r.name] = [0, 0]

    def dest(self, name: str) -> DestinationPlan:
        return self.destinations.setdefault(name, DestinationPlan())

    def one(self, row: dict[str, Any]) -> None:
        data: bytes | None = None
        values: dict[int, bytes] = {}
        try:
            if self.wanted:
                values, data = self.objects.header(row, self.wanted)
        except UNREADABLE:
            self.unreadable_n += 1
            self.unreadable.note("unreadable", row)
            return
        summary = HeaderSummary(row["sop_class_uid"] or "", row["sop_instance_uid"], row["study_uid"] or "",
                                row["series_uid"], row["modality"], 0, 0, wanted=values)
        meta = {"listener": row["listener"] or "", "calling_ae": row["calling_ae"] or "",
                "called_ae": row.get("called_ae") or "", "peer": row["peer"] or ""}
        before = self.baseline.decide(row, summary, meta)
        after = self.router.decide(summary, meta)
        self._rules(before, 0)
        self._rules(after, 1)
        self.discarded.count(row, before.discarded, after.discarded)
        self.unrouted.count(row, not before.routes and not before.discarded,
                            not after.routes and not after.discarded)
        # Where and through which handler: the rule that made a route matters for its
        # coercion only (counted per destination below).
        if {_key(r) for r in before.routes} != {_key(r) for r in after.routes} \
                or before.discarded != after.discarded:
            self.changed_objects += 1
        old = _by_destination(before.routes)
        new = _by_destination(after.routes)
        for name in dict.fromkeys([*new, *old]):
            dp = self.dest(name)
            dp.count(row, name in old, name in new)
            if name in old and name in new:
                if _names(old[name]) != _names(new[name]):
                    dp.handler_changed += 1
                    dp.handler_changes[f"{_names(old[name])} -> {_names(new[name])}"] += 1
                    dp.note("handler_changed", row)
                else:
                    dp.unchanged += 1
                if coercion_changed(self.baseline.config, self.new, old[name][0], new[name][0]):
                    dp.coercion_changed += 1
                    dp.note("coercion_changed", row)
            if name in new:
                try:
                    data = self._handler_step(dp, row, name, old.get(name), new[name], data)
                except UNREADABLE:
                    self.unreadable_n += 1
                    self.unreadable.note("unreadable", row)
                    return

    def _rules(self, decision: Decision, side: int) -> None:
        if decision.rules:
            keys: Iterable[str] = decision.rules
        elif not decision.ruled:
            keys = ("([[routes]])",) if decision.routes else ()
        else:
            keys = ("(fallback)",) if decision.routes else ()
        for key in keys:
            self.rules.setdefault(key, [0, 0])[side] += 1

    def _handler_step(self, dp: DestinationPlan, row: dict[str, Any], name: str,
                      old: list[Route] | None, new: list[Route], data: bytes | None) -> bytes | None:
        """Run the new handler of the route to ``name`` (and, when it differs, the one
        running now) on the object: counts what it filters, errors, and outcomes that
        change. Returns the object's bytes when they had to be read (read once)."""
        new_handler = new[0].handler
        old_handler = old[0].handler if old else None
        if new_handler is None and old_handler is None:
            return data
        if dp.runs >= self.handler_cap:
            dp.not_run += 1
            return data
        dest = next((d for d in self.new.destinations if d.name == name), None)
        if dest is None:
            return data
        if data is None:
            data = self.objects.data(row)
        obj = Outbound(row["sop_class_uid"] or "", row["sop_instance_uid"], row["transfer_syntax"] or "",
                       data, row["study_uid"] or "")
        dp.runs += 1
        disk = self.handlers.disk(new_handler) if new_handler else None
        after = SENT if disk is None else self.handlers.run(disk, dest, obj, row)
        if after == FILTERED:
            dp.filtered += 1
            dp.note("filtered", row)
        elif after != SENT:
            dp.errors += 1
            dp.note("errors", row)
            if after not in dp.reasons and len(dp.reasons) < SAMPLES:
                dp.reasons.append(after)
        if old is None:
            return data                   # newly routed there: nothing to compare with
        if old_handler is None:
            before = SENT
        else:
            running = self.baseline.handlers.get(old_handler)
            if running is None:
                return data               # what runs now is not known (no engine runs)
            old_dest = (self.baseline.config.destination(name)
                        if self.baseline.config is not None else dest)
            same = (isinstance(disk, LoadedHandler) and disk.digest == running.digest
                    and old_dest == dest)
            before = after if same else self.handlers.run(running, old_dest, obj, row)
        if _kind(before) != _kind(after):
            dp.outcome_changed += 1
            dp.note("outcome_changed", row)
        return data


def _by_destination(routes: Iterable[Route]) -> dict[str, list[Route]]:
    out: dict[str, list[Route]] = {}
    for route in routes:
        out.setdefault(route.destination, []).append(route)
    return out


def _key(route: Route) -> tuple[str, str | None]:
    return route.destination, route.handler


def _names(routes: list[Route]) -> str:
    return ", ".join(r.handler or "none" for r in routes)


def compute(config_path: Path, baseline: Baseline, reads: Reads, objects: Objects, *,
            hours: float = DEFAULT_HOURS, now: float | None = None, cap: int = MAX_OBJECTS,
            handler_cap: int = HANDLER_RUNS) -> dict[str, Any]:
    """The plan of the configuration at ``config_path`` over the objects received in
    the last ``hours``, beside ``baseline``: a JSON-safe dict (``render`` prints it,
    ``exit_code`` judges it). Reads only."""
    now = time.time() if now is None else now
    since = now - hours * 3600
    head: dict[str, Any] = {"config": str(config_path), "baseline": baseline.label, "hours": hours,
                            "since": since, "until": now}
    try:
        new = load(config_path)
    except ConfigError as exc:
        return {**head, "error": {"problems": [list(p) for p in exc.problems]}, "changed": None}
    run = _Run(new, baseline, objects, handler_cap)
    total = reads.plan_count(since)
    seen = 0
    after: tuple[float, int] | None = None
    while seen < cap:
        rows = reads.plan_page(since, after, min(PAGE, cap - seen))
        if not rows:
            break
        baseline.prepare(rows)
        for row in rows:
            run.one(row)
        seen += len(rows)
        after = (rows[-1]["received_at"], rows[-1]["id"])
    return {**head, "error": None, **_result(run, seen, total, cap)}


def _result(run: _Run, seen: int, total: int, cap: int) -> dict[str, Any]:
    order = [d.name for d in run.new.destinations]
    destinations = []
    for name in order + sorted(set(run.destinations) - set(order)):
        dp = run.destinations[name]
        destinations.append({
            "name": name, "before": dp.before, "after": dp.after, "added": dp.added,
            "removed": dp.removed, "unchanged": dp.unchanged, "handler_changed": dp.handler_changed,
            "handler_changes": dict(dp.handler_changes), "coercion_changed": dp.coercion_changed,
            "handler_runs": dp.runs, "handler_not_run": dp.not_run, "filtered": dp.filtered,
            "errors": dp.errors, "outcome_changed": dp.outcome_changed, "error_reasons": dp.reasons,
            "removed_from_config": name not in order, "samples": dp.samples})
    old_rules = [r.name for r in run.baseline.config.rules] if run.baseline.config is not None else []
    rules = []
    for name, (before, after) in run.rules.items():
        rules.append({"name": name, "before": before, "after": after,
                      "new": name not in old_rules and not name.startswith("(")
                      and run.baseline.config is not None,
                      "gone": name not in {r.name for r in run.new.rules} and not name.startswith("(")})
    handlers = []
    running = run.baseline.handlers
    named = {r.handler for r in (*run.new.routes, *run.new.rules) if r.handler}
    known = run.baseline.config is not None          # what runs now is known
    for name in sorted(named | set(running)):
        disk = run.handlers.disk(name) if name in named else None
        was = running.get(name)
        handlers.append({"name": name, "running": was.label if was else "",
                         "on_disk": disk.label if isinstance(disk, LoadedHandler) else "",
                         "error": disk if isinstance(disk, str) else "",
                         "changed": known and (was is None or not isinstance(disk, LoadedHandler)
                                               or disk.digest != was.digest)})
    out = {"objects": seen, "total": total, "capped": total > seen and seen >= cap, "cap": cap,
           "handler_cap": run.handler_cap, "changed_objects": run.changed_objects,
           "unreadable": run.unreadable_n, "unreadable_samples": run.unreadable.samples.get("unreadable", []),
           "destinations": destinations, "rules": rules,
           "discarded": _tally(run.discarded), "unrouted": _tally(run.unrouted), "handlers": handlers}
    out["changed"] = changed(out)
    return out


def _tally(t: Tally) -> dict[str, Any]:
    return {"before": t.before, "after": t.after, "added": t.added, "removed": t.removed,
            "samples": t.samples}


def changed(plan: dict[str, Any]) -> bool:
    """Whether a reload of this configuration would change what the objects get."""
    if any(d["added"] or d["removed"] or d["handler_changed"] or d["coercion_changed"]
           or d["outcome_changed"] for d in plan["destinations"]):
        return True
    if any(plan[k]["added"] or plan[k]["removed"] for k in ("discarded", "unrouted")):
        return True
    if any(r["before"] != r["after"] or r["new"] or r["gone"] for r in plan["rules"]):
        return True
    return any(h["changed"] for h in plan["handlers"])


def exit_code(plan: dict[str, Any]) -> int:
    if plan.get("error"):
        return EXIT_TROUBLE
    return EXIT_CHANGED if plan["changed"] else EXIT_SAME


def audit_detail(plan: dict[str, Any], actor: str) -> tuple[str, str]:
    """(status, detail) of the `routing_plan` audit row: counts, never a value."""
    name = Path(plan["config"]).name
    if plan.get("error"):
        return "invalid", (f"by {actor}: plan of {name}: it does not load "
                           f"({len(plan['error']['problems'])} problem(s))")
    moved = sum(d["added"] + d["removed"] for d in plan["destinations"])
    return ("changes" if plan["changed"] else "no change"), (
        f"by {actor}: plan of {name} over the last {plan['hours']:g} h: {plan['objects']} object(s), "
        f"{plan['changed_objects']} routed differently, {moved} destination change(s); nothing sent")


def check_hours(hours: Any) -> float:
    """Hours as a request or the command line gives them; ValueError says why not."""
    try:
        value = float(hours)
    except (TypeError, ValueError):
        raise ValueError(f"hours must be a number, not {hours!r}") from None
    if not 0 < value <= MAX_HOURS:
        raise ValueError(f"hours must be more than 0 and at most {MAX_HOURS:g} (a year)")
    return value


# -- words ---------------------------------------------------------------------------------

def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _sample_line(s: dict[str, Any]) -> str:
    return (f"#{s['id']} {_when(s['received_at'])} {s['listener']} {s['calling_ae'] or '-'} "
            f"{s['modality'] or '-'} · {s['sop_class']} · {s['sop_instance_uid']}")


def _plus_minus(added: int, removed: int) -> str:
    return f"{f'+{added} / -{removed}':<15}"


SAMPLE_WORDS = {"added": "would newly go", "removed": "would no longer go",
                "handler_changed": "another handler", "coercion_changed": "other coercions",
                "filtered": "filtered by the handler", "errors": "handler error",
                "outcome_changed": "handler outcome changes"}


def render(plan: dict[str, Any]) -> list[str]:
    """The plan as lines of text (the CLI prints them, the console shows them)."""
    lines = [f"routing plan: {plan['config']} (on disk) against {plan['baseline']}"]
    if plan.get("error"):
        problems = plan["error"]["problems"]
        lines.append(f"the configuration does not load ({len(problems)} problem(s)): a reload would be "
                     "refused and the running configuration stays")
        lines += [f"  {key}: {why}" for key, why in problems]
        return lines
    more = (f" (only the newest {plan['objects']} of {plan['total']}: at most {plan['cap']} are replayed)"
            if plan["capped"] else "")
    lines.append(f"objects received in the last {plan['hours']:g} h: {plan['objects']}{more}; "
                 f"{plan['changed_objects']} would be routed differently. Nothing was sent.")
    if plan["unreadable"]:
        lines.append(f"  {plan['unreadable']} object(s) could not be read and were left out "
                     "(see the samples)")
    lines.append("destinations (objects that would newly go / no longer go):")
    width = max([len(d["name"]) for d in plan["destinations"]] + [12])
    for d in plan["destinations"]:
        extra = [f"unchanged {d['unchanged']}", f"{d['before']} -> {d['after']}"]
        if d["handler_changed"]:
            extra.append(f"handler changes {d['handler_changed']} ("
                         + ", ".join(f"{k} {n}" for k, n in d["handler_changes"].items()) + ")")
        if d["coercion_changed"]:
            extra.append(f"coercion changes {d['coercion_changed']}")
        if d["removed_from_config"]:
            extra.append("not in the new configuration")
        lines.append(f"  {d['name']:<{width}} {_plus_minus(d['added'], d['removed'])} ({'; '.join(extra)})")
    for key, word in (("discarded", "discarded"), ("unrouted", "unrouted")):
        t = plan[key]
        lines.append(f"  {'(' + word + ')':<{width}} {_plus_minus(t['added'], t['removed'])} "
                     f"({t['before']} -> {t['after']})")
    if plan["rules"]:
        lines.append("rules (objects each decides, now -> on disk):")
        rwidth = max([len(r["name"]) for r in plan["rules"]] + [12])
        for r in plan["rules"]:
            note = "  (new rule)" if r["new"] else "  (removed)" if r["gone"] else ""
            lines.append(f"  {r['name']:<{rwidth}} {r['before']:>7} -> {r['after']:<7}{note}".rstrip())
    steps = [d for d in plan["destinations"] if d["handler_runs"] or d["handler_not_run"]]
    if steps or plan["handlers"]:
        lines.append("handlers (the files on disk, run on what they would get; nothing sent):")
    for h in plan["handlers"]:
        if h["error"]:
            lines.append(f"  {h['name']}: {h['error']}")
        elif h["running"] and h["running"] != h["on_disk"]:
            lines.append(f"  {h['name']}: running {h['running']} -> on disk {h['on_disk'] or '(no route)'}")
        elif h["on_disk"]:
            lines.append(f"  {h['on_disk']}: " + ("running, unchanged" if h["running"] else "on disk"))
    for d in steps:
        runs = f"run on {d['handler_runs']}"
        if d["handler_not_run"]:
            runs += f" of {d['handler_runs'] + d['handler_not_run']} (at most {plan['handler_cap']})"
        lines.append(f"  {d['name']}: {runs}: filtered {d['filtered']}, errors {d['errors']}, "
                     f"outcome changes {d['outcome_changed']}")
        lines += [f"    {reason}" for reason in d["error_reasons"]]
    samples = []
    for d in plan["destinations"]:
        for what, found in d["samples"].items():
            samples += [f"  {d['name']} {SAMPLE_WORDS.get(what, what)}: {_sample_line(s)}" for s in found]
    for key in ("discarded", "unrouted"):
        for what, found in plan[key]["samples"].items():
            word = f"newly {key}" if what == "added" else f"no longer {key}"
            samples += [f"  {word}: {_sample_line(s)}" for s in found]
    samples += [f"  unreadable: {_sample_line(s)}" for s in plan["unreadable_samples"]]
    if samples:
        lines.append(f"samples (at most {SAMPLES} per line above; routing-safe fields):")
        lines += samples
    moved = plan["changed_objects"] or any(
        d["handler_changed"] or d["coercion_changed"] or d["outcome_changed"] for d in plan["destinations"])
    lines.append("a reload would change what these objects get" if moved
                 else "a reload would change rules or handlers, not what these objects get"
                 if plan["changed"] else "a reload would change nothing for these objects")
    return lines


__all__ = ["Baseline", "RunningBaseline", "ReceivedBaseline", "Objects", "compute", "render",
           "exit_code", "changed", "audit_detail", "check_hours", "coercion_changed",
           "DEFAULT_HOURS", "MAX_OBJECTS", "HANDLER_RUNS", "EXIT_SAME", "EXIT_CHANGED",
           "EXIT_TROUBLE"]
