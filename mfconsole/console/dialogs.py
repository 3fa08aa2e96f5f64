"""Modal screens: confirmations that scale with the blast radius, prompts, full-screen
text (details at 80 columns, reports), the key help and the too-small notice."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Input, Label, Static

MIN_WIDTH, MIN_HEIGHT = 72, 20


class ConfirmScreen(ModalScreen[bool]):
    """y/n for one item; the focus starts on the safe choice."""

    BINDINGS = [Binding("y", "answer(True)", "Yes", id="confirm.yes"),
                Binding("n,escape", "answer(False)", "No", id="confirm.no")]

    def __init__(self, question: str, yes: str = "Yes"):
        super().__init__()
        self.question, self.yes = question, yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button("No (n)", id="no")
                yield Button(f"{self.yes} (y)", id="yes", variant="warning")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class TypeToConfirmScreen(ModalScreen[bool]):
    """Bulk actions: the operator types the verb and the count (``REPLAY 312``)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="typeconfirm.cancel")]

    def __init__(self, question: str, phrase: str):
        super().__init__()
        self.question, self.phrase = question, phrase

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question")
            yield Label(Text.assemble("Type ", (self.phrase, "bold reverse"), " to confirm, esc to cancel"))
            yield Input(placeholder=self.phrase, id="phrase")
            yield Label("", id="mismatch")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip().casefold() == self.phrase.casefold():   # "replay 12" is as meant as "REPLAY 12"
            self.dismiss(True)
        else:
            self.query_one("#mismatch", Label).update(f"✗ that is not {self.phrase}")

    def action_cancel(self) -> None:
        self.dismiss(False)


class PromptScreen(ModalScreen["str | None"]):
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="prompt.cancel")]

    def __init__(self, question: str, value: str = "", hint: str = ""):
        super().__init__()
        self.question, self.value, self.hint = question, value, hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question")
            yield Input(value=self.value, id="answer")
            yield Label(self.hint or "enter to accept, esc to cancel", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class TextScreen(ModalScreen[None]):
    """Full-screen, scrollable text: a detail at 80 columns, a report, a preview."""

    BINDINGS = [Binding("escape,q", "close", "Back", id="text.close")]

    def __init__(self, title: str, body: Any):
        super().__init__()
        self.title_text, self.body = title, body

    def compose(self) -> ComposeResult:
        with Vertical(classes="fullscreen"):
            yield Static(Text(self.title_text, style="bold reverse"), classes="title")
            with VerticalScroll():
                yield Static(self.body, id="text-body")
            yield Footer()

    def set_body(self, body: Any) -> None:
        self.body = body
        if self.is_attached:
            self.query_one("#text-body", Static).update(body)

    def action_close(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """Every key of the screen underneath (``?`` / F1)."""

    BINDINGS = [Binding("escape,q,question_mark,f1", "close", "Close", id="help.close")]

    def __init__(self, title: str, keys: list[tuple[str, str]]):
        super().__init__()
        self.title_text, self.keys = title, keys

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            yield Static(Text(f"Keys — {self.title_text}", style="bold"))
            table: DataTable = DataTable(show_cursor=False, id="help-keys")
            table.add_columns("key", "action")
            for key, what in self.keys:
                table.add_row(Text(key, style="bold"), what)
            yield table
            yield Static("esc close", classes="hint")

    def action_close(self) -> None:
        self.dismiss(None)


class TooSmallScreen(Screen[None]):
    """Shown instead of a mangled layout; goes away when the terminal grows."""

    def compose(self) -> ComposeResult:
        yield Static(id="too-small")

    def on_mount(self) -> None:
        self.on_resize()

    def on_resize(self, event: Any = None) -> None:
        w, h = self.app.size
        self.query_one("#too-small", Static).update(
            f"Terminal too small: {w}×{h}.\nmfconsole needs at least {MIN_WIDTH}×{MIN_HEIGHT}.\n"
            "Enlarge the window (q quits).")
