"""7 Handlers: the running version of each, the file on disk, the last reload result;
reload one or all; preview a handler on a stored object (an audited reveal: its
output may carry patient data)."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static

from mfconsole.console.dialogs import PromptScreen, TextScreen
from mfconsole.console.widgets import ConsoleScreen, KeyedTable

STATE = {"active": ("✓ active", ""), "changed on disk": ("↻ changed on disk", "bold"),
         "file broken": ("✗ FILE BROKEN", "bold reverse"), "error": ("✗ ERROR", "bold reverse"),
         "not routed": ("· not routed", "")}


class HandlersScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 7, "Handlers"
    BINDINGS = [Binding("r", "reload_one", "Reload", id="handlers.reload"),
                Binding("a", "reload_all", "Reload all", id="handlers.reload_all"),
                Binding("v", "preview", "Preview", id="handlers.preview")]
    MUTATING = frozenset({"reload_one", "reload_all", "preview"})    # preview: patient data

    def __init__(self) -> None:
        super().__init__()
        self.handlers: dict[str, dict[str, Any]] = {}

    def body(self) -> ComposeResult:
        yield KeyedTable([("name", "handler"), ("state", "state"), ("version", "running"),
                          ("digest", "sha256"), ("file", "on disk"), ("routes", "routes"),
                          ("last", "last reload")], id="handlers")
        with VerticalScroll(classes="result"):
            yield Static("", id="handler-detail")

    def resumed(self) -> None:
        super().resumed()
        self.load()

    def load(self) -> None:
        self.app.perform("handlers", self.client.handlers, done=self._show, refresh=False)

    def _show(self, handlers: list[dict[str, Any]]) -> None:
        self.handlers = {h["name"]: h for h in handlers}
        self.query_one("#handlers", KeyedTable).sync([(h["name"], handler_row(h)) for h in handlers])
        self._detail()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail()

    def _detail(self) -> None:
        h = self.handlers.get(self.query_one("#handlers", KeyedTable).cursor_key or "")
        self.query_one("#handler-detail", Static).update(handler_detail(h) if h else "")

    def action_reload_one(self) -> None:
        name = self.query_one("#handlers", KeyedTable).cursor_key
        if name:
            self.app.perform(f"reload {name}", self.client.reload_handler, name,
                             done=self.app.show_reload)

    def action_reload_all(self) -> None:
        self.app.reload()

    def reloaded(self, result: dict[str, Any]) -> None:
        """After any reload (here or from the command palette): show its outcome."""
        self.load()

    def action_preview(self) -> None:
        name = self.query_one("#handlers", KeyedTable).cursor_key
        if not name:
            return

        def run(delivery: str | None) -> None:
            if delivery is None:
                return
            delivery_id = int(delivery) if delivery.strip().isdigit() else None
            self.app.confirm(
                f"Preview {name} on {'delivery ' + str(delivery_id) if delivery_id else 'its most recent object'}? "
                "The output may show patient data; the preview is recorded in the audit log.",
                lambda: self.app.perform(f"preview {name}", self.client.preview_handler, name,
                                         delivery_id, done=self._previewed, refresh=False),
                yes="Preview")
        self.app.push_screen(PromptScreen(f"Preview {name} on which delivery id?", "",
                                          "empty: the most recent object routed through it"), run)

    def _previewed(self, result: dict[str, Any]) -> None:
        self.app.push_screen(TextScreen(f"Preview (delivery {result['delivery_id']}) — nothing was sent",
                                        Text(result["text"])))


def handler_row(h: dict[str, Any]) -> tuple[Any, ...]:
    label, style = STATE.get(h["state"], (h["state"], ""))
    return (h["name"], Text(label, style=style), h.get("version") or "", h.get("digest") or "",
            h.get("file_version") or ("✗ broken" if h.get("error") else ""),
            "; ".join(h.get("routes") or []) or "no route",
            Text("✗ refused", style="bold") if h.get("last_error") else (h.get("last_reload") or ""))


def handler_detail(h: dict[str, Any]) -> Text:
    text = Text()
    text.append(f"{h['name']}", style="bold")
    text.append(f"  running {h.get('version') or '—'} ({h.get('digest') or '—'})\n")
    if h.get("error"):
        text.append("file on disk: ", style="bold")
        text.append(f"✗ {h['error']}\n")
    elif h.get("file_version"):
        text.append(f"file on disk: version {h['file_version']}\n")
    if h.get("last_reload"):
        text.append("last reload: ", style="bold")
        text.append(f"{h['last_reload']}\n")
    if h.get("last_error"):
        text.append("error: ", style="bold reverse")
        text.append(f" {h['last_error']}\n")
    return text
