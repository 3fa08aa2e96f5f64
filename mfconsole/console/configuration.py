"""6 Configuration: listener AE titles and calling-AE allowlists, where destinations
are, the egress allowlists. Edits are staged, then written together: validated as
`mfconsole check` validates, saved with config.toml's comments kept, hot-reloaded.
A refused edit names its key and why, and nothing of it is applied.

``p`` shows the routing plan of config.toml as it is on disk (rules, fallback and
handlers an administrator edited there) against the running configuration: per
destination the objects of the last 24 hours that would newly go there or no longer
would, per rule, discards, what the handlers on disk would filter — nothing sent,
nothing reloaded (`mfconsole reload --plan`). Allowed read-only: it changes nothing and
shows routing-safe fields only."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from mfconsole.console.dialogs import PromptScreen
from mfconsole.console.widgets import ConsoleScreen, KeyedTable


class ConfigurationScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 6, "Configuration"
    BINDINGS = [Binding("enter", "edit", "Edit", priority=True, id="config.edit"),
                Binding("w", "write", "Save + reload", id="config.write"),
                Binding("u", "undo", "Undo edits", id="config.undo"),
                # Over the app's p (pause refresh), as the timeline's preview is.
                Binding("p", "plan", "Plan", id="config.plan"),
                Binding("ctrl+r", "reload_fields", "Re-read", show=False, id="config.reread")]
    MUTATING = frozenset({"edit", "write", "undo"})

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[dict[str, Any]] = []
        self.staged: dict[str, Any] = {}

    def body(self) -> ComposeResult:
        yield KeyedTable([("section", "section"), ("setting", "setting"), ("value", "value"),
                          ("staged", "")], id="fields")
        with VerticalScroll(id="config-result", classes="result"):
            yield Static("", id="result")

    def resumed(self) -> None:
        super().resumed()
        if not self.fields:
            self.action_reload_fields()

    def action_reload_fields(self) -> None:
        self.app.perform("configuration", self.client.config_fields, done=self._show_fields,
                         refresh=False)

    def _show_fields(self, fields: list[dict[str, Any]]) -> None:
        self.fields = fields
        self._sync()

    def _sync(self) -> None:
        rows = []
        for f in self.fields:
            staged = f["key"] in self.staged
            value = self.staged[f["key"]] if staged else f["value"]
            rows.append((f["key"], (f["section"], f["label"], show(value),
                                    Text("● edited", style="bold") if staged else "")))
        self.query_one("#fields", KeyedTable).sync(rows)

    def _field(self, key: str | None) -> dict[str, Any] | None:
        return next((f for f in self.fields if f["key"] == key), None)

    def action_edit(self) -> None:
        field = self._field(self.query_one("#fields", KeyedTable).cursor_key)
        if field is None:
            return
        current = self.staged.get(field["key"], field["value"])
        hint = {"list": "comma-separated; empty for none", "int": "a number"}.get(field["type"], "")
        hint = f"{field['key']} · {hint}" if hint else field["key"]

        def answered(value: str | None) -> None:
            if value is None:
                return
            typed = [v.strip() for v in value.split(",") if v.strip()] if field["type"] == "list" else value.strip()
            if show(typed) == show(field["value"]):
                self.staged.pop(field["key"], None)
            else:
                self.staged[field["key"]] = typed
            self._sync()
            self._say(Text(f"{len(self.staged)} edit(s) staged — w saves and reloads, u undoes them")
                      if self.staged else Text(""))
        self.app.push_screen(PromptScreen(f"{field['section']} · {field['label']}", show(current), hint),
                             answered)

    def action_undo(self) -> None:
        self.staged = {}
        self._sync()
        self._say(Text("edits undone"))

    def action_write(self) -> None:
        if not self.staged:
            self.notify("nothing to save: edit a value with enter first")
            return
        changes = dict(self.staged)
        listing = "\n".join(f"  {self._field_name(key)}: {show(self._field(key)['value'])} → {show(value)}"  # type: ignore[index]
                             for key, value in changes.items())
        self.app.confirm(f"Save {len(changes)} change(s) to config.toml and reload the engine?\n{listing}",
                         lambda: self.app.perform("save configuration", self.client.edit_config,
                                                  changes, done=self._saved),
                         yes="Save and reload")

    def _saved(self, result: dict[str, Any]) -> None:
        if result.get("problems"):
            text = Text("✗ REFUSED — config.toml is unchanged:\n", style="bold")
            for key, why in result["problems"]:
                text.append(f"  {self._field_name(key)}: {why}\n")
            self._say(text)
            self.notify(f"configuration refused: {result['problems'][0][0]}: {result['problems'][0][1]}",
                        severity="error", timeout=10)
            return
        self.staged = {}
        word = "✗ saved, but the reload was refused" if result.get("refused") else "✓ saved and reloaded"
        text = Text(word + ":\n", style="bold")
        for line in result.get("report") or ["no change"]:
            text.append(f"  {line}\n")
        self._say(text)
        self.notify(word.lstrip("✓✗ "), severity="error" if result.get("refused") else "information")
        self.action_reload_fields()

    def action_plan(self) -> None:
        self._say(Text("making the routing plan of config.toml on disk (objects of the last 24 h; "
                       "nothing is sent)…"))
        self.app.perform("routing plan", self.client.plan, done=self._show_plan,
                         failed=lambda why: self._say(Text(f"✗ no plan: {why}", style="bold")),
                         refresh=False)

    def _show_plan(self, plan: dict[str, Any]) -> None:
        self._say(plan_text(plan, read_only=self.app.read_only))

    def _field_name(self, key: str) -> str:
        """``destination pacs · port`` rather than ``destinations[2].port``."""
        field = self._field(key)
        return f"{field['section']} · {field['label']}" if field else key

    def _say(self, text: Text) -> None:
        self.query_one("#result", Static).update(text)


def show(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "(none)"
    return "" if value is None else str(value)


def plan_text(plan: dict[str, Any], *, read_only: bool = False) -> Text:
    """The engine's words for a routing plan, headings in bold, and what to do next."""
    text = Text()
    for line in plan.get("lines") or []:
        text.append(line + "\n", style="" if line.startswith(" ") else "bold")
    if plan.get("error"):
        text.append("fix config.toml (mfconsole check names the same problems), then p again\n")
    elif plan.get("changed") and not read_only:
        text.append("to apply: reload (ctrl+p or : → reload), or `mfconsole reload`\n")
    return text
