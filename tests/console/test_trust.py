"""A picture operators can trust (pilots against a real engine): a filter shows only the
answer to the last query; a destination that dead-letters everything is flagged
failing although its transport is fine; run/life counters stay consistent across a
replay and a restart; ctrl+p opens the palette; a stopped engine greys what is shown
and says since when; filter lines are never clipped."""

from __future__ import annotations

import asyncio
import time

import dicomgen
import pytest
from fault_scp import FaultSCP
from harness import store_files
from support import cell, screen_text, wait_for
from test_dead_letter_paging import bury

from mfconsole.client import InProcessClient
from mfconsole.console.app import ConsoleApp
from mfconsole.console.widgets import FilterBar, KeyedTable


class SlowFirstClient(InProcessClient):
    """Answers dead-letter queries for the filter "1" late: as a busy engine would
    answer an earlier keystroke after a later one."""

    def __init__(self, engine):
        super().__init__(engine)
        self.slow_done = 0

    def call(self, op: str, **args):
        result = super().call(op, **args)
        if op.startswith("dead_letter") and args.get("text") == "1":
            time.sleep(1.5)
            self.slow_done += 1
        return result


def test_the_dead_letter_list_shows_only_the_answer_to_the_last_filter(engine_factory):
    engine = engine_factory()
    engine.store.call(bury, 300)
    client = SlowFirstClient(engine)

    async def run() -> None:
        app = ConsoleApp(client, refresh_s=0)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("4")
            await wait_for(pilot, lambda: app.screen.query_one("#letters", KeyedTable).row_count, what="rows")
            await pilot.press("slash", "1", "7")
            letters = app.screen.query_one("#letters", KeyedTable)

            def shown_match() -> bool:
                keys = letters.keys
                return bool(keys) and all("17" in k or "17" in cell(app, "letters", k, "uid") for k in keys)
            await wait_for(pilot, shown_match, what="rows matching 17")
            # The slow answers to "1" arrive after: they must change nothing.
            await wait_for(pilot, lambda: client.slow_done >= 2, timeout=10, what="the slow answers")
            await pilot.pause(0.5)
            assert shown_match(), screen_text(app)
            assert "matching “17”" in screen_text(app)
    asyncio.run(run())


@pytest.fixture
def refusing_pacs(tmp_path):
    scp = FaultSCP(None, "--status", "0x0122", record_dir=tmp_path / "scp", ae_title="PACS").start()
    yield scp
    scp.stop()


def test_a_destination_that_dead_letters_everything_is_flagged_and_counts_stay_consistent(
        engine_factory, refusing_pacs, tmp_path):
    from mfconsole.config import load
    from mfconsole.control import serve_control
    from mfconsole.engine.engine import Engine

    engine = engine_factory(destinations=[{"name": "pacs", "kind": "dimse", "host": "127.0.0.1",
                                           "port": refusing_pacs.port, "ae_title": "PACS"}])
    files = [dicomgen.save(dicomgen.make_sr(), tmp_path / "in" / f"{i}.dcm") for i in range(6)]
    store_files(engine.listeners[0].address[1], files)

    def dead() -> int:
        return engine.store.reader().delivery_counts("pacs").get("pacs", {}).get("dead", 0)

    async def run(app: ConsoleApp, check) -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await check(pilot, app)

    async def flagged(pilot, app) -> None:
        await wait_for(pilot, lambda: dead() == 6, what="six dead letters")
        await wait_for(pilot, lambda: "failing 100 %" in cell(app, "destinations", "pacs", "state"),
                       what="the failing flag")
        # The console shows the snapshot it has: wait for the one after the sixth.
        await wait_for(pilot, lambda: cell(app, "destinations", "pacs", "errored") == "6/6",
                       what="six errored this run and in all")
        # The Problems pane appears with a relayout: wait for the painted screen.
        await wait_for(pilot, lambda: "0x0122" in screen_text(app) and "Problems" in screen_text(app),
                       what="the problem in words")
    asyncio.run(run(ConsoleApp(InProcessClient(engine), refresh_s=0.3), flagged))

    # A restart: this run has errored nothing yet, the lifetime still counts the six.
    config = engine.config.path
    engine.stop()
    again = Engine(load(config), log_to_stderr=False, control=serve_control)
    again.start()
    try:
        async def after_restart(pilot, app) -> None:
            await wait_for(pilot, lambda: cell(app, "destinations", "pacs", "errored") == "0/6",
                           what="run 0, life 6")
            # Replayed, refused again: both move, and life never falls below run.
            result = await asyncio.to_thread(app.client.replay, None, None, "pacs")
            assert result["queued"] == 6
            await wait_for(pilot, lambda: cell(app, "destinations", "pacs", "errored") == "6/12",
                           what="run 6, life 12")
        asyncio.run(run(ConsoleApp(InProcessClient(again), refresh_s=0.3), after_restart))
    finally:
        again.stop()


