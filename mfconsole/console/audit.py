"""9 Audit: the audit trail, newest first, paged by id (``before_id``), filtered with
``/`` (``event:stored dest:pacs actor:alice since:2h`` and free text); ``enter`` shows
a row in full. As on the Objects screen, only the answer to the latest query is shown."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Input, Label

from mfconsole import when
from mfconsole.console import format as fmt
from mfconsole.console.dialogs import TextScreen
from mfconsole.console.widgets import ConsoleScreen, FilterBar, KeyedTable

PAGE = 200
PREFETCH = 40
KEYS = {"event": "event", "dest": "destination", "listener": "listener", "actor": "actor",
        "since": "since", "until": "until", "object": "object_id"}


class FilterError(ValueError):
    """The filter line does not parse; the message says what it accepts."""


def parse_filter(text: str, now: float | None = None) -> dict[str, Any]:
    """``event:stored dest:pacs conflict`` → the engine's audit filters; words that are
    not ``key:value`` of a known key are searched as text (a detail may hold colons).
    Relative times become absolute once: every page asks the same question."""
    filters: dict[str, Any] = {}
    words: list[str] = []
    for word in text.split():
        key, sep, value = word.partition(":")
        key = key.lower()
        if not sep or key not in KEYS or not value:
            words.append(word)
            continue
        if key == "object":
            if not value.isdigit():
                raise FilterError(f"object:ID takes an object id (a number), not “{value}”")
            filters["object_id"] = int(value)
            continue
        if key in ("since", "until"):
            absolute = when.ago(value, now)
            if absolute is not None:
                filters[key] = absolute
                continue
        filters[KEYS[key]] = value
    if words:
        filters["text"] = " ".join(words)
    return filters


@dataclass(frozen=True)
class AuditQuery:
    text: str = ""
    filters: tuple[tuple[str, Any], ...] = ()

    def fetch(self, client: Any, before_id: int | None, limit: int) -> list[dict[str, Any]]:
        return client.audit(dict(self.filters) or None, before_id, limit)


class AuditScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 9, "Audit"
    AUTO_FOCUS = "#audit"
    # The filter line sits under the count, not docked: docked, the footer covers it.
    DEFAULT_CSS = """
    AuditScreen FilterBar { dock: none; }
    AuditScreen #audit { height: 1fr; }
    AuditScreen #audit-count { height: 1; padding: 0 1; }
    """
    BINDINGS = [Binding("enter", "open", "Open", priority=True, id="audit.open"),
                Binding("slash", "filter", "Filter", id="audit.filter"),
                Binding("r", "reload", "Reload", id="audit.reload")]

    def __init__(self) -> None:
        super().__init__()
        self.current: AuditQuery | None = None    # the latest query (None: not asked yet)
        self.seq = 0                               # its number: older answers are dropped
        self.rows: list[dict[str, Any]] = []
        self.exhausted = False
        self.fetching = False                      # (not `loading`: a Widget reactive)
        self.events: list[str] = []                # the event names the trail holds

    def body(self) -> ComposeResult:
        yield KeyedTable([("time", "time"), ("event", "event"), ("where", "where"),
                          ("status", "status"), ("actor", "actor"), ("detail", "detail")], id="audit")
        yield Label("", id="audit-count")
        yield FilterBar("event:NAME dest:NAME listener:NAME actor:TEXT since:2h object:ID text… — enter applies")

    @property
    def table(self) -> KeyedTable:
        return self.query_one("#audit", KeyedTable)

    @property
    def cursor_row(self) -> dict[str, Any] | None:
        key = self.table.cursor_key
        return next((r for r in self.rows if str(r["id"]) == key), None) if key else None

    # -- loading -----------------------------------------------------------------------------

    def show_snapshot(self, snap: dict[str, Any]) -> None:
        if self.current is None:
            self.app.perform("audit events", self.client.audit_events, refresh=False,
                             done=self._got_events, failed=lambda why: None)
            self._start(AuditQuery())

    def _got_events(self, events: list[str]) -> None:
        self.events = list(events)

    def _start(self, query: AuditQuery) -> None:
        self.seq += 1
        self.current = query
        self.rows, self.exhausted = [], False
        self.table.reset()
        self._fetch(None)

    def _fetch(self, before_id: int | None) -> None:
        assert self.current is not None
        self.fetching = True
        self._show_count()
        seq = self.seq
        self.app.perform("audit", self.current.fetch, self.client, before_id, PAGE, refresh=False,
                         done=lambda rows: self._arrived(seq, rows),
                         failed=lambda why: self._failed(seq, why))

    def _arrived(self, seq: int, page: list[dict[str, Any]]) -> None:
        if seq != self.seq:
            return                  # the answer to an older query: never shown
        self.fetching = False
        last = self.rows[-1]["id"] if self.rows else None
        new = [r for r in page if last is None or r["id"] < last]
        self.rows += new
        self.exhausted = len(page) < PAGE
        self.table.append([(str(r["id"]), audit_row(r)) for r in new])
        self._show_count()
        self._prefetch()

    def _failed(self, seq: int, why: str) -> None:
        if seq == self.seq:
            self.fetching, self.exhausted = False, True
            self._show_count()
            self.notify(f"audit: {why}", severity="error", timeout=10)

    def _prefetch(self) -> None:
        if (not self.fetching and not self.exhausted and self.rows
                and self.table.cursor_row >= self.table.row_count - PREFETCH):
            self._fetch(self.rows[-1]["id"])

    def _show_count(self) -> None:
        q = self.current or AuditQuery()
        if self.fetching and not self.rows:
            line = "loading…"
        else:
            more = "all loaded" if self.exhausted else "more as you scroll"
            line = f"{fmt.count(len(self.rows))} shown · {'loading more…' if self.fetching else more}"
        line += " · newest first"
        if q.text:
            line += f" · filter: {q.text}"
        self.query_one("#audit-count", Label).update(line)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "audit":
            self._prefetch()

    def action_reload(self) -> None:
        self._start(self.current or AuditQuery())

    # -- filter and detail ---------------------------------------------------------------------

    def action_filter(self) -> None:
        self.query_one(FilterBar).open()

    def apply_filter(self, text: str) -> None:
        text = " ".join(text.split())
        try:
            filters = parse_filter(text)
        except FilterError as exc:
            self.notify(str(exc), severity="error", timeout=12)
            return
        event = filters.get("event")
        if event and self.events and event not in self.events:
            self.notify(f"no audit row has event {event}; the trail holds: {', '.join(self.events)}",
                        severity="warning", timeout=12)
        self._start(AuditQuery(text, tuple(filters.items())))

    def on_input_changed(self, event: Input.Changed) -> None:
        # Words apply on enter; clearing the line (esc) shows the whole trail at once.
        if not event.value.strip() and self.current is not None and self.current.text:
            self.apply_filter("")

    def action_open(self) -> None:
        """enter: in the filter line, apply it; on a row, the row in full."""
        if isinstance(self.focused, FilterBar):
            self.apply_filter(self.focused.value)
            self.table.focus()
            return
        row = self.cursor_row
        if row is not None:
            self.app.push_screen(TextScreen(f"Audit row {row['id']}", audit_detail(row)))


def audit_row(r: dict[str, Any]) -> tuple[Any, ...]:
    # Narrow cells so the detail shows at 80 columns: the actor by name here, in full
    # (uid, sudo, socket) on enter.
    where = r.get("destination") or (f"listener {r['listener']}" if r.get("listener") else "")
    when = time.strftime("%m-%d %H:%M:%S", time.localtime(r["ts"])) if r.get("ts") else ""
    actor = (r.get("actor") or "").split(" (")[0]
    return (when, Text(r.get("event") or "", style="bold"), where, r.get("status") or "", actor,
            r.get("detail") or "")


FIELDS = (("event", "event"), ("destination", "destination"), ("listener", "listener"),
          ("object_id", "object id"), ("delivery_id", "delivery id"),
          ("sop_instance_uid", "SOP instance UID"), ("calling_ae", "calling AE"), ("peer", "peer"),
          ("status", "status"), ("actor", "actor"), ("detail", "detail"))


def audit_detail(row: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("id", str(row["id"]))
    grid.add_row("time", fmt.stamp(row.get("ts")))
    for key, label in FIELDS:
        if row.get(key) not in (None, ""):
            grid.add_row(label, str(row[key]))
    return grid
