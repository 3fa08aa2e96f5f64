"""Helpers for console pilots: wait for what the screen shows, read table cells."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any, Callable

from rich.console import Console

from mfconsole.console.widgets import KeyedTable


async def wait_for(pilot: Any, predicate: Callable[[], Any], timeout: float = 15.0,
                   what: str = "condition") -> Any:
    """Let the app run until ``predicate()`` is truthy (the console refreshes on its own)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{screen_text(pilot.app)}")
        await pilot.pause(0.1)


def cell(app: Any, table: str, row: str, column: str) -> str:
    """The text of one cell of a keyed table on the current screen ("" when absent)."""
    t = app.screen.query_one(f"#{table}", KeyedTable)
    cells = t.cells(row)
    if cells is None:
        return ""
    value = cells[t.column_keys.index(column)]
    return getattr(value, "plain", str(value))


def rows(app: Any, table: str) -> list[str]:
    return app.screen.query_one(f"#{table}", KeyedTable).keys


def screen_text(app: Any) -> str:
    """What the terminal shows, as plain text (for assertions and failure messages)."""
    w, h = app.size
    console = Console(width=w, height=h, file=io.StringIO(), force_terminal=True, color_system=None,
                      record=True, legacy_windows=False, safe_box=False)
    try:
        console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    except Exception as exc:      # a failure message must not fail itself
        return f"(screen not renderable: {exc.__class__.__name__})"
    return console.export_text()


async def settle(pilot: Any, seconds: float = 0.3) -> None:
    await pilot.pause(seconds)
    await asyncio.sleep(0)
