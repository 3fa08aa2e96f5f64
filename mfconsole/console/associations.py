"""2 Associations: live ones first, then the recent ones, newest first; rejected
associations with their reason."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Input

from mfconsole.console import format as fmt
from mfconsole.console.widgets import ConsoleScreen, FilterBar, KeyedTable

STATUS = {"active": ("● active", "bold"), "negotiating": ("… negotiating", ""),
          "released": ("✓ released", ""), "aborted": ("✗ aborted", "bold"),
          "rejected": ("✗ REJECTED", "bold reverse")}


class AssociationsScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 2, "Associations"
    BINDINGS = [Binding("slash", "filter", "Filter", id="associations.filter")]

    def body(self) -> ComposeResult:
        yield KeyedTable([("id", "#"), ("status", "status"), ("calling", "peer AE"),
                          ("peer", "address"), ("listener", "listener"), ("started", "started"),
                          ("duration", "for"), ("objects", "objects"), ("bytes", "bytes"),
                          ("reason", "reason")], id="associations")
        yield FilterBar("filter: AE title, address, listener, status…")

    def show_snapshot(self, snap: dict[str, Any]) -> None:
        boards = snap.get("associations") or {}
        now = snap.get("generated_at") or 0.0
        rows = [association_row(a, now) for a in boards.get("live", [])[::-1] + boards.get("recent", [])]
        text = self.query_one(FilterBar).value.strip().lower()
        if text:
            rows = [r for r in rows if text in " ".join(str(c) for c in r[1]).lower()]
        self.query_one("#associations", KeyedTable).sync(rows)

    def action_filter(self) -> None:
        self.query_one(FilterBar).open()

    def on_input_changed(self, event: Input.Changed) -> None:
        if self.app.snap is not None:
            self.show_snapshot(self.app.snap)


def association_row(a: dict[str, Any], now: float) -> tuple[str, tuple[Any, ...]]:
    label, style = STATUS.get(a.get("status", ""), (a.get("status", ""), ""))
    ended = a.get("ended") or now
    reason = a.get("reason") or ""
    if a.get("refused"):
        reason = f"{a['refused']} refused" + (f": {reason}" if reason else "")
    return a["id"], (a["id"].rsplit("-", 1)[-1], Text(label, style=style), a.get("calling_ae") or "",
                     a.get("peer", ""), a.get("listener", ""), fmt.clock(a.get("started")),
                     fmt.duration(ended - a["started"]) if a.get("started") else "",
                     fmt.count(a.get("objects")), fmt.size(a.get("bytes")), reason)