def test_ctrl_p_opens_the_command_palette(engine_factory):
    from textual.command import CommandPalette

    engine = engine_factory()

    async def run() -> None:
        app = ConsoleApp(InProcessClient(engine), refresh_s=0)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("ctrl+p")
            await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="the palette")
    asyncio.run(run())


def test_a_stopped_engine_greys_what_is_shown_and_says_since_when(engine_factory):
    engine = engine_factory()

    async def run() -> None:
        app = ConsoleApp(InProcessClient(engine), refresh_s=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: "✓ listening" in screen_text(app), what="the live dashboard")
            assert not app.screen.has_class("-stale")
            await asyncio.to_thread(engine.stop)
            await wait_for(pilot, lambda: app.screen.has_class("-stale"), what="greyed tables")
            text = await wait_for(pilot, lambda: (lambda t: t if "ENGINE NOT ANSWERING since" in t else "")(
                screen_text(app)), what="the status bar saying since when")
            assert "pid" not in text.splitlines()[0]
            await pilot.press("3")
            await wait_for(pilot, lambda: app.screen.has_class("-stale"), what="other screens greyed too")
    asyncio.run(run())


@pytest.mark.parametrize("screen", ["4", "5"])
def test_filter_lines_are_one_whole_line_above_the_footer(engine_factory, screen):
    from textual.widgets import Footer

    engine = engine_factory()

    async def run() -> None:
        app = ConsoleApp(InProcessClient(engine), refresh_s=0)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press(screen)
            await pilot.pause(0.2)
            await pilot.press("slash", "a", "b")
            bar = app.screen.query_one(FilterBar)
            await wait_for(pilot, lambda: bar.has_focus, what="the filter line")
            footer = app.screen.query_one(Footer)
            assert bar.region.height == 1 and bar.content_region.height == 1
            assert bar.region.bottom <= footer.region.y           # not under the footer
            assert "ab" in screen_text(app).splitlines()[bar.region.y]
    asyncio.run(run())


def test_the_palette_discards_exactly_what_the_filter_matches(engine_factory):
    from mfconsole.console.dialogs import TypeToConfirmScreen

    engine = engine_factory()
    engine.store.call(bury, 30)             # 10 of each of three causes

    def dead_by_status() -> dict[str, int]:
        out: dict[str, int] = {}
        for r in engine.store.reader().rows("deliveries", state="dead"):
            out[r["last_status"]] = out.get(r["last_status"], 0) + 1
        return out

    async def run() -> None:
        app = ConsoleApp(InProcessClient(engine), refresh_s=0.3)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("4", "slash", *"0xA900")
            await wait_for(pilot, lambda: "matching “0xA900”" in screen_text(app), what="the filter")
            await pilot.press("enter", "ctrl+p")
            await pilot.press(*"discard all matching")
            await pilot.pause(0.5)
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, TypeToConfirmScreen), what="the confirmation")
            await pilot.press(*"discard 10", "enter")
            await wait_for(pilot, lambda: "0xA900" not in dead_by_status(), what="the discard")
    asyncio.run(run())
    assert dead_by_status() == {"0x0122": 10, "handler error": 10}
