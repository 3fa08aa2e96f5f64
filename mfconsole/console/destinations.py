"""3 Destinations: queue by state, oldest pending, backoff and next attempt, last
outcomes, held studies (study-stable) with their countdown; C-ECHO, test connection,
pause/resume."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Static

from mfconsole.console import format as fmt
from mfconsole.console.dialogs import TextScreen
from mfconsole.console.widgets import ConsoleScreen, KeyedTable

STATES_SHOWN = ("held", "pending", "in_flight", "delivered", "filtered", "dead", "replayed", "discarded",
               # Storage Commitment: custody confirmed, and delivered ones still waiting for it
               "committed", "awaiting_commitment", "commitment_requested")


class DestinationsScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 3, "Destinations"
    BINDINGS = [Binding("e", "echo", "Echo", id="destinations.echo"),
                Binding("t", "test", "Test", id="destinations.test"),
                Binding("s", "pause_resume", "Pause/resume", id="destinations.pause"),
                Binding("enter", "detail", "Detail", priority=True, id="destinations.detail")]
    MUTATING = frozenset({"pause_resume"})

    def __init__(self) -> None:
        super().__init__()
        self._loading: set[str] = set()
        self._frame = 0

    def on_mount(self) -> None:
        # Runs only while an echo does: an idle console must not wake the engine's process.
        self._spinner = self.set_interval(0.1, self._spin, name="echo spinner", pause=True)

    def _spin(self) -> None:
        """Turn the spinner of the echoes in progress (only those cells)."""
        running = [name for name, check in self.app.checks.items() if check.get("running")]
        if not running:
            self._spinner.pause()
            return
        self._frame += 1
        for name in running:
            if self.table.cells(name) is not None:
                self.table.update_cell(name, "check", fmt.echo_result(self.app.checks[name], self._frame))

    def body(self) -> ComposeResult:
        with Horizontal(classes="split"):
            # What decides the next step first: state and queue; echo and target after.
            yield KeyedTable([("name", "destination"), ("state", "state"),
                              ("pending", "pending"), ("in_flight", "in flight"),
                              ("oldest", "oldest pending"), ("next", "next attempt"),
                              ("failures", "failures"), ("delivered", "delivered"), ("dead", "dead"),
                              ("check", "echo"), ("kind", "kind"), ("target", "target")],
                             id="destinations")
            with VerticalScroll(id="detail-pane", classes="detail"):
                yield Static(id="detail")

    @property
    def table(self) -> KeyedTable:
        return self.query_one("#destinations", KeyedTable)

    @property
    def selected(self) -> str | None:
        return self.table.cursor_key

    def show_snapshot(self, snap: dict[str, Any]) -> None:
        now = snap.get("generated_at") or 0.0
        self.table.sync([(d["name"], destination_row(d, now, self.app.checks.get(d["name"])))
                         for d in snap.get("destinations", [])])
        self.query_one("#detail-pane").display = self.wide
        if self.wide:
            self.load_detail()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if self.wide:
            self.load_detail()

    def load_detail(self, then: Any = None) -> None:
        name = self.selected
        if name is None or name in self._loading:
            return
        self._loading.add(name)

        def done(result: dict[str, Any]) -> None:
            self._loading.discard(name)
            if name == self.selected:
                self.query_one("#detail", Static).update(detail(result, self.now, self.app.checks.get(name)))
            if then is not None:
                then(result)
        self.app.perform(f"destination {name}", self.client.destination, name, done=done,
                         failed=lambda why: self._loading.discard(name), refresh=False)

    def action_detail(self) -> None:
        name = self.selected
        if name is None:
            return
        self.load_detail(then=lambda d: self.app.push_screen(
            TextScreen(f"Destination {name}", detail(d, self.now, self.app.checks.get(name)))))

    def action_echo(self) -> None:
        if self.selected:
            self.app.echo(self.selected)
            self._spinner.resume()

    def action_test(self) -> None:
        name = self.selected
        if name is None:
            return
        screen = TextScreen(f"Test {name}: which SOP class / transfer syntax pairs it accepts",
                            Text("⠿ proposing presentation contexts…", style="italic"))
        self.app.push_screen(screen)

        self.app.perform(f"test {name}", self.client.test, name,
                         done=lambda result: screen.set_body(test_report(result)),
                         failed=lambda why: screen.set_body(Text(f"✗ {why}", style="bold")),
                         refresh=False)

    def action_pause_resume(self) -> None:
        name = self.selected
        if name is None:
            return
        cells = self.table.cells(name)
        paused = cells is not None and "PAUSED" in str(cells[1])
        if paused:
            self.app.set_paused(name, False)
        else:
            self.app.confirm(f"Pause {name}? Objects keep queueing; nothing is sent until "
                             "it is resumed.", lambda: self.app.set_paused(name, True), yes="Pause")


def destination_row(d: dict[str, Any], now: float, check: dict[str, Any] | None) -> tuple[Any, ...]:
    counts = d.get("counts") or {}
    nxt = d.get("next_attempt_at") if d.get("state") in ("retrying", "down") else None
    if d.get("state") == "outside_window":      # when it opens
        nxt = (d.get("window") or {}).get("next_change_at")
    return (d["name"], fmt.destination_state(d, wide=False),
            fmt.pending(counts, d.get("urgent_pending")) + fmt.held(counts, d.get("held_studies"), now),
            fmt.count(counts.get("in_flight")),
            fmt.duration(now - d["oldest_pending_at"]) if d.get("oldest_pending_at") else "",
            fmt.until(nxt, now), str(d.get("failures") or 0), delivered_cell(counts),
            fmt.count(counts.get("dead")), fmt.echo_result(check, now=time.time()), d.get("kind", ""),
            d.get("target", ""))


def delivered_cell(counts: dict[str, int]) -> str:
    """Delivered, and with Storage Commitment how many the PACS has confirmed custody of
    (committed deliveries are delivered ones that went on)."""
    delivered = fmt.count(counts.get("delivered"))
    if not counts.get("committed"):
        return delivered
    return f"{delivered} +{fmt.count(counts['committed'])} committed"


def detail(d: dict[str, Any], now: float, check: dict[str, Any] | None) -> Group:
    counts = d.get("counts") or {}
    head = Text()
    head.append(f"{d['name']}", style="bold")
    head.append(f"  {d.get('kind')} → {d.get('target')}\n")
    head.append("state ")
    head.append_text(fmt.destination_state(d))
    problem = fmt.problem(d, now)
    if problem is not None:
        head.append("\n")
        head.append_text(problem)
    head.append(f"\nfailures in a row {d.get('failures') or 0} (down after {d.get('down_after')})")
    if d.get("state") in ("retrying", "down"):
        head.append(f"\nnext attempt {fmt.until(d.get('next_attempt_at'), now)}")
    head.append(f"\nbackoff {d.get('retry_initial_s')} s doubling to {d.get('retry_max_s')} s; "
                f"{d.get('max_associations')} association(s)")
    for line in fmt.pacing(d):
        head.append(f"\n{line}")
    if d.get("urgent_pending"):
        head.append(f"\nurgent pending {fmt.count(d['urgent_pending'])} (sent before the rest)")
    for line in fmt.held_lines(d, now):
        head.append(f"\n{line}")
    if check is not None:
        head.append("\necho ")
        head.append_text(fmt.echo_result(check, now=time.time()))
    queue = Table.grid(padding=(0, 2))
    queue.add_column()
    queue.add_column(justify="right")
    for state in STATES_SHOWN:
        if counts.get(state):
            queue.add_row(state.replace("_", " "), fmt.count(counts[state]))
    outcomes = fmt.events(d.get("outcomes") or [], fmt.clock)
    return Group(head, Text("\nqueue by state", style="bold"), queue,
                 Text("\nlast outcomes", style="bold"), outcomes)


def test_report(result: dict[str, Any]) -> Group:
    if result.get("failure"):
        return Group(Text(f"✗ {result['failure']}", style="bold"))
    rows = result.get("rows") or []
    refused = sum(1 for *_, ok in rows if not ok)
    table = Table(box=None, padding=(0, 1))
    table.add_column("")
    table.add_column("SOP class")
    table.add_column("transfer syntax")
    for sop, ts, ok in rows:
        table.add_row(Text("✓ accepted") if ok else Text("✗ REFUSED", style="bold reverse"), sop, ts)
    summary = Text(f"proposed {len(rows)} pair(s) ({result.get('source')}); "
                   + (f"{refused} refused: objects of those would fail" if refused else "all accepted"))
    return Group(summary, Text(""), table)
