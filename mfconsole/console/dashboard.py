"""1 Dashboard: listeners and destinations at a glance, Mirth-style counters (this run /
lifetime), a throughput sparkline and the last error in words."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Label, Static

from mfconsole.console import format as fmt
from mfconsole.console.widgets import ConsoleScreen, KeyedTable

SPARK_WIDTH = 20


class DashboardScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 1, "Dashboard"

    def body(self) -> ComposeResult:
        yield Static(id="summary")
        yield Label("Listeners", classes="section")
        yield KeyedTable([("name", "listener"), ("state", "state"), ("ae", "AE title"),
                          ("address", "address"), ("tls", "TLS"), ("received", "received"),
                          ("rate", "rate"), ("spark", f"last {SPARK_WIDTH} s"),
                          ("refused", "refused/rejected")], id="listeners")
        yield Label("Destinations", classes="section")
        yield KeyedTable([("name", "destination"), ("state", "state"), ("queue", "queued"),
                          ("in_flight", "in flight"), ("sent", "sent run/life"),
                          ("errored", "errored run/life"), ("rate", "rate"),
                          ("spark", f"last {SPARK_WIDTH} s"), ("error", "last error"),
                          ("kind", "kind")], id="destinations")

    def show_snapshot(self, snap: dict[str, Any]) -> None:
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
        if engine.get("version"):
            summary.append(f" · v{engine['version']}")
        self.query_one("#summary", Static).update(summary)
        self.query_one("#listeners", KeyedTable).sync([
            (item["name"], listener_row(item)) for item in snap.get("listeners", [])])
        self.query_one("#destinations", KeyedTable).sync([
            (item["name"], destination_row(item)) for item in snap.get("destinations", [])])


def listener_row(item: dict[str, Any]) -> tuple[Any, ...]:
    session = item.get("session") or {}
    return (item["name"], fmt.state(item.get("state", "")), item.get("ae_title", ""),
            f"{item.get('host')}:{item.get('port')}", "TLS" if item.get("tls") else "clear",
            fmt.count(session.get("received")), fmt.rate(item.get("rate")),
            fmt.spark(item.get("history"), SPARK_WIDTH),
            f"{fmt.count(session.get('refused'))} / {fmt.count(session.get('rejected'))}")


def destination_row(item: dict[str, Any]) -> tuple[Any, ...]:
    counts, session = item.get("counts") or {}, item.get("session") or {}
    errored_life = sum(counts.get(s, 0) for s in ("dead", "discarded", "replayed"))
    error = item.get("last_error") or ""
    if error and item.get("last_status"):
        error = f"{item['last_status']}: {error}"
    return (item["name"], fmt.state(item.get("state", "")), fmt.count(counts.get("pending")),
            fmt.count(counts.get("in_flight")),
            fmt.now_and_lifetime(session.get("sent"), counts.get("delivered")),
            fmt.now_and_lifetime(session.get("errored"), errored_life),
            fmt.rate(item.get("rate")), fmt.spark(item.get("history"), SPARK_WIDTH), error,
            item.get("kind", ""))
