"""5 Logs: the engine's redacted log, following the end unless the operator scrolled
up (then a "N new" badge counts what arrived); level filter and search."""

from __future__ import annotations

from collections import deque
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Input, Label, Log

from mfconsole.console import format as fmt
from mfconsole.console.widgets import ConsoleScreen, FilterBar

KEEP = 5000
LEVEL_STEPS = ("", "INFO", "WARNING", "ERROR")     # "" = everything


class LogsScreen(ConsoleScreen):
    NUMBER, TITLE_TEXT = 5, "Logs"
    BINDINGS = [Binding("f,end", "follow", "Follow", id="logs.follow"),
                Binding("l", "level", "Level", id="logs.level"),
                Binding("slash", "filter", "Search", id="logs.search")]

    def __init__(self) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=KEEP)
        self.cursor: dict[str, int] | None = None
        self.level = ""
        self.search = ""
        self.unseen = 0
        self.fetching = False

    def body(self) -> ComposeResult:
        yield Label("", id="log-filter")
        yield Log(max_lines=KEEP, highlight=False, id="log")
        yield Label("", id="new-badge")
        yield FilterBar("search the log…")

    @property
    def log_view(self) -> Log:
        return self.query_one("#log", Log)

    def on_mount(self) -> None:
        self._show_filter()
        self.query_one("#new-badge").display = False

    def show_snapshot(self, snap: dict[str, Any]) -> None:
        if self.unseen and self.following:      # scrolled back down by hand
            self.unseen = 0
            self._show_badge()
        if self.fetching:
            return
        self.fetching = True

        def done(result: dict[str, Any]) -> None:
            self.fetching = False
            if result.get("lines"):
                self.add(result["lines"])
            self.cursor = result.get("cursor")

        def failed(why: str) -> None:      # the status bar already says the engine is gone
            self.fetching = False
        self.app.perform("log", self.client.log_tail, self.cursor, done=done, failed=failed,
                         refresh=False)

    def matches(self, line: str) -> bool:
        if self.level:
            level = fmt.level_of(line)
            if level and fmt.LEVELS.index(level) < fmt.LEVELS.index(self.level):
                return False
        return not self.search or self.search.lower() in line.lower()

    @property
    def following(self) -> bool:
        view = self.log_view
        return view.scroll_offset.y >= view.max_scroll_y - 1

    def add(self, lines: list[str]) -> None:
        self.lines.extend(lines)
        shown = [line for line in lines if self.matches(line)]
        if not shown:
            return
        follow = self.following
        self.log_view.write_lines(self._fit(shown), scroll_end=follow)
        if not follow:
            self.unseen += len(shown)
        self._show_badge()

    def _fit(self, lines: list[str]) -> list[str]:
        """Below 120 columns the date and package go: the message is what must show."""
        self._wide_drawn = self.wide
        return lines if self._wide_drawn else [fmt.short_log_line(line) for line in lines]

    def on_resize(self) -> None:
        if getattr(self, "_wide_drawn", None) not in (None, self.wide):
            self._redraw()

    def _show_badge(self) -> None:
        badge = self.query_one("#new-badge", Label)
        badge.display = self.unseen > 0
        badge.update(f"▼ {fmt.count(self.unseen)} new line(s) — f or end to follow")

    def _redraw(self) -> None:
        view = self.log_view
        view.clear()
        view.write_lines(self._fit([line for line in self.lines if self.matches(line)]), scroll_end=True)
        self.unseen = 0
        self._show_badge()
        self._show_filter()

    def _show_filter(self) -> None:
        parts = [f"level ≥ {self.level}" if self.level else "all levels"]
        if self.search:
            parts.append(f"search “{self.search}”")
        self.query_one("#log-filter", Label).update(
            " · ".join(parts) + " · l level, / search, f follow (redacted log: no patient data)")

    def action_follow(self) -> None:
        self.log_view.scroll_end(animate=False)
        self.unseen = 0
        self._show_badge()

    def action_level(self) -> None:
        self.level = LEVEL_STEPS[(LEVEL_STEPS.index(self.level) + 1) % len(LEVEL_STEPS)]
        self._redraw()

    def action_filter(self) -> None:
        self.query_one(FilterBar).open()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.search = event.value.strip()
        self._redraw()
