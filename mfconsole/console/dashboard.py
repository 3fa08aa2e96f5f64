"""1 Dashboard: listeners and destinations at a glance, Mirth-style counters (this run /
lifetime), a throughput sparkline, and every problem in words, in full.

Two layouts: from 120 columns every column; below, the columns an on-call operator
needs first (state, queue, counters, throughput) in compact numbers. At every size
the problems below the tables say each failing destination's last error in full
(so the tables carry no error column to be cut)."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Label, Static

from mfconsole.console import format as fmt
from mfconsole.console.widgets import ConsoleScreen, KeyedTable, update_if_changed

SPARK_WIDTH = 20
NARROW_SPARK = 10

LISTENER_COLUMNS = {
    True: [("name", "listener"), ("state", "state"), ("ae", "AE title"), ("address", "address"),
           ("tls", "TLS"), ("received", "received"), ("rate", "rate"), ("spark", f"last {SPARK_WIDTH} s"),
           ("refused", "refused/rejected")],
    False: [("name", "listener"), ("state", "state"), ("ae", "AE title"), ("received", "received"),
            ("refused", "refused"), ("spark", f"last {NARROW_SPARK} s")],
}
DESTINATION_COLUMNS = {
    True: [("name", "destination"), ("state", "state"), ("queue", "queued"), ("in_flight", "in flight"),
           ("sent", "sent run/life"), ("errored", "errored run/life"), ("rate", "rate"),
           ("spark", f"last {SPARK_WIDTH} s"), ("kind", "kind")],
    False: [("name", "destination"), ("state", "state"), ("queue", "queued"), ("sent", "sent run/life"),
            ("errored", "errored"), ("spark", f"last {NARROW_SPARK} s")],
}


class DashboardScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 1, "Dashboard"

    def body(self) -> ComposeResult:
        yield Static(id="summary")
        yield Label("Listeners", classes="section")
        yield KeyedTable(LISTENER_COLUMNS[True], id="listeners")
        yield Label("Destinations", classes="section")
        yield KeyedTable(DESTINATION_COLUMNS[True], id="destinations")
        with VerticalScroll(id="problems-pane"):
            yield Static(id="problems")

    def show_snapshot(self, snap: dict[str, Any]) -> None:
        wide = self.wide
        engine = snap.get("engine") or {}
        summary = Text()
        summary.append(f"objects stored {fmt.count(snap.get('objects'))}")
        dead = snap.get("dead_letters", 0)
        summary.append(" · dead letters ")
        summary.append(fmt.count(dead), style="bold reverse" if dead else "")
        if engine.get("uptime_s") is not None:
            summary.append(f" · engine up {fmt.duration(engine['uptime_s'])}")
        if engine.get("pid"):
            summary.append(f" · pid {engine['pid']}")
        if engine.get("version") and wide:
            summary.append(f" · v{engine['version']}")
        update_if_changed(self.query_one("#summary", Static), summary)
        listeners = self.query_one("#listeners", KeyedTable)
        listeners.set_columns(LISTENER_COLUMNS[wide])
        listeners.sync([(item["name"], listener_row(item, wide)) for item in snap.get("listeners", [])])
        destinations = self.query_one("#destinations", KeyedTable)
        destinations.set_columns(DESTINATION_COLUMNS[wide])
        destinations.sync([(item["name"], destination_row(item, wide))
                           for item in snap.get("destinations", [])])
        now = snap.get("generated_at") or 0.0
        problems = [p for p in (fmt.problem(item, now) for item in snap.get("destinations", [])) if p]
        self.query_one("#problems-pane").display = bool(problems)
        if problems:
            update_if_changed(self.query_one("#problems", Static), Text("\n").join(
                [Text("Problems", style="bold"), *problems]))


def listener_row(item: dict[str, Any], wide: bool = True) -> tuple[Any, ...]:
    session, life = item.get("session") or {}, item.get("lifetime") or {}
    if not wide:
        return (item["name"], fmt.state(item.get("state", "")), item.get("ae_title", ""),
                fmt.now_and_lifetime(session.get("received"), life.get("received"), narrow=True),
                f"{fmt.compact(session.get('refused'))}/{fmt.compact(session.get('rejected'))}",
                fmt.spark(item.get("history"), NARROW_SPARK))
    return (item["name"], fmt.state(item.get("state", "")), item.get("ae_title", ""),
            f"{item.get('host')}:{item.get('port')}", "TLS" if item.get("tls") else "clear",
            fmt.count(session.get("received")), fmt.rate(item.get("rate")),
            fmt.spark(item.get("history"), SPARK_WIDTH),
            f"{fmt.count(session.get('refused'))} / {fmt.count(session.get('rejected'))}")


def destination_row(item: dict[str, Any], wide: bool = True) -> tuple[Any, ...]:
    counts, session = item.get("counts") or {}, item.get("session") or {}
    life = item.get("lifetime") or {}
    if not wide:
        return (item["name"], fmt.destination_state(item, wide=False), fmt.compact(counts.get("pending")),
                fmt.now_and_lifetime(session.get("sent"), life.get("sent"), narrow=True),
                fmt.now_and_lifetime(session.get("errored"), life.get("errored"), narrow=True),
                fmt.spark(item.get("history"), NARROW_SPARK))
    return (item["name"], fmt.destination_state(item), fmt.pending(counts, item.get("urgent_pending")),
            fmt.count(counts.get("in_flight")),
            fmt.now_and_lifetime(session.get("sent"), life.get("sent")),
            fmt.now_and_lifetime(session.get("errored"), life.get("errored")),
            fmt.rate(item.get("rate")), fmt.spark(item.get("history"), SPARK_WIDTH),
            item.get("kind", ""))
