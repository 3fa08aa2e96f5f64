"""Building blocks every screen uses: a keyed table that updates only what changed,
the status bar, a filter line, and the base screen."""

from __future__ import annotations

from typing import Any, Iterable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from mfconsole.console import format as fmt

Cells = tuple[Any, ...]


class KeyedTable(DataTable):
    """A DataTable fed whole snapshots: rows keyed, only changed cells rewritten, the
    cursor kept on its row. Rows are rebuilt only when their order changes."""

    def __init__(self, columns: Iterable[tuple[str, str]], **kwargs: Any):
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self.column_keys: list[str] = []
        self._cells: dict[str, Cells] = {}
        self._order: list[str] = []
        self.set_columns(columns)

    def set_columns(self, columns: Iterable[tuple[str, str]]) -> None:
        """Another set of columns (a narrower layout): rows are fed again by the next sync."""
        columns = list(columns)
        if [key for key, _ in columns] == self.column_keys:
            return
        self.clear(columns=True)
        self._cells, self._order = {}, []
        self.column_keys = [key for key, _ in columns]
        for key, label in columns:
            self.add_column(label, key=key)

    @property
    def cursor_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:
            return None

    def cells(self, key: str) -> Cells | None:
        return self._cells.get(key)

    @property
    def keys(self) -> list[str]:
        return list(self._order)

    def sync(self, rows: list[tuple[str, Cells]]) -> None:
        cursor, index = self.cursor_key, self.cursor_row
        wanted = [key for key, _ in rows]
        wanted_set = set(wanted)
        for key in [k for k in self._order if k not in wanted_set]:
            self.remove_row(key)
            del self._cells[key]
        kept = [k for k in self._order if k in wanted_set]
        # Appending new rows keeps the others where they are; any other change of
        # order is rare (a sort), and rebuilding then is simplest.
        if wanted[:len(kept)] != kept:
            self._rebuild(rows)
        else:
            for key, cells in rows:
                old = self._cells.get(key)
                if old is None:
                    self.add_row(*cells, key=key)
                elif old != cells:
                    for column, before, after in zip(self.column_keys, old, cells):
                        if before != after:
                            self.update_cell(key, column, after, update_width=True)
                self._cells[key] = cells
        self._order = wanted
        if cursor in self._cells:
            row = self.get_row_index(cursor)
            if row != self.cursor_row:
                self.move_cursor(row=row, animate=False, scroll=False)
        elif self.row_count:
            self.move_cursor(row=min(index, self.row_count - 1), animate=False)

    def append(self, rows: list[tuple[str, Cells]]) -> None:
        """Add rows after the others, touching none of them (a page of a long list:
        the cost stays that of the page, however many rows are already there)."""
        for key, cells in rows:
            if key not in self._cells:
                self.add_row(*cells, key=key)
                self._cells[key] = cells
                self._order.append(key)

    def _rebuild(self, rows: list[tuple[str, Cells]]) -> None:
        self.clear()
        self._cells = {}
        for key, cells in rows:
            self.add_row(*cells, key=key)
            self._cells[key] = cells

    def reset(self) -> None:
        self.clear()
        self._cells, self._order = {}, []


def update_if_changed(widget: Static, text: Text) -> None:
    """Repaint only when the words change: a console that hosts the engine shares its
    process (and the GIL) with ingest, and an unchanged repaint each second is not free."""
    key = (text.plain, tuple(text.spans), str(text.style))
    if getattr(widget, "_shown_key", None) != key:
        widget._shown_key = key          # type: ignore[attr-defined]
        widget.update(text)


class StatusBar(Static):
    """The persistent facts: which screen, which engine, what is wrong right now."""

    DEFAULT_CSS = "StatusBar { height: 1; dock: top; background: $panel; }"

    def __init__(self, number: int, title: str):
        super().__init__()
        self.number, self.title = number, title

    def on_mount(self) -> None:
        self.update_from(self.app)

    def update_from(self, app: Any) -> None:
        update_if_changed(self, status_line(app, self.number, self.title))


