"""2 Associations: inbound (peers sending to our listeners) and outbound (our
deliveries to destinations), live ones first, then the recent ones, newest first;
rejected associations with their reason. ``enter`` lists the objects an inbound
association carried."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Input, Static

from mfconsole.console import format as fmt
from mfconsole.console.dialogs import TextScreen
from mfconsole.console.widgets import ConsoleScreen, FilterBar, KeyedTable

STATUS = {"active": ("● active", "bold"), "negotiating": ("… negotiating", ""),
          "released": ("✓ released", ""), "aborted": ("✗ aborted", "bold"),
          "rejected": ("✗ REJECTED", "bold reverse")}


class AssociationsScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 2, "Associations"
    BINDINGS = [Binding("enter", "objects", "Objects", priority=True, id="associations.objects"),
                Binding("slash", "filter", "Filter", id="associations.filter")]

    def __init__(self) -> None:
        super().__init__()
        self.shown: dict[str, dict[str, Any]] = {}

    def body(self) -> ComposeResult:
        yield KeyedTable([("dir", "↕"), ("id", "#"), ("status", "status"), ("calling", "peer AE"),
                          ("peer", "address"), ("listener", "listener / destination"), ("started", "started"),
                          ("duration", "for"), ("objects", "objects"), ("bytes", "bytes"),
                          ("reason", "reason")], id="associations")
        yield Static(id="association-reason")     # the highlighted row's reason, in full
        yield FilterBar("filter: AE title, address, listener, status…")

    def show_snapshot(self, snap: dict[str, Any]) -> None:
        boards = snap.get("associations") or {}
        now = snap.get("generated_at") or 0.0
        every = boards.get("live", [])[::-1] + boards.get("recent", [])
        self.shown = {a["id"]: a for a in every}
        rows = [association_row(a, now) for a in every]
        text = self.query_one(FilterBar).value.strip().lower()
        if text:
            rows = [r for r in rows if text in " ".join(str(c) for c in r[1]).lower()]
        self.query_one("#associations", KeyedTable).sync(rows)
        self._show_reason()

    def on_data_table_row_highlighted(self, event: Any) -> None:
        self._show_reason()

    def _show_reason(self) -> None:
        a = self.shown.get(self.query_one("#associations", KeyedTable).cursor_key or "")
        reason = (a or {}).get("reason") or ""
        widget = self.query_one("#association-reason", Static)
        widget.display = bool(reason)
        widget.update(Text(f"{a['id']}: {reason}") if reason else "")

    def action_filter(self) -> None:
        self.query_one(FilterBar).open()

    def action_objects(self) -> None:
        """The objects an inbound association carried, as stored (with each
        destination's state); an outbound one: what it sent."""
        if isinstance(self.focused, FilterBar):
            self.query_one("#associations", KeyedTable).focus()
            return
        a = self.shown.get(self.query_one("#associations", KeyedTable).cursor_key or "")
        if a is None:
            return
        title = f"Association {a['id']} ({'from ' + (a.get('calling_ae') or '?') if a.get('direction', 'in') == 'in' else 'to ' + a.get('listener', '')})"
        if a.get("direction") == "out" or not a.get("key"):
            self.app.push_screen(TextScreen(title, Text(
                f"{fmt.count(a.get('objects'))} object(s), {fmt.size(a.get('bytes'))} sent to "
                f"{a.get('peer')}; {fmt.count(a.get('refused'))} not accepted"
                + (f"\nlast: {a['reason']}" if a.get("reason") else ""))))
            return

        def shown(result: dict[str, Any]) -> None:
            self.app.push_screen(TextScreen(title, carried(result)))
        self.app.perform("objects", self.client.objects, {"association": a["key"]}, "id", False, 0, 1000,
                         done=shown, refresh=False)

    def on_input_changed(self, event: Input.Changed) -> None:
        if self.app.snap is not None:
            self.show_snapshot(self.app.snap)


def carried(result: dict[str, Any]) -> Text:
    text = Text(f"{fmt.count(result.get('total'))} object(s) stored from this association\n\n")
    for r in result.get("rows") or []:
        text.append(f"{fmt.clock(r.get('received_at'))}  {r.get('modality') or '':<4} "
                    f"{r['sop_instance_uid']}  {r.get('deliveries') or '(not routed)'}\n")
    return text


def association_row(a: dict[str, Any], now: float) -> tuple[str, tuple[Any, ...]]:
    label, style = STATUS.get(a.get("status", ""), (a.get("status", ""), ""))
    ended = a.get("ended") or now
    reason = a.get("reason") or ""
    if a.get("refused"):
        reason = f"{a['refused']} refused" + (f": {reason}" if reason else "")
    out = a.get("direction") == "out"
    return a["id"], ("→ out" if out else "← in", a["id"].rsplit("-", 1)[-1], Text(label, style=style),
                     (a.get("called_ae") if out else a.get("calling_ae")) or "",
                     a.get("peer", ""), a.get("listener", ""), fmt.clock(a.get("started")),
                     fmt.duration(ended - a["started"]) if a.get("started") else "",
                     fmt.count(a.get("objects")), fmt.size(a.get("bytes")), reason)
