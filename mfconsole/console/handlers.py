"""7 Handlers: the running version of each, the file on disk, the last reload result;
reload one or all; preview a handler on a stored object: what it changes first (tags,
HL7 segments: no value), the values on request (an audited reveal: they may be
patient data)."""

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

        def run(which: str | None) -> None:
            if which is None:
                return
            which = which.strip().lower()
            object_id = int(which[1:]) if which[:1] == "o" and which[1:].isdigit() else None
            delivery_id = int(which) if which.isdigit() else None
            preview(self.app, name, delivery_id=delivery_id, object_id=object_id)
        self.app.push_screen(PromptScreen(f"Preview {name} on which object?", "",
                                          "empty: the most recent one routed through it · a delivery "
                                          "id · o and an object id (o1234)"), run)


def preview(app: Any, name: str, *, delivery_id: int | None = None, object_id: int | None = None) -> None:
    """What handler ``name`` would do to a stored object: the structure first (which
    attributes it changes, which HL7 segments it makes: no value), the values only on
    ``v``, after a confirmation, audited. Also used from the object browser."""
    def shown(result: dict[str, Any]) -> None:
        app.push_screen(PreviewScreen(app, name, result))
    app.perform(f"preview {name}", app.client.preview_handler, name, delivery_id, object_id, False,
                done=shown, refresh=False)


class PreviewScreen(TextScreen):
    BINDINGS = [Binding("v", "reveal", "Show values (audited)", id="preview.reveal")]

    def __init__(self, app: Any, name: str, result: dict[str, Any]):
        super().__init__(f"Preview {result.get('label', name)} · object {result['object_id']}, "
                         f"delivery {result['delivery_id']} — nothing was sent", structure(result))
        self.owner, self.handler, self.result = app, name, result

    def action_reveal(self) -> None:
        delivery = self.result["delivery_id"]
        self.owner.confirm(
            f"Show the values {self.handler} would send for delivery {delivery}? They may be patient "
            "data; the preview is recorded in the audit log.",
            lambda: self.owner.perform(f"preview {self.handler}", self.owner.client.preview_handler,
                                       self.handler, delivery, None, True,
                                       done=lambda r: self.set_body(Text(r["text"])), refresh=False),
            yes="Show values")


def structure(result: dict[str, Any]) -> Text:
    text = Text()
    kind = result.get("kind")
    if kind == "filtered":
        text.append("filtered: the handler returns None for this object (nothing would be sent)\n")
    elif kind == "hl7":
        text.append(f"an HL7 message of {result.get('bytes', 0)} bytes:\n")
        for seg in result.get("segments") or []:
            text.append(f"  {seg['segment']}  {seg['fields']} field(s)\n")
    elif kind == "fhir":
        text.append(f"a FHIR {result.get('resource_type') or 'resource'} of {result.get('bytes', 0)} "
                    f"bytes: {result.get('series', 0)} series, {result.get('instances', 0)} instance(s)\n"
                    f"  elements: {', '.join(result.get('elements') or [])}\n")
    else:
        changes = result.get("changes") or []
        text.append(f"a DICOM data set of {result.get('bytes', 0)} bytes; "
                    f"{len(changes)} attribute(s) changed by the handler:\n")
        for c in changes:
            text.append(f"  {c['change']:<8} {c['tag']} {c['keyword']}\n")
    text.append("\nvalues hidden — v shows them (audited)", style="italic")
    return text


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
