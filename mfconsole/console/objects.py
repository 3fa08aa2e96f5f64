"""8 Objects: every stored object, newest first, with each destination's state; paged
by offset (10 000 scroll as smoothly as 10), filtered with ``/`` (``ae:CT1 mod:CT
since:2h state:dead``…), sorted with ``s``/``S``; ``enter`` opens an object's timeline,
``x`` exports the view. Only the answer to the latest query is ever shown: a slow
answer to an older filter must never put rows on screen that the filter excludes."""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Input, Label, Static

from mfconsole.client import ClientError
from mfconsole import when
from mfconsole.console import format as fmt
from mfconsole.console.dialogs import PromptScreen, TextScreen
from mfconsole.console.widgets import ConsoleScreen, FilterBar, KeyedTable
from mfconsole.dicomvalues import sop_name
from mfconsole.client import OBJECT_SORTS

PAGE = 200
PREFETCH = 40           # rows before the end of what is loaded that fetch the next page
EXPORT_PAGE = 1000      # the engine's largest page
EXPORT_CAP = 100_000

# The filter line's words → the engine's filter names.
KEYS = {"ae": "calling_ae", "mod": "modality", "since": "since", "until": "until", "state": "state",
        "dest": "destination", "study": "study_uid", "sop": "sop_instance_uid",
        "class": "sop_class_uid", "listener": "listener", "assoc": "association"}
SEARCH = {"acc": "accession", "pid": "patient_id"}
DELIVERY_STATES = ("held", "pending", "in_flight", "delivered", "filtered", "dead", "replayed", "discarded")

# Never colour alone: a symbol, and a word for every state but the good one.
MARKS = {"delivered": ("✓", ""), "held": ("⏸held", ""), "pending": ("…pending", ""), "in_flight": ("↗sending", ""),
         "filtered": ("∅filtered", ""), "dead": ("✉dead", "bold"), "replayed": ("↻replayed", ""),
         "discarded": ("✗discarded", "")}
WORDS = {"delivered": "✓ delivered", "held": "⏸ held for its study", "pending": "… pending", "in_flight": "↗ sending",
         "filtered": "∅ filtered", "dead": "✉ DEAD", "replayed": "↻ replayed", "discarded": "✗ discarded"}

# What leaves the console in an export: the rows' routing fields, by name (never
# "whatever the engine sent": a field added later is not exported until listed here).
EXPORT_FIELDS = ("id", "received_at", "listener", "calling_ae", "peer", "association", "modality",
                 "sop_class_uid", "sop_instance_uid", "study_uid", "series_uid", "transfer_syntax",
                 "size", "version", "superseded", "purged_at", "deliveries")


class FilterError(ValueError):
    """The filter line does not parse; the message says what it accepts."""


