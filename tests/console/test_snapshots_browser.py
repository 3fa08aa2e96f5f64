"""Layout snapshots of the Objects (8) and Audit (9) screens and their details at 80×24
and 120×40, over the scripted client (tests/console/fake.py). Full UIDs must be on
screen at both sizes: the cursor's under the objects table, all of them in a timeline.

Update after an intended change: pytest tests/console/test_snapshots_browser.py
--snapshot-update, and look at the SVGs before committing them."""

from __future__ import annotations

import pytest

from fake import FakeClient

from mfconsole.console.app import ConsoleApp

SIZES = {"80x24": (80, 24), "120x40": (120, 40)}


def settle_on(*keys: str):
    """Press keys, then wait for the console's workers (a screen loads in steps)."""
    async def run_before(pilot) -> None:
        await pilot.pause()
        for key in keys:
            await pilot.press(key)
            for _ in range(3):
                await pilot.app.workers.wait_for_complete()
                await pilot.pause(0.05)
    return run_before


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("what, keys", [
    ("objects", ("8",)),
    ("objects_filtered_sorted", ("8", "slash", *"state:dead", "enter", "s", "S")),
    ("object_timeline", ("8", "down", "enter")),
    ("audit", ("9",)),
    ("audit_row", ("9", "enter")),
])
def test_browser(snap_compare, frozen_clock, what, keys, size):
    app = ConsoleApp(FakeClient(), refresh_s=0)
    assert snap_compare(app, terminal_size=SIZES[size], run_before=settle_on(*keys))


def test_objects_read_only_no_color(snap_compare, frozen_clock, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    app = ConsoleApp(FakeClient(read_only=True), refresh_s=0)
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle_on("8"))
