"""Layout snapshots of every screen at 80×24 and 120×40, and with NO_COLOR, over the
scripted client (tests/console/fake.py: clocks, ports and host names frozen).

Update after an intended change: pytest tests/console/test_snapshots.py --snapshot-update
and look at the report before committing the new SVGs."""

from __future__ import annotations

import pytest

from fake import FakeClient

from mfconsole.console.app import SCREENS, ConsoleApp

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
@pytest.mark.parametrize("number", range(1, len(SCREENS) + 1), ids=[name for name, _ in SCREENS])
def test_screen(snap_compare, frozen_clock, number, size):
    app = ConsoleApp(FakeClient(), refresh_s=0)
    assert snap_compare(app, terminal_size=SIZES[size], run_before=settle_on(str(number)))


@pytest.mark.parametrize("number", range(1, len(SCREENS) + 1), ids=[name for name, _ in SCREENS])
def test_screen_no_color(snap_compare, frozen_clock, monkeypatch, number):
    monkeypatch.setenv("NO_COLOR", "1")
    app = ConsoleApp(FakeClient(), refresh_s=0)
    assert app.no_color
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle_on(str(number)))


@pytest.mark.parametrize("what, keys", [("help", ("3", "question_mark")),
                                        ("dead_letter_detail", ("4", "enter")),
                                        ("quit_confirmation", ("q",)),
                                        ("read_only_dead_letters", ("4",)),
                                        ("configuration_plan", ("6", "p"))])
def test_overlay(snap_compare, frozen_clock, what, keys):
    app = ConsoleApp(FakeClient(read_only=what.startswith("read_only")), refresh_s=0)
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle_on(*keys))


def test_too_small(snap_compare, frozen_clock):
    app = ConsoleApp(FakeClient(), refresh_s=0)
    assert snap_compare(app, terminal_size=(60, 16), run_before=settle_on())
