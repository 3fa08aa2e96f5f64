"""Screen 3 with a study-stable destination (trigger = "study_stable"): the held
deliveries beside pending with the next release's countdown, and in the detail the
held studies, each with its countdown. Over the scripted client (fake.py); the
numbers come from the engine's snapshot and destination answers, which read them
from the database (tests/integration/test_study_stable.py checks those)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from fake import DESTINATION, NOW, SNAPSHOT, FakeClient

from mfconsole.console.app import ConsoleApp
from mfconsole.console.destinations import DestinationsScreen, detail

STUDY_A = "1.2.826.0.1.3680043.8.498.1001"
STUDY_B = "1.2.826.0.1.3680043.8.498.1002"
HELD = {"trigger": "study_stable", "stable_after_s": 30.0, "held_study_count": 2,
        "held_studies": [
            {"study_uid": STUDY_A, "objects": 9, "release_at": NOW + 12, "seconds_to_release": 12.0,
             "last_arrival_at": NOW - 18, "update": False},
            {"study_uid": STUDY_B, "objects": 3, "release_at": NOW + 28, "seconds_to_release": 28.0,
             "last_arrival_at": NOW - 2, "update": True}]}


class HeldClient(FakeClient):
    """The archive is study-stable and holds two studies (12 deliveries)."""

    def call(self, op: str, **args: Any) -> Any:
        if op == "snapshot":
            snap = copy.deepcopy(SNAPSHOT)
            archive = snap["destinations"][1]
            archive.update(HELD, state="up", failures=0, next_attempt_at=None, last_error=None)
            archive["counts"] = {**archive["counts"], "held": 12}
            return snap
        if op == "destination" and args["name"] == "archive":
            return {**DESTINATION, **HELD, "name": "archive", "kind": "stow",
                    "counts": {**DESTINATION["counts"], "held": 12}}
        return super().call(op, **args)


def test_held_studies_show_with_their_countdown(frozen_clock):
    app = ConsoleApp(HeldClient(), refresh_s=0)

    async def main() -> str:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("3")
            for _ in range(3):
                await app.workers.wait_for_complete()
                await pilot.pause(0.05)
            screen = app.screen
            assert isinstance(screen, DestinationsScreen)
            return str(screen.table.cells("archive")[2])

    assert asyncio.run(main()).endswith(" +12 held (in 12s)")


def test_held_studies_snapshot(snap_compare, frozen_clock):
    from test_snapshots import settle_on

    app = ConsoleApp(HeldClient(), refresh_s=0)
    assert snap_compare(app, terminal_size=(120, 40), run_before=settle_on("3", "down"))


def test_the_detail_lists_each_held_study_and_when_it_goes():
    text = detail({**DESTINATION, **HELD, "counts": {"pending": 0, "held": 12}}, NOW, None)
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(text)
    out = console.export_text()
    assert "study-stable: released after 30 s quiet; 2 studies held" in out
    assert f"{STUDY_A}  9 obj  release in 12s" in out
    assert f"{STUDY_B}  3 obj  release in 28s  (update)" in out
    assert "held" in out.split("queue by state", 1)[1]