def status_line(app: Any, number: int, title: str) -> Text:
    """Screen, engine, and what is wrong right now: the most important first, so a
    narrow terminal cuts only the least important."""
    snap = app.snap or {}
    line = Text()
    line.append(f" {number} {title} ", style="bold reverse")
    facts: list[tuple[str, str]] = []
    if app.lost:
        since = f" since {fmt.clock(app.lost_since)}" if getattr(app, "lost_since", None) else ""
        facts.append((f"✗ ENGINE NOT ANSWERING{since}: {app.lost}", "bold reverse"))
    else:
        line.append(f" {app.client.description}", style="bold" if app.client.hosts_engine else "")
        engine = snap.get("engine") or {}
        if engine.get("uptime_s") is not None and app.size.width >= 120:
            line.append(f" · up {fmt.duration(engine['uptime_s'])}")
    states = [d.get("state") for d in snap.get("destinations", [])]
    for word, label in (("down", "✗ {} DOWN"), ("paused", "⏸ {} PAUSED"), ("retrying", "↻ {} retrying")):
        if states.count(word):
            facts.append((label.format(states.count(word)), "bold reverse" if word != "retrying" else "bold"))
    dead = snap.get("dead_letters", 0)
    if dead:
        facts.append((f"✉ {fmt.count(dead)} dead", "bold"))
    if app.read_only:
        facts.append(("READ-ONLY", "bold"))
    if app.refresh_paused:
        facts.append(("⏸ refresh paused", "bold reverse"))
    for n, (text, style) in enumerate(facts):
        line.append(" │ " if n or not app.lost else " ")
        line.append(text, style=style)
    return line


class FilterBar(Input):
    """``/`` opens it under the table; typing filters in place, ``esc`` clears it."""

    # One line, no border, focused or not: Input's focus style brings back a tall border,
    # which in one line leaves only its top edge (the text clipped away). In the flow
    # under the table, not docked: docked at the bottom it lies under the footer.
    DEFAULT_CSS = """
    FilterBar, FilterBar:focus {
        height: 1; border: none; padding: 0 1; background: $boost;
    }
    FilterBar { display: none; }
    """
    BINDINGS = [Binding("escape", "clear_filter", "Clear filter", id="filter.clear")]

    def __init__(self, placeholder: str = "filter…"):
        super().__init__(placeholder=placeholder)

    def open(self) -> None:
        self.display = True
        self.focus()

    def action_clear_filter(self) -> None:
        self.value = ""
        self.display = False
        self.screen.focus_next()


class ConsoleScreen(Screen):
    """A numbered screen: status bar on top, footer with its keys below. It reads
    the app's latest snapshot and its client; it never knows which engine it has."""

    NUMBER = 0
    TITLE_TEXT = ""
    # Actions that change something or show patient data: hidden in a read-only console.
    MUTATING: frozenset[str] = frozenset()

    def compose(self) -> ComposeResult:
        yield StatusBar(self.NUMBER, self.TITLE_TEXT)
        yield from self.body()
        yield Footer()

    def body(self) -> ComposeResult:
        yield from ()

    @property
    def client(self) -> Any:
        return self.app.client

    # Answers arrive in any order (each request is a thread worker): a list shows only
    # the answer to its latest query, never a slower answer to an earlier one.
    _query = 0

    def new_query(self) -> None:
        """A new filter, group or sort: earlier answers no longer count."""
        self._query += 1

    def latest(self, fn: Any) -> Any:
        """``fn`` as a callback that runs only if no new query began since it was made."""
        query = self._query

        def answer(*args: Any) -> None:
            if query == self._query:
                fn(*args)
        return answer

    @property
    def now(self) -> float:
        """The snapshot's clock (frozen with it in tests)."""
        return (self.app.snap or {}).get("generated_at") or 0.0

    def on_screen_resume(self) -> None:
        # After the switch has painted: widgets updated while a mode switch is still in
        # progress may not be repainted (seen with Textual 8.2).
        self.call_after_refresh(self.resumed)

    def resumed(self) -> None:
        """The screen is visible again: catch up with the latest snapshot."""
        self.query_one(StatusBar).update_from(self.app)
        if self.app.snap is not None:
            self.show_snapshot(self.app.snap)

    def show_snapshot(self, snap: dict[str, Any]) -> None:
        """Called about once a second with the engine's latest snapshot."""

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.MUTATING and self.app.read_only:
            return False
        return True

    @property
    def wide(self) -> bool:
        """Split detail panes from 120 columns; below, details take the screen."""
        return self.app.size.width >= 120

