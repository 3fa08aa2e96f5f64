"""4 Dead letters: grouped by cause, paged (10 000 scroll as smoothly as 10), filtered
with ``/``; replay one, the marked ones or a whole group, to the same or another
destination; discard. Patient fields only through an explicit, audited reveal."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Input, Label, Static

from mfconsole.console import format as fmt
from mfconsole.console.dialogs import PromptScreen, TextScreen
from mfconsole.console.widgets import ConsoleScreen, FilterBar, KeyedTable

PAGE = 200
PREFETCH = 40          # rows before the end of what is loaded that fetch the next page
ALL = "*"


class DeadLettersScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 4, "Dead letters"
    AUTO_FOCUS = "#letters"
    BINDINGS = [Binding("enter", "open", "Open", priority=True, id="dead.open"),
                Binding("space", "mark", "Mark (and down)", id="dead.mark"),
                Binding("r", "replay", "Replay", id="dead.replay"),
                Binding("g", "replay_group", "Replay group", id="dead.replay_group"),
                Binding("t", "replay_to", "Replay to…", show=False, id="dead.replay_to"),
                Binding("d", "discard", "Discard", id="dead.discard"),
                Binding("v", "reveal", "Reveal patient", show=False, id="dead.reveal"),
                Binding("slash", "filter", "Filter", show=False, id="dead.filter"),
                Binding("escape", "all_groups", "All groups", show=False, id="dead.all")]
    MUTATING = frozenset({"replay", "replay_group", "replay_to", "discard", "reveal", "replay_filter",
                          "discard_filter"})

    def __init__(self) -> None:
        super().__init__()
        self.groups: dict[str, dict[str, Any]] = {}
        self.group: dict[str, Any] | None = None     # the group the list shows (None: all)
        self.text = ""
        self.rows: list[dict[str, Any]] = []         # loaded so far, newest first
        self.exhausted = False
        self.loading = False
        self.marked: set[int] = set()
        self.total: int | None = None                # counted lazily, after the first page
        self.seen = None                             # the snapshot's dead-letter count we showed
        self.revealed: dict[int, list[list[str]]] = {}
        self._asked = PAGE

    def body(self) -> ComposeResult:
        # Count and destination first: at 80 columns a long cause is what gets cut.
        yield KeyedTable([("count", "count"), ("destination", "destination"), ("cause", "cause")],
                         id="groups")
        yield Label("", id="dead-count")
        with Horizontal(classes="split"):
            yield KeyedTable([("mark", " "), ("id", "id"), ("when", "dead since"),
                              ("destination", "destination"), ("status", "status"),
                              ("reason", "reason"), ("attempts", "tries"),
                              ("uid", "SOP instance UID"), ("handler", "handler")], id="letters")
            with VerticalScroll(id="detail-pane", classes="detail"):
                yield Static(id="detail")
        yield FilterBar("filter: reason, status, destination, UID, calling AE, id…")

    @property
    def letters(self) -> KeyedTable:
        return self.query_one("#letters", KeyedTable)

    @property
    def cursor_id(self) -> int | None:
        key = self.letters.cursor_key
        return int(key) if key else None

    # -- loading ------------------------------------------------------------------------------

    def show_snapshot(self, snap: dict[str, Any]) -> None:
        self.query_one("#detail-pane").display = self.wide
        if snap.get("dead_letters") != self.seen:
            self.seen = snap.get("dead_letters")
            self.reload()

    def reload(self) -> None:
        self.new_query()
        text = self.text or None
        self.app.perform("dead letter groups", self.client.dead_letter_groups, text,
                         done=self.latest(self._show_groups), refresh=False)
        self.loading = True
        self._asked = max(PAGE, len(self.rows))     # a refresh keeps what was scrolled to
        self.app.perform("dead letters", self.client.dead_letters, text, self.group, None,
                         self._asked, done=self.latest(self._show_first),
                         failed=self.latest(self._not_loaded), refresh=False)

    def _show_groups(self, groups: list[dict[str, Any]]) -> None:
        self.groups = {json.dumps([g["destination"], g["status"], g["reason"]]): g for g in groups}
        total = sum(g["count"] for g in groups)
        rows = [(ALL, (fmt.count(total), "", Text("all dead letters" + (f" matching “{self.text}”"
                                                                        if self.text else ""), style="bold")))]
        rows += [(key, (fmt.count(g["count"]), g["destination"], fmt.cause(g)))
                 for key, g in self.groups.items()]
        self.query_one("#groups", KeyedTable).sync(rows)

    def _show_first(self, rows: list[dict[str, Any]]) -> None:
        self.loading = False
        self.rows = rows
        self.exhausted = len(rows) < self._asked
        self._sync()
        self.total = None
        self._show_count()
        self.app.perform("count", self.client.dead_letter_count, self.text or None, self.group,
                         done=self.latest(self._counted), refresh=False)

    def _more(self) -> None:
        if self.loading or self.exhausted or not self.rows:
            return
        self.loading = True
        self.app.perform("dead letters", self.client.dead_letters, self.text or None, self.group,
                         self.rows[-1]["id"], PAGE, done=self.latest(self._show_more),
                         failed=self.latest(self._not_loaded), refresh=False)

    def _not_loaded(self, why: str) -> None:
        self.loading = False
        self.seen = None            # try again with the next snapshot
        self.notify(f"dead letters: {why}", severity="error")

    def _show_more(self, rows: list[dict[str, Any]]) -> None:
        self.loading = False
        known = {r["id"] for r in self.rows}
        new = [r for r in rows if r["id"] not in known]
        self.rows += new
        self.exhausted = len(rows) < PAGE
        self.letters.append([(str(r["id"]), letter_row(r, False)) for r in new])
        self._show_count()
        self._prefetch()

    def _prefetch(self) -> None:
        """Fetch the next page when the cursor is near the end of what is loaded (also
        after a page arrives: the operator may have moved on while it was on its way)."""
        if self.letters.cursor_row >= self.letters.row_count - PREFETCH:
            self._more()

    def _counted(self, n: int) -> None:
        self.total = n
        self._show_count()

    def _show_count(self) -> None:
        total = "counting…" if self.total is None else fmt.count(self.total)
        where = f" · group: {fmt.cause(self.group)} ({self.group['destination']})" if self.group else ""
        marked = f" · {len(self.marked)} marked" if self.marked else ""
        self.query_one("#dead-count", Label).update(
            f"{fmt.count(len(self.rows))} shown of {total}{where}{marked}")

    def _sync(self) -> None:
        self.letters.sync([(str(r["id"]), letter_row(r, r["id"] in self.marked)) for r in self.rows])

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "letters":
            if self.revealed and self.cursor_id not in self.revealed:
                self.revealed = {}          # patient fields leave the screen with their row
            self._prefetch()
            if self.wide:
                self._load_detail()

    def action_open(self) -> None:
        """enter: on a group, list its dead letters; on a dead letter, its detail; in the
        filter line, back to the list."""
        focused = self.focused
        if isinstance(focused, FilterBar):
            self.letters.focus()
        elif focused is not None and focused.id == "groups":
            key = self.query_one("#groups", KeyedTable).cursor_key
            self.group = None if key in (None, ALL) else self.groups.get(key)
            self._restart()
            self.letters.focus()
        else:
            self.action_detail()

    def _restart(self) -> None:
        self.rows, self.marked, self.exhausted, self.loading = [], set(), False, False
        self.letters.reset()
        self.reload()

    # -- detail and reveal -------------------------------------------------------------------

    def _load_detail(self, then: Any = None) -> None:
        delivery = self.cursor_id
        if delivery is None:
            return

        def done(result: dict[str, Any]) -> None:
            body = letter_detail(result, self.revealed.get(delivery))
            if self.cursor_id == delivery:
                self.query_one("#detail", Static).update(body)
            if then is not None:
                then(body)
        self.app.perform(f"dead letter {delivery}", self.client.dead_letter, delivery, done=done,
                         failed=lambda why: None if then is None else self.notify(why, severity="error"),
                         refresh=False)

    def action_detail(self) -> None:
        if self.cursor_id is not None:
            delivery = self.cursor_id
            self._load_detail(then=lambda body: self.app.push_screen(
                DeadLetterDetail(f"Dead letter {delivery}", body, self, delivery)))

    def action_reveal(self, delivery: int | None = None, screen: Any = None) -> None:
        delivery = delivery if delivery is not None else self.cursor_id
        if delivery is None:
            return
        if self.app.read_only:           # the engine would refuse it anyway
            self.app.notify("a read-only console cannot reveal patient fields", severity="warning")
            return

        def show(result: dict[str, Any]) -> None:
            self.revealed = {delivery: result["fields"]}     # one at a time, gone on the next
            self._load_detail(then=screen.set_body if screen is not None else None)

        self.app.confirm(f"Show the patient fields of dead letter {delivery}? They are shown to "
                         "you only, and the reveal is recorded in the audit log.",
                         lambda: self.app.perform("reveal", self.client.reveal, delivery,
                                                  done=show, refresh=False), yes="Reveal")

    # -- actions --------------------------------------------------------------------------------

    def _chosen(self) -> list[int]:
        if self.marked:
            return sorted(self.marked)
        return [self.cursor_id] if self.cursor_id is not None else []

    def action_mark(self) -> None:
        delivery = self.cursor_id
        if delivery is None:
            return
        self.marked ^= {delivery}
        self._sync()
        self._show_count()
        self.letters.action_cursor_down()

    def action_replay(self) -> None:
        ids = self._chosen()
        if ids:
            what = f"dead letter {ids[0]}" if len(ids) == 1 else f"{len(ids)} marked dead letters"
            self.app.confirm(f"Replay {what} to the destination it failed at?",
                             lambda: self._replay(ids=ids), count=len(ids), verb="replay", yes="Replay")

    def action_replay_group(self) -> None:
        group = self.group
        groups = self.query_one("#groups", KeyedTable)
        if group is None and self.focused is groups and groups.cursor_key not in (None, ALL):
            group = self.groups.get(groups.cursor_key or "")
        if group is None and not self.text and self.cursor_id is not None:
            # From the list: the group of the dead letter under the cursor (same
            # destination, status and reason).
            row = next((r for r in self.rows if r["id"] == self.cursor_id), None)
            if row is not None:
                group = {"destination": row["destination"], "status": row.get("last_status") or "",
                         "reason": row.get("last_reason") or ""}
        if group is None and not self.text:
            self.notify("choose a group (enter on it), or filter with /", severity="warning")
            return

        def counted(n: int) -> None:
            label = f"“{fmt.cause(group)}” at {group['destination']}" if group else f"matching “{self.text}”"
            self.app.confirm(f"Replay all {n} dead letter(s) {label}?",
                             lambda: self._replay(group=group, text=self.text or None),
                             count=n, verb="replay", yes="Replay")
        self.app.perform("count", self.client.dead_letter_count, self.text or None, group,
                         done=counted, refresh=False)

    def action_replay_to(self) -> None:
        ids = self._chosen()
        if not ids:
            return
        names = [d["name"] for d in (self.app.snap or {}).get("destinations", [])]

        def chosen(to: str | None) -> None:
            to = (to or "").strip()
            if not to:
                return
            if to not in names:
                self.notify(f"no destination named {to}", severity="error")
                return
            self.app.confirm(f"Replay {len(ids)} dead letter(s) to {to} (a new delivery each)?",
                             lambda: self._replay(ids=ids, to=to), count=len(ids), verb="replay",
                             yes=f"Replay to {to}")
        self.app.push_screen(PromptScreen("Replay to which destination?", "",
                                          "one of: " + ", ".join(names)), chosen)

    def _replay(self, **how: Any) -> None:
        def done(result: dict[str, Any]) -> None:
            self.notify(f"{result['queued']} dead letter(s) queued again"
                        + (f" for {how['to']}" if how.get("to") else ""))
            self._after_action()
        self.app.perform("replay", self.client.replay, how.get("ids"), how.get("group"),
                         how.get("text"), how.get("to"), done=done)

    def action_discard(self) -> None:
        ids = self._chosen()
        if not ids:
            return

        def done(result: dict[str, Any]) -> None:
            self.notify(f"{result['discarded']} dead letter(s) discarded")
            self._after_action()
        what = f"dead letter {ids[0]}" if len(ids) == 1 else f"{len(ids)} marked dead letters"
        self.app.confirm(f"Discard {what}? It will never be delivered (audited).",
                         lambda: self.app.perform("discard", self.client.discard, ids, done=done),
                         count=len(ids), verb="discard", yes="Discard")

    def action_replay_filter(self) -> None:
        """Every dead letter the current filter (and group) matches."""
        self._bulk("replay")

    def action_discard_filter(self) -> None:
        self._bulk("discard")

    def _bulk(self, verb: str) -> None:
        if not self.text and self.group is None:
            self.notify(f"{verb} by filter: filter with / (or open a group) first", severity="warning")
            return
        text, group = self.text or None, self.group
        label = " and ".join(x for x in (f"matching “{self.text}”" if self.text else "",
                                         f"of “{fmt.cause(group)}”" if group else "") if x)

        def counted(n: int) -> None:
            if not n:
                self.notify(f"no dead letter {label}")
                return
            if verb == "replay":
                then = lambda: self._replay(group=group, text=text)   # noqa: E731
            else:
                then = lambda: self.app.perform(   # noqa: E731
                    "discard", self.client.discard, None, group, text,
                    done=lambda r: (self.notify(f"{r['discarded']} dead letter(s) discarded"),
                                    self._after_action()))
            self.app.confirm(f"{verb.capitalize()} all {n} dead letter(s) {label}?"
                             + (" They will never be delivered (audited)." if verb == "discard" else ""),
                             then, count=n, verb=verb, yes=verb.capitalize())
        self.app.perform("count", self.client.dead_letter_count, text, group, done=counted, refresh=False)

    def _after_action(self) -> None:
        self.marked = set()
        self.seen = None           # reload on the next snapshot, which the action asked for

    def action_filter(self) -> None:
        self.query_one(FilterBar).open()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.value.strip() != self.text:
            self.text = event.value.strip()
            self._restart()

    def action_all_groups(self) -> None:
        if self.group is not None:
            self.group = None
            self._restart()


class DeadLetterDetail(TextScreen):
    """One dead letter, full screen (below 120 columns)."""

    BINDINGS = [Binding("v", "reveal", "Reveal patient fields", id="deaddetail.reveal")]

    def __init__(self, title: str, body: Any, owner: DeadLettersScreen, delivery: int):
        super().__init__(title, body)
        self.owner, self.delivery = owner, delivery

    def action_reveal(self) -> None:
        self.owner.action_reveal(self.delivery, self)

    def action_close(self) -> None:
        self.owner.revealed = {}            # closing the detail hides the patient again
        self.owner._load_detail()
        super().action_close()


def letter_row(r: dict[str, Any], marked: bool) -> tuple[Any, ...]:
    # A time, not an age: an age would change every row every second (10 000 rows).
    return ("✓" if marked else " ", str(r["id"]), fmt.short_stamp(r.get("updated_at")),
            r.get("destination", ""), r.get("last_status") or "", r.get("last_reason") or "",
            str(r.get("attempts") or 0), r.get("sop_instance_uid", ""),
            " ".join(x for x in (r.get("handler"), r.get("handler_version")) if x))


FIELDS = (("destination", "destination"), ("sop_instance_uid", "SOP instance UID"),
          ("sop_class_uid", "SOP class UID"), ("study_uid", "study UID"),
          ("transfer_syntax", "transfer syntax"), ("size", "bytes"), ("calling_ae", "from AE"),
          ("listener", "listener"), ("attempts", "attempts"), ("last_status", "status"),
          ("last_class", "class"), ("last_reason", "reason"), ("handler", "handler"),
          ("handler_version", "handler version"), ("rule", "rule"), ("coerced", "coerced"))


def letter_detail(row: dict[str, Any], revealed: list[list[str]] | None) -> Group:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")        # a UID is folded onto the next line, never cut
    grid.add_row("id", str(row.get("id")))
    for key, label in FIELDS:
        if row.get(key) not in (None, ""):
            grid.add_row(label, str(row[key]))
    history = fmt.events(row.get("history") or [], fmt.stamp)
    parts: list[Any] = [grid, Text("\noutcome history", style="bold"), history]
    if revealed:
        phi = Table.grid(padding=(0, 2))
        phi.add_column(style="bold")
        phi.add_column()
        for label, value in revealed:
            phi.add_row(label, value)
        parts += [Text("\npatient fields (revealed, audited)", style="bold reverse"), phi]
    else:
        parts.append(Text("\npatient fields hidden — v reveals them (audited)", style="italic"))
    return Group(*parts)