def parse_filter(text: str, now: float | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """``ae:CT1 mod:CT since:2h`` → (engine filters, identifier search). Relative times
    become absolute here, once: every page of one query must ask the same question."""
    filters: dict[str, Any] = {}
    search: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition(":")
        key = key.lower()
        if not sep or not value or (key not in KEYS and key not in SEARCH):
            raise FilterError(f"“{word}” is not a filter: write key:value with key one of "
                              f"{', '.join(list(KEYS) + list(SEARCH))} (e.g. ae:CT1 mod:CT since:2h)")
        if key in SEARCH:
            search[SEARCH[key]] = value
            continue
        if key == "state" and value not in DELIVERY_STATES:
            raise FilterError(f"state is one of {', '.join(DELIVERY_STATES)}, not “{value}”")
        if key in ("since", "until"):
            absolute = when.ago(value, now)
            if absolute is not None:
                value = absolute
        filters[KEYS[key]] = value
    return filters, search


@dataclass(frozen=True)
class Query:
    """One question to the engine: every page of it asks exactly this."""
    text: str = ""                                   # as typed, for the count line
    filters: tuple[tuple[str, Any], ...] = ()
    accession: str | None = None
    patient_id: str | None = None
    sort: str = "id"
    descending: bool = True

    def fetch(self, client: Any, offset: int, limit: int) -> dict[str, Any]:
        filters = dict(self.filters) or None
        if self.accession or self.patient_id:      # audited engine-side, operator only
            return client.find_objects(self.accession, self.patient_id, filters, self.sort,
                                       self.descending, offset, limit)
        return client.objects(filters, self.sort, self.descending, offset, limit)


class TimelineScreen(TextScreen):
    """One object's timeline; ``p`` previews the handler of its deliveries on it (what
    the handler changes; the values only on request, audited)."""

    BINDINGS = [Binding("p", "preview", "Preview handler", id="timeline.preview")]

    def __init__(self, object_id: int, result: dict[str, Any]):
        super().__init__(f"Object {object_id} — timeline", timeline(result))
        self.object_id = object_id
        self.handlers = sorted({d["handler"] for d in result.get("deliveries") or [] if d.get("handler")})

    def action_preview(self) -> None:
        from mfconsole.console.handlers import preview

        if self.app.read_only:
            self.notify("a read-only console cannot preview handlers", severity="warning")
        elif not self.handlers:
            self.notify("no handler on this object's routes", severity="warning")
        else:
            preview(self.app, self.handlers[0], object_id=self.object_id)


class ObjectsScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 8, "Objects"
    AUTO_FOCUS = "#objects"
    # The filter line sits under the count, not docked: docked, the footer covers it.
    DEFAULT_CSS = """
    ObjectsScreen FilterBar { dock: none; }
    ObjectsScreen #objects { height: 1fr; }
    ObjectsScreen #objects-count { height: 1; padding: 0 1; }
    ObjectsScreen #objects-uids { height: 2; padding: 0 1; }
    """
    BINDINGS = [Binding("enter", "open", "Timeline", priority=True, id="objects.open"),
                Binding("slash", "filter", "Filter", id="objects.filter"),
                Binding("s", "sort", "Sort", id="objects.sort"),
                Binding("S,shift+s", "reverse", "Reverse", id="objects.reverse"),
                Binding("x", "export", "Export", id="objects.export"),
                Binding("r", "reload", "Reload", show=False, id="objects.reload")]

    def __init__(self) -> None:
        super().__init__()
        self.current: Query | None = None        # the latest query (None: not asked yet)
        self.seq = 0                             # its number: answers to older ones are dropped
        self.rows: list[dict[str, Any]] = []     # loaded so far, in the query's order
        self.ids: set[int] = set()
        self.next_offset = 0                     # where the next page starts, engine-side
        self.total: int | None = None
        self.exhausted = False
        self.fetching = False                    # (not `loading`: a Widget reactive)
        self.stored: int | None = None           # the snapshot's object count at the last load
        self.stored_now: int | None = None

    def body(self) -> ComposeResult:
        # The destinations' states early: at 80 columns they are what must not scroll away.
        yield KeyedTable([("id", "id"), ("received", "received"), ("calling", "calling AE"),
                          ("modality", "mod"), ("deliveries", "destinations"), ("class", "SOP class"),
                          ("size", "size"), ("listener", "listener"), ("study", "study UID")],
                         id="objects")
        yield Label("", id="objects-count")
        yield Static("", id="objects-uids")
        yield FilterBar("ae:CT1 mod:CT since:2h until:1d state:dead dest:pacs acc:… — enter applies")

    @property
    def table(self) -> KeyedTable:
        return self.query_one("#objects", KeyedTable)

    @property
    def cursor_row(self) -> dict[str, Any] | None:
        key = self.table.cursor_key
        return next((r for r in self.rows if str(r["id"]) == key), None) if key else None

    # -- loading -----------------------------------------------------------------------------

    def show_snapshot(self, snap: dict[str, Any]) -> None:
        self.stored_now = snap.get("objects")
        if self.current is None:
            self._start(Query())
        else:
            self._show_count()

    def _start(self, query: Query) -> None:
        """A new question: what the table showed answered the old one, so it goes now."""
        self.seq += 1
        self.current = query
        self.rows, self.ids, self.next_offset, self.total, self.exhausted = [], set(), 0, None, False
        self.stored = self.stored_now
        self.table.reset()
        self._show_count()
        self._show_uids()
        self._fetch()

    def _fetch(self) -> None:
        assert self.current is not None
        self.fetching = True
        seq, offset = self.seq, self.next_offset
        self.app.perform("objects", self.current.fetch, self.client, offset, PAGE,
                         done=lambda result: self._arrived(seq, result),
                         failed=lambda why: self._failed(seq, why), refresh=False)

    def _arrived(self, seq: int, result: dict[str, Any]) -> None:
        if seq != self.seq:
            return                  # the answer to an older query: never shown
        self.fetching = False
        page = result["rows"]
        self.total = result["total"]
        self.next_offset += len(page)
        # Objects stored while paging shift later rows down: seen ones come again, none is skipped.
        new = [r for r in page if r["id"] not in self.ids]
        self.ids.update(r["id"] for r in new)
        self.rows += new
        self.exhausted = len(page) < PAGE or self.next_offset >= self.total
        self.table.append([(str(r["id"]), object_row(r)) for r in new])
        self._show_count()
        self._show_uids()
        self._prefetch()

    def _failed(self, seq: int, why: str) -> None:
        if seq == self.seq:
            self.fetching = False
            self.exhausted = True           # until the next query or r: no retry loop
            self._show_count()
            self.notify(f"objects: {why}", severity="error", timeout=10)

    def _prefetch(self) -> None:
        """The next page when the cursor nears the end of what is loaded (also after a
        page arrives: the operator may have moved on while it was on its way)."""
        if (not self.fetching and not self.exhausted and self.rows
                and self.table.cursor_row >= self.table.row_count - PREFETCH):
            self._fetch()

    def _show_count(self) -> None:
        q = self.current or Query()
        total = "…" if self.total is None else fmt.count(self.total)
        line = f"{fmt.count(len(self.rows))} shown of {total}"
        if self.fetching and not self.rows:
            line = "loading…"
        line += f" · sort {q.sort} {'↓ descending' if q.descending else '↑ ascending'} (s, S)"
        if q.text:
            line += f" · filter: {q.text}"
        if self.stored is not None and self.stored_now is not None and self.stored_now > self.stored:
            line += f" · {fmt.count(self.stored_now - self.stored)} stored since — r reloads"
        self.query_one("#objects-count", Label).update(line)

    def _show_uids(self) -> None:
        """The cursor's UIDs in full at any width (the table may scroll them away)."""
        row = self.cursor_row
        text = "" if row is None else (f"study UID    {row.get('study_uid') or ''}\n"
                                       f"instance UID {row.get('sop_instance_uid') or ''}")
        self.query_one("#objects-uids", Static).update(text)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "objects":
            self._prefetch()
            self._show_uids()

    def action_reload(self) -> None:
        self._start(self.current or Query())

    # -- filter and sort -----------------------------------------------------------------------

    def action_filter(self) -> None:
        self.query_one(FilterBar).open()

    def apply_filter(self, text: str) -> None:
        text = " ".join(text.split())
        try:
            filters, search = parse_filter(text)
        except FilterError as exc:
            self.notify(str(exc), severity="error", timeout=12)
            return
        if search:
            # An accession number or patient ID is patient data: it does not stay on screen
            # (the count line says acc:•••, the filter line closes).
            self.query_one(FilterBar).display = False
            text = " ".join(f"{w.partition(':')[0]}:•••" if w.partition(":")[0].lower() in SEARCH else w
                            for w in text.split())
            if self.app.read_only:       # the engine would refuse it anyway
                self.notify("a read-only console cannot search by accession number or patient ID",
                            severity="warning")
                return
            self.notify("searching by " + " and ".join("accession number" if k == "accession"
                                                       else "patient ID" for k in search)
                        + ": the search is recorded in the audit log (who searched, never the value)")
        self._start(replace(self.current or Query(), text=text, filters=tuple(filters.items()),
                            accession=search.get("accession"), patient_id=search.get("patient_id")))

    def on_input_changed(self, event: Input.Changed) -> None:
        # Words apply on enter (an identifier search is audited: not one per keystroke);
        # clearing the line (esc) shows everything again at once.
        if not event.value.strip() and self.current is not None and self.current.text:
            self.apply_filter("")

    def action_sort(self) -> None:
        q = self.current or Query()
        column = OBJECT_SORTS[(OBJECT_SORTS.index(q.sort) + 1) % len(OBJECT_SORTS)]
        self._start(replace(q, sort=column))

    def action_reverse(self) -> None:
        q = self.current or Query()
        self._start(replace(q, descending=not q.descending))

    # -- timeline ---------------------------------------------------------------------------------

    def action_open(self) -> None:
        """enter: in the filter line, apply it; on an object, its timeline."""
        if isinstance(self.focused, FilterBar):
            self.apply_filter(self.focused.value)
            self.table.focus()
            return
        row = self.cursor_row
        if row is None:
            return
        object_id = row["id"]
        self.app.perform(f"object {object_id}", self.client.object, object_id, refresh=False,
                         done=lambda result: self.app.push_screen(TimelineScreen(object_id, result)))

    # -- export -----------------------------------------------------------------------------------

    def action_export(self) -> None:
        query = self.current
        if query is None or self.total is None:
            self.notify("wait for the list to load", severity="warning")
            return
        default = time.strftime("~/mfconsole-objects-%Y%m%d-%H%M%S.csv")

        def chosen(path: str | None) -> None:
            path = (path or "").strip()
            if not path:
                return
            self.notify(f"exporting up to {fmt.count(min(self.total or 0, EXPORT_CAP))} object(s)…")
            self.app.perform("export", export_objects, query, self.client, path, refresh=False,
                             done=lambda r: self.notify(
                                 f"{fmt.count(r['rows'])} object(s) written to {r['path']}"
                                 + (f" (capped at {fmt.count(EXPORT_CAP)})" if r["capped"] else ""),
                                 timeout=10))
        self.app.push_screen(PromptScreen(
            f"Export the {fmt.count(self.total)} object(s) of this view (routing fields, no patient "
            "data) to:", default, "a .json name writes JSON, otherwise CSV · enter writes, esc cancels"),
            chosen)


def export_objects(query: Query, client: Any, path: str, cap: int = EXPORT_CAP) -> dict[str, Any]:
    """Every row of ``query`` (paged through the client, at most ``cap``) to a new file,
    mode 0600 from its creation: CSV, or JSON for a ``.json`` name. Runs in a worker."""
    target = Path(path).expanduser()
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ClientError(f"{target} exists: choose another name") from None
    except OSError as exc:
        raise ClientError(f"cannot create {target}: {exc.strerror}") from None
    as_json = target.suffix.lower() == ".json"
    written, offset, seen, capped = 0, 0, set(), False
    try:
        os.fchmod(fd, 0o600)             # whatever the umask
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as out:
            writer = None if as_json else csv.DictWriter(out, EXPORT_FIELDS)
            if writer is None:
                out.write("[\n")
            else:
                writer.writeheader()
            while True:
                page = query.fetch(client, offset, EXPORT_PAGE)["rows"]
                offset += len(page)
                for row in page:
                    if row["id"] in seen:
                        continue        # shifted by an object stored meanwhile
                    if written >= cap:
                        capped = True
                        break
                    seen.add(row["id"])
                    safe = {k: row.get(k) for k in EXPORT_FIELDS}
                    if writer is None:
                        out.write((",\n" if written else "") + json.dumps(safe))
                    else:
                        writer.writerow({**safe, "received_at": _iso(safe["received_at"]),
                                         "purged_at": _iso(safe["purged_at"])})
                    written += 1
                if capped or len(page) < EXPORT_PAGE:
                    break
            if writer is None:
                out.write("\n]\n")
    except BaseException:
        target.unlink(missing_ok=True)   # no half export left behind
        raise
    return {"rows": written, "capped": capped, "path": str(target)}


def _iso(ts: float | None) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# -- rendering ---------------------------------------------------------------------------------

def short_class(uid: str | None) -> str:
    """'CT Image', 'Basic Text SR' (the registry name without "Storage"); unknown: the UID."""
    if not uid:
        return ""
    name = sop_name(uid)
    return uid if name.startswith("SOP class ") else name.removesuffix(" Storage")


def deliveries(text: str | None) -> Text:
    """"pacs=delivered web=dead" → ``pacs ✓  web ✉dead``."""
    if not text:
        return Text("— not routed", style="italic")
    out = Text()
    for i, pair in enumerate(text.split()):
        name, _, state = pair.rpartition("=")
        mark, style = MARKS.get(state, (state, ""))
        out.append(("  " if i else "") + f"{name} ")
        out.append(mark, style=style)
    return out


def object_row(r: dict[str, Any]) -> tuple[Any, ...]:
    when = time.strftime("%m-%d %H:%M:%S", time.localtime(r["received_at"])) if r.get("received_at") else ""
    return (str(r["id"]), when, r.get("calling_ae") or "", r.get("modality") or "",
            deliveries(r.get("deliveries")), short_class(r.get("sop_class_uid")), fmt.size(r.get("size")),
            r.get("listener") or "", r.get("study_uid") or "")


OBJECT_FIELDS = (("sop_instance_uid", "SOP instance UID"), ("sop_class_uid", "SOP class UID"),
                 ("study_uid", "study UID"), ("series_uid", "series UID"), ("modality", "modality"),
                 ("transfer_syntax", "transfer syntax"), ("version", "version"), ("listener", "listener"),
                 ("calling_ae", "calling AE"), ("called_ae", "called AE"), ("peer", "peer"),
                 ("association", "association"))


def timeline(result: dict[str, Any]) -> Group:
    """An object in full (UIDs untruncated), each delivery, then every event in time order."""
    obj = result["object"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("id", str(obj["id"]))
    grid.add_row("received", fmt.stamp(obj.get("received_at")))
    grid.add_row("SOP class", short_class(obj.get("sop_class_uid")))
    for key, label in OBJECT_FIELDS:
        if obj.get(key) not in (None, ""):
            grid.add_row(label, str(obj[key]))
    grid.add_row("size", f"{obj.get('size') or 0} bytes ({fmt.size(obj.get('size'))})")
    if obj.get("superseded"):
        grid.add_row("superseded", "yes: a later version of this SOP instance was stored")
    grid.add_row("bytes", f"purged {fmt.stamp(obj['purged_at'])}" if obj.get("purged_at") else "held")
    parts: list[Any] = [grid, Text("\ndeliveries", style="bold")]
    if not result.get("deliveries"):
        parts.append(Text("  none: no route sent this object anywhere", style="italic"))
    for d in result.get("deliveries") or []:
        line = Text(f"  {d['destination']}  ")
        line.append(WORDS.get(d["state"], d["state"]), style="bold" if d["state"] == "dead" else "")
        line.append(f"  attempts {d.get('attempts') or 0}  delivery {d['id']}")
        if d.get("last_status") or d.get("last_reason"):
            line.append(f"\n    last: {' '.join(str(x) for x in (d.get('last_status'), d.get('last_class')) if x)}"
                        + (f" — {d['last_reason']}" if d.get("last_reason") else ""))
        if d.get("handler"):
            line.append(f"\n    handler {d['handler']} {d.get('handler_version') or ''}".rstrip())
        if d.get("rule"):
            line.append(f"\n    rule {d['rule']}")
        if d.get("coerced") is not None:     # attributes and operations, never values
            line.append(f"\n    coerced: {d['coerced'] or 'nothing changed'}")
        parts.append(line)
    parts.append(Text("\nevents", style="bold"))
    events = sorted(result.get("events") or [], key=lambda e: (e.get("ts") or 0, e.get("id") or 0))
    text = Text()
    for e in events:
        text.append(f"{fmt.stamp(e.get('ts'))} ")
        text.append(e.get("event") or "", style="bold")
        where = e.get("destination") or e.get("listener")
        for part in (where, e.get("status")):
            if part:
                text.append(f"  {part}")
        if e.get("actor"):
            text.append(f"  by {e['actor']}")
        if e.get("detail"):
            text.append(f"\n  {e['detail']}")
        text.append("\n")
    parts.append(text if events else Text("  none recorded", style="italic"))
    return Group(*parts)
